"""Engine events -> stream messages: one request's messages (Outgoing, for Worker.Generate), and a
Session: many requests over one Worker.Session call, each engine step's events in one message."""

from __future__ import annotations

import functools
import logging
import queue
import threading

import grpc

from shardserve.v1 import worker_pb2 as pb
from worker.engine.sequence import Finish

log = logging.getLogger(__name__)

FINISH = {
    Finish.LENGTH: pb.WORKER_FINISH_LENGTH,
    Finish.EOS: pb.WORKER_FINISH_EOS,
    Finish.STOP: pb.WORKER_FINISH_STOP,
    Finish.ABORTED: pb.WORKER_FINISH_ABORTED,
    Finish.ERROR: pb.WORKER_FINISH_ERROR,
}


def coalesce(out: queue.SimpleQueue) -> tuple[list[int], list[float], Finish | None, str]:
    """The next event of a request's stream, merged with every event already queued behind it.

    The engine emits one event per step; while the message before is still being sent (the
    controller reads slower than the engine steps), events pile up here, and they leave as one
    message (token ids in order, their log-probs aligned) instead of one message each. Stops at
    the finishing event, which is always the last."""
    toks, lps, fin, err = out.get()
    if fin is not None:
        return toks, lps, fin, err
    toks, lps = list(toks), list(lps)
    while fin is None:
        try:
            more_toks, more_lps, fin, err = out.get_nowait()
        except queue.Empty:
            break
        toks += more_toks
        lps += more_lps
    return toks, lps, fin, err


class Refused(Exception):
    """A request the worker will not run (INVALID_ARGUMENT); the message names the field."""


class Outgoing:
    """One admitted request's side of the stream: turns engine events into WorkerGenerateResponse
    messages (prompt facts on the first, top log-probs aligned, the finish on the last)."""

    def __init__(self, seq, arrival: float):
        self.seq, self.arrival = seq, arrival
        self.first, self.sent = True, 0  # sent: generated tokens already streamed (indexes seq.top_log_probs)

    def message(self, toks: list[int], lps: list[float], fin: Finish | None, err: str) -> pb.WorkerGenerateResponse:
        seq = self.seq
        msg = pb.WorkerGenerateResponse(token_ids=toks)
        if seq.sampling.return_log_probs:
            msg.log_probs.extend(lps)
        if seq.sampling.top_log_probs and seq.beam is None:
            for ids, vals in seq.top_log_probs[self.sent:self.sent + len(toks)]:
                msg.top_log_probs.add(token_ids=ids, log_probs=vals)
        self.sent += len(toks)
        if self.first:
            msg.prompt_tokens = seq.num_input_tokens
            msg.queue_seconds = max(0.0, (seq.first_scheduled or self.arrival) - self.arrival)
            self.first = False
        if fin is not None:
            msg.finish_reason = FINISH[fin]
            msg.error = err
            msg.cum_log_prob = seq.cum_log_prob
        return msg


