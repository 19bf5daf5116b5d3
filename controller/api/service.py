"""The public gRPC servicer: validate, tokenize, route to a replica, detokenize the stream.

A request's life: prepare (validate + encode; all errors happen here, before any work) ->
start (a worker call on the least-loaded ready replica) -> consume (token ids -> text pieces,
stop strings, finish reason) -> record (plain RequestRecord for the metrics module).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from controller.api.limits import RequestLimits, check_count, check_parameters, check_prompt
from controller.api.params import RequestError, resolve
from controller.fleet.replica import Replica
from controller.fleet.router import ModelEntry, Router
from controller.metrics.stats import RequestRecord
from controller.tokenizer import IncrementalDetokenizer, StopStrings
from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from shardserve.v1 import worker_pb2 as wpb

log = logging.getLogger(__name__)

FINISH = {
    wpb.WORKER_FINISH_LENGTH: gpb.FINISH_REASON_LENGTH,
    wpb.WORKER_FINISH_EOS: gpb.FINISH_REASON_EOS,
    wpb.WORKER_FINISH_STOP: gpb.FINISH_REASON_STOP,
    wpb.WORKER_FINISH_ABORTED: gpb.FINISH_REASON_CANCELLED,
}
STATUS_NAMES = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument", grpc.StatusCode.RESOURCE_EXHAUSTED: "resource_exhausted",
    grpc.StatusCode.UNAVAILABLE: "unavailable", grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_exceeded",
    grpc.StatusCode.CANCELLED: "cancelled", grpc.StatusCode.NOT_FOUND: "not_found",
}


@dataclass
class Prepared:
    entry: ModelEntry
    prompt_ids: list[int]
    sampling: wpb.SamplingParams
    stops: list[str]
    arrival: float


@dataclass
class Event:
    """One generated token as the client sees it."""

    token_id: int
    text: str
    log_prob: float | None
    finish: int  # gpb.FinishReason; UNSPECIFIED until the last event
    cum_log_prob: float | None = None
    top: gpb.TopLogProbs | None = None  # with parameters.top_log_probs: the most likely tokens here


def prepare(entry: ModelEntry, prompt: str | list[int], params: gpb.GenerationParameters, arrival: float,
            field: str = "prompt") -> Prepared:
    """A prompt as text (encoded with the model's tokenizer, special tokens added) or as token ids
    (taken as they are), validated with its parameters. Raises RequestError naming `field`."""
    if not prompt:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"field {field}: must not be empty")
    if isinstance(prompt, str):
        ids = entry.codec.encode(prompt)
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < entry.vocab_size]
        if bad:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"field {field}: token ids must be in [0, {entry.vocab_size}), got {bad[:5]}")
    sampling = resolve(params, prompt_tokens=len(ids), max_model_len=entry.max_model_len,
                       vocab_size=entry.vocab_size, eos_token_ids=entry.codec.eos_token_ids,
                       encode_plain=entry.codec.encode_plain, encoder_decoder=entry.encoder_decoder,
                       kv_cache=(entry.kv_blocks, entry.block_size))
    return Prepared(entry, ids, sampling, list(params.stop), arrival)


def samples(params: gpb.GenerationParameters, n: int) -> list[gpb.GenerationParameters]:
    """`n` (0 = 1) copies of the parameters; sample i is seeded seed + i (greedy ignores the seed)."""
    out = [params]
    for i in range(1, max(n, 1)):
        p = gpb.GenerationParameters()
        p.CopyFrom(params)
        p.seed = (params.seed + i) % (1 << 64)
        out.append(p)
    return out


def _prompt(p: gpb.Prompt) -> str | list[int]:
    return list(p.token_ids.token_ids) if p.WhichOneof("kind") == "token_ids" else p.text


def _merged(runs: list[Running]) -> Iterator[tuple[int, Event]]:
    """Events of several runs as they come, tagged with the run's index (a thread per run)."""
    q: queue.Queue = queue.Queue()

    def pump(i: int, run: Running) -> None:
        try:
            for ev in run.events():
                q.put((i, ev))
        except BaseException as e:  # noqa: B036 (raised by the consumer)
            q.put((i, e))
        q.put((i, None))

    for i, run in enumerate(runs):
        threading.Thread(target=pump, args=(i, run), daemon=True, name="stream-sample").start()
    left = len(runs)
    try:
        while left:
            i, item = q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for run in runs:
            run.cancel()  # a no-op on finished calls; stops the others when the client left or one failed


@contextmanager
def _ending(end, runs):
    try:
        yield
    finally:
        end(runs)


class Running:
    """A started worker call plus its detokenizer; iterate for events.

    Routed by `router.pick`. A replica that fails (UNAVAILABLE: its worker died or is dying) before the
    run's first token costs the client nothing: the run starts again on another ready replica, at
    most RETRIES times, each failed replica excluded; after a first token a failure ends the run
    (the client has seen part of the output)."""

    RETRIES = 2

    def __init__(self, prep: Prepared, router: Router, timeout: float | None):
        self.prep = prep
        self.router = router
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.first_token_at: float | None = None
        self.queue_s: float | None = None
        self.generated = 0
        self.status = "ok"
        self.consumed = False  # events() handed to a consumer (the HTTP side drains a run nobody took)
        self.failed: list[Replica] = []  # replicas this run left before its first token
        self._held = False  # this run counts in replica.outstanding until release()
        self._start(router.pick(prep.entry))

    def _start(self, replica: Replica) -> None:
        self.replica = replica
        with replica.lock:
            replica.outstanding += 1
            self._held = True
        timeout = None if self.deadline is None else max(0.001, self.deadline - time.monotonic())
        try:
            self.call = replica.generate(wpb.WorkerGenerateRequest(
                request_id=uuid.uuid4().hex, prompt_token_ids=self.prep.prompt_ids, sampling=self.prep.sampling),
                timeout)
        except BaseException:
            self.release()
            raise

    def _retry(self, err: RequestError) -> bool:
        """Start again on another replica after `err`, if nothing was streamed yet; False: give up."""
        if self.generated or len(self.failed) >= self.RETRIES:
            return False
        self.failed.append(self.replica)
        try:
            replica = self.router.pick(self.prep.entry, exclude=self.failed)
        except RequestError:
            return False  # no other ready replica: the first failure is the answer
        log.warning("%s; retrying on %s (nothing was streamed yet)", err.message, replica.name)
        self.release()
        self._start(replica)
        return True

    def cancel(self) -> None:
        self.call.cancel()

    def abandon(self) -> None:
        """A run whose events nobody will read: cancel it and drain it in a thread (which releases the
        replica's count of outstanding requests)."""
        if not self.consumed:
            self.consumed = True
            self.cancel()
            threading.Thread(target=lambda: list(self.events()), daemon=True, name="abandon").start()

    def release(self) -> None:
        """Give back this run's count in replica.outstanding: exactly once, whoever calls first
        (the events generator when it ends, or the request handler when the request ends)."""
        with self.replica.lock:
            if self._held:
                self._held = False
                self.replica.outstanding -= 1

    def events(self) -> Iterator[Event]:
        while True:
            try:
                yield from self._events()
                return
            except RequestError as err:
                if err.code != grpc.StatusCode.UNAVAILABLE or not self._retry(err):
                    raise

    def _events(self) -> Iterator[Event]:
        detok = IncrementalDetokenizer(self.prep.entry.codec, self.prep.prompt_ids)
        stops = StopStrings(self.prep.stops)
        want_lp = self.prep.sampling.return_log_probs
        try:
            for msg in self.call:
                if msg.prompt_tokens:
                    self.queue_s = msg.queue_seconds
                if msg.finish_reason == wpb.WORKER_FINISH_ERROR:
                    raise RequestError(grpc.StatusCode.INTERNAL, f"worker error: {msg.error}")
                last = msg.finish_reason != wpb.WORKER_FINISH_NONE
                for i, tok in enumerate(msg.token_ids):
                    if self.first_token_at is None:
                        self.first_token_at = time.monotonic()
                    self.generated += 1
                    final = last and i == len(msg.token_ids) - 1
                    text = stops.feed(detok.push([tok]) + (detok.flush() if final else ""))
                    lp = msg.log_probs[i] if want_lp and i < len(msg.log_probs) else None
                    top = self._top(msg.top_log_probs[i]) if i < len(msg.top_log_probs) else None
                    if stops.matched:
                        self.call.cancel()
                        yield Event(tok, text, lp, gpb.FINISH_REASON_STOP, msg.cum_log_prob if final else None, top)
                        return
                    if final:
                        text += stops.flush()
                        yield Event(tok, text, lp, FINISH[msg.finish_reason], msg.cum_log_prob, top)
                        return
                    yield Event(tok, text, lp, gpb.FINISH_REASON_UNSPECIFIED, None, top)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.CANCELLED:
                self.status = "cancelled"
                return
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RequestError(code, "deadline exceeded while generating") from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:  # the worker refused the request (its grammar)
                raise RequestError(code, e.details()) from None
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"replica {self.replica.name} failed during generation ({code.name}): "
                               f"{e.details()}") from None
        finally:
            self.release()

    def _top(self, alt: wpb.WorkerAlternatives) -> gpb.TopLogProbs:
        decode = self.prep.entry.codec.decode
        return gpb.TopLogProbs(token_ids=alt.token_ids, log_probs=alt.log_probs,
                               texts=[decode([t]) for t in alt.token_ids])

    def record(self, status: str) -> RequestRecord:
        return RequestRecord(model=self.prep.entry.name, replica=self.replica.name, status=status,
                             arrival_s=self.prep.arrival, finished_s=time.monotonic(), queue_s=self.queue_s,
                             first_token_s=self.first_token_at, prompt_tokens=len(self.prep.prompt_ids),
                             generated_tokens=self.generated)