class Session:
    """One Worker.Session call.

    Threads: `read` (its own thread) admits the requests and cancellations that come up; the engine
    thread appends its events to `pending` and, at the end of each step (Engine.step_listeners),
    hands the step's list to `outbox`; the call's thread (`messages`) turns each list, merged with
    any queued behind it, into one WorkerStepEvents. Refusals go straight to `outbox`. The call
    ending, or the controller cancelling it, aborts every request still running on it."""

    MAX_EVENTS = 4096  # per message when the reader fell behind: keeps a message far below 4 MB

    def __init__(self, service, context: grpc.ServicerContext):
        self.service, self.engine = service, service.engine
        self.lock = threading.Lock()
        self.live: dict[str, Outgoing] = {}  # admitted, not yet finished
        self.admitting: set[str] = set()  # compiling a grammar on a thread of their own
        self.cancelled: set[str] = set()  # of `admitting`, cancelled before they were added
        self.closed = False
        self.pending: list[tuple] = []  # (request_id, tokens, log_probs, finish, error): engine thread only
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # lists of events and refusals; None ends
        self.engine.step_listeners.append(self.flush)
        context.add_callback(self.close)

    # ---- requests (the reader thread) -----------------------------------------------------------
    def read(self, requests) -> None:
        try:
            for msg in requests:
                if msg.WhichOneof("kind") == "generate":
                    self.submit(msg.generate)
                elif msg.WhichOneof("kind") == "cancel_request_id":
                    self.cancel(msg.cancel_request_id)
        except Exception as e:  # noqa: BLE001 - grpc raises here when the call is cancelled or broken
            # a controller that cancels its call (it closes or reopens a session) raises without a message
            (log.info if str(e) else log.debug)("session ended: %s", str(e) or type(e).__name__)
        finally:
            self.close()

    def submit(self, request: pb.WorkerGenerateRequest) -> None:
        rid = request.request_id
        with self.lock:
            taken = not rid or rid in self.live or rid in self.admitting
            if not taken:
                self.admitting.add(rid)
        if taken:
            return self._refuse(rid, f"request_id {rid!r} is empty or already running on this session")
        if request.sampling.grammar:  # compiling may take seconds: never in front of the others' requests
            threading.Thread(target=self._admit, args=(request,), daemon=True, name="grammar").start()
        else:
            self._admit(request)

    def _admit(self, request: pb.WorkerGenerateRequest) -> None:
        rid = request.request_id
        try:
            out = self.service.admit(request, emit=functools.partial(self.emitted, rid))
        except Refused as e:
            with self.lock:
                self.admitting.discard(rid)
                self.cancelled.discard(rid)
            return self._refuse(rid, str(e))
        with self.lock:
            self.admitting.discard(rid)
            if rid in self.cancelled or self.closed:
                self.cancelled.discard(rid)
                return
            self.live[rid] = out
        self.engine.add(out.seq)

    def _refuse(self, rid: str, why: str) -> None:
        self.outbox.put([pb.WorkerRequestEvent(request_id=rid, status_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                               status_message=why)])

    def cancel(self, rid: str) -> None:
        with self.lock:
            if rid in self.admitting:
                self.cancelled.add(rid)
            elif rid not in self.live:
                return  # finished already, or never here
        self.engine.abort(rid)

    def close(self) -> None:
        """The call is over (either side): abort what still runs, end `messages`. Idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            running = list(self.live)
        for rid in running:
            self.engine.abort(rid)
        self.outbox.put(None)

    # ---- events (the engine thread) ------------------------------------------------------------
    def emitted(self, rid: str, toks: list[int], lps: list[float], fin: Finish | None, err: str) -> None:
        self.pending.append((rid, toks, lps, fin, err))

    def flush(self) -> None:
        if self.closed:  # nobody reads any more: stop listening (the aborts still free the slots)
            if self.flush in self.engine.step_listeners:
                self.engine.step_listeners.remove(self.flush)
            self.pending = []
        elif self.pending:
            step, self.pending = self.pending, []
            self.outbox.put(step)

    # ---- messages (the call's thread) ----------------------------------------------------------
    def messages(self):
        while True:
            step = self.outbox.get()
            if step is None:
                return
            merged: dict[str, list] = {}  # request_id -> [tokens, log-probs, finish, error], in step order
            refusals, n = [], 0
            while True:
                for ev in step:
                    n += 1
                    if isinstance(ev, pb.WorkerRequestEvent):
                        refusals.append(ev)
                        continue
                    rid, toks, lps, fin, err = ev
                    m = merged.setdefault(rid, [[], [], None, ""])
                    m[0] += toks
                    m[1] += lps
                    m[2], m[3] = fin, err
                if n >= self.MAX_EVENTS:
                    break
                try:
                    step = self.outbox.get_nowait()
                except queue.Empty:
                    break
                if step is None:
                    self.outbox.put(None)  # after this message
                    break
            msg = pb.WorkerStepEvents(events=refusals)
            for rid, (toks, lps, fin, err) in merged.items():
                out = self.live.get(rid)
                if out is None:
                    continue
                msg.events.add(request_id=rid, response=out.message(toks, lps, fin, err))
                if fin is not None:
                    with self.lock:
                        self.live.pop(rid, None)
            yield msg