class GenerationService(gpb_grpc.GenerationServicer):
    def __init__(self, router: Router, record=lambda rec: None, limits: RequestLimits = RequestLimits()):
        self.router = router
        self.limits = limits  # checked before anything is tokenized (api/limits.py)
        self.record = record  # sink for RequestRecord (the metrics module)

    def _start(self, prep: Prepared, context, runs: list[Running]) -> None:
        """Start one run and append it to `runs`; the caller releases every run in `runs` when the
        request ends (a later run failing to start, or an earlier one failing, leaks nothing)."""
        remaining = context.time_remaining()  # huge when the client set no deadline
        running = Running(prep, self.router, remaining if remaining is not None and remaining < 1e6 else None)
        runs.append(running)
        context.add_callback(running.cancel)

    @staticmethod
    def _end(runs: list[Running]) -> None:
        for run in runs:
            run.cancel()  # a no-op on finished calls
            run.release()

    def _fail(self, context, entry_name: str, err: RequestError, arrival: float):
        self.record(RequestRecord(model=entry_name, replica="", status=STATUS_NAMES.get(err.code, "error"),
                                  arrival_s=arrival, finished_s=time.monotonic()))
        context.abort(err.code, err.message)

    def Generate(self, request: gpb.GenerateRequest, context):
        arrival = time.monotonic()
        name = ""  # metrics label only served model names: a client's unknown name is not a series
        try:
            entry = self.router.get(request.model)
            name = entry.name
            if request.prompts and request.inputs:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "fields prompts and inputs: give one of them (inputs takes text or token ids)")
            check_count(len(request.prompts) or len(request.inputs), request.n, self.limits,
                        "prompts" if request.prompts else "inputs")
            check_parameters(request.parameters, self.limits)
            prompts = list(request.prompts) or [_prompt(p) for p in request.inputs]
            if not prompts:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "field prompts: at least one prompt is required")
            for i, p in enumerate(prompts):
                check_prompt(p, self.limits, f"prompts[{i}]")
            preps = [prepare(entry, p, params, arrival)
                     for p in prompts for params in samples(request.parameters, request.n)]
            runs: list[Running] = []
            with self.router.admit(entry, len(preps)):
                try:
                    for p in preps:
                        self._start(p, context, runs)
                    outputs = [self._collect(r) for r in runs]
                finally:
                    self._end(runs)
        except RequestError as e:
            return self._fail(context, name, e, arrival)
        return gpb.GenerateResponse(outputs=outputs, model=entry.name)

    def _collect(self, run: Running) -> gpb.GenerateOutput:
        out = gpb.GenerateOutput(prompt_tokens=len(run.prep.prompt_ids))
        text = []
        for ev in run.events():
            out.token_ids.append(ev.token_id)
            text.append(ev.text)
            if ev.log_prob is not None:
                out.log_probs.append(ev.log_prob)
            if ev.top is not None:
                out.top_log_probs.append(ev.top)
            if ev.finish:
                out.finish_reason = ev.finish
                if ev.cum_log_prob is not None and run.prep.sampling.return_log_probs:
                    out.cum_log_prob = ev.cum_log_prob
        out.text = "".join(text)
        out.generated_tokens = len(out.token_ids)
        self.record(run.record(run.status))
        return out

    def GenerateStream(self, request: gpb.GenerateStreamRequest, context):
        arrival = time.monotonic()
        name = ""  # metrics label only served model names: a client's unknown name is not a series
        try:
            entry = self.router.get(request.model)
            name = entry.name
            check_count(1, request.n, self.limits, "prompt")
            check_parameters(request.parameters, self.limits)
            prompt = list(request.prompt_token_ids.token_ids) if request.HasField("prompt_token_ids") \
                else request.prompt
            check_prompt(prompt, self.limits)
            preps = [prepare(entry, prompt, params, arrival) for params in samples(request.parameters, request.n)]
            runs: list[Running] = []
            with self.router.admit(entry, len(preps)), _ending(self._end, runs):
                for p in preps:
                    self._start(p, context, runs)
                events = _merged(runs) if len(runs) > 1 else ((0, ev) for ev in runs[0].events())
                index = [0] * len(runs)
                for sample, ev in events:
                    run = runs[sample]
                    msg = gpb.GenerateStreamResponse(token_id=ev.token_id, text=ev.text, index=index[sample],
                                                     finish_reason=ev.finish, sample=sample)
                    index[sample] += 1
                    if ev.log_prob is not None:
                        msg.log_prob = ev.log_prob
                    if ev.top is not None:
                        msg.top_log_probs.CopyFrom(ev.top)
                    if ev.finish:
                        msg.prompt_tokens = len(run.prep.prompt_ids)
                        msg.generated_tokens = run.generated
                        if ev.cum_log_prob is not None and run.prep.sampling.return_log_probs:
                            msg.cum_log_prob = ev.cum_log_prob
                    yield msg
                for run in runs:
                    self.record(run.record(run.status if context.is_active() else "cancelled"))
        except RequestError as e:
            self._fail(context, name, e, arrival)

    def Tokenize(self, request: gpb.TokenizeRequest, context):
        try:
            entry = self.router.get(request.model)
            check_prompt(request.text, self.limits, "text")
        except RequestError as e:
            context.abort(e.code, e.message)
        special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = entry.codec.encode(request.text) if special else entry.codec.encode_plain(request.text)
        return gpb.TokenizeResponse(token_ids=ids, model=entry.name)

    def Detokenize(self, request: gpb.DetokenizeRequest, context):
        try:
            entry = self.router.get(request.model)
        except RequestError as e:
            context.abort(e.code, e.message)
        bad = [t for t in request.token_ids if t >= entry.vocab_size]
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"field token_ids: must be < vocab_size {entry.vocab_size}, got {bad[:5]}")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = entry.codec.tok.decode(list(request.token_ids), skip_special_tokens=skip,
                                      clean_up_tokenization_spaces=False)
        return gpb.DetokenizeResponse(text=text, model=entry.name)

    def Load(self, request: gpb.LoadRequest, context):
        resp = gpb.LoadResponse()
        for entry in list(self.router.models.values()):
            if request.model and request.model != entry.name:
                continue
            m = resp.models.add(name=entry.name, in_flight=entry.in_flight, capacity=entry.capacity,
                                ready_replicas=len(entry.ready_replicas()))
            used = total = 0
            for r in list(entry.replicas):
                st = r.status.stats if r.status is not None and r.ready else None  # polled each second
                rl = m.replicas.add(name=r.name, state=r.state, outstanding=r.outstanding)
                if st is not None:
                    rl.running, rl.waiting = st.running, st.waiting
                    rl.kv_blocks_used, rl.kv_blocks_total = st.kv_blocks_used, st.kv_blocks_total
                    rl.kv_usage = st.kv_blocks_used / st.kv_blocks_total if st.kv_blocks_total else 0.0
                    m.running += st.running
                    m.waiting += st.waiting
                    used, total = used + st.kv_blocks_used, total + st.kv_blocks_total
            m.kv_usage = used / total if total else 0.0
        if request.model and not resp.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served")
        return resp

    def ModelInfo(self, request, context):
        resp = gpb.ModelInfoResponse()
        for entry in self.router.models.values():
            if request.model and request.model != entry.name:
                continue
            st = next((r.status for r in entry.replicas if r.status is not None), None)
            resp.models.add(
                name=entry.name, architecture=st.architecture if st else "", vocab_size=entry.vocab_size,
                max_context_length=entry.max_model_len, tensor_parallel=st.tensor_parallel if st else 1,
                pipeline_parallel=st.pipeline_parallel if st else 1, dtype=st.dtype if st else "",
                ready_replicas=len(entry.ready_replicas()), replicas=len(entry.replicas),
                state="ready" if entry.ready_replicas() else "not ready",
                encoder_decoder=st.encoder_decoder if st else False,
            )
        if request.model and not resp.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served")
        return resp
