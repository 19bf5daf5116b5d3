"""The public gRPC servicer: validate, tokenize, route to a replica, detokenize the stream.

A request's life: prepare (validate + encode; all errors happen here, before any work) ->
start (a worker call on the least-loaded ready replica) -> consume (token ids -> text pieces,
stop strings, finish reason) -> record (plain RequestRecord for the metrics module).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

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


class Running:
    """A started worker call plus its detokenizer; iterate for events."""

    def __init__(self, prep: Prepared, replica: Replica, timeout: float | None):
        self.prep = prep
        self.replica = replica
        self.first_token_at: float | None = None
        self.queue_s: float | None = None
        self.generated = 0
        self.status = "ok"
        with replica.lock:
            replica.outstanding += 1
        self.call = replica.generate(wpb.WorkerGenerateRequest(
            request_id=uuid.uuid4().hex, prompt_token_ids=prep.prompt_ids, sampling=prep.sampling), timeout)

    def cancel(self) -> None:
        self.call.cancel()

    def events(self) -> Iterator[Event]:
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
                    if stops.matched:
                        self.call.cancel()
                        yield Event(tok, text, lp, gpb.FINISH_REASON_STOP, msg.cum_log_prob if final else None)
                        return
                    if final:
                        text += stops.flush()
                        yield Event(tok, text, lp, FINISH[msg.finish_reason], msg.cum_log_prob)
                        return
                    yield Event(tok, text, lp, gpb.FINISH_REASON_UNSPECIFIED)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.CANCELLED:
                self.status = "cancelled"
                return
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RequestError(code, "deadline exceeded while generating") from None
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"replica {self.replica.name} failed during generation ({code.name}): "
                               f"{e.details()}") from None
        finally:
            with self.replica.lock:
                self.replica.outstanding -= 1

    def record(self, status: str) -> RequestRecord:
        return RequestRecord(model=self.prep.entry.name, replica=self.replica.name, status=status,
                             arrival_s=self.prep.arrival, finished_s=time.monotonic(), queue_s=self.queue_s,
                             first_token_s=self.first_token_at, prompt_tokens=len(self.prep.prompt_ids),
                             generated_tokens=self.generated)


class GenerationService(gpb_grpc.GenerationServicer):
    def __init__(self, router: Router, record=lambda rec: None):
        self.router = router
        self.record = record  # sink for RequestRecord (the metrics module)

    def _start(self, prep: Prepared, context) -> Running:
        replica = self.router.pick(prep.entry)
        remaining = context.time_remaining()  # huge when the client set no deadline
        running = Running(prep, replica, remaining if remaining is not None and remaining < 1e6 else None)
        context.add_callback(running.cancel)
        return running

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
            if not request.prompts:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "field prompts: at least one prompt is required")
            preps = [prepare(entry, p, request.parameters, arrival) for p in request.prompts]
            with self.router.admit(entry, len(preps)):
                runs = [self._start(p, context) for p in preps]
                outputs = [self._collect(r) for r in runs]
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
            prep = prepare(entry, request.prompt, request.parameters, arrival)
            with self.router.admit(entry):
                run = self._start(prep, context)
                for index, ev in enumerate(run.events()):
                    msg = gpb.GenerateStreamResponse(token_id=ev.token_id, text=ev.text, index=index,
                                                     finish_reason=ev.finish)
                    if ev.log_prob is not None:
                        msg.log_prob = ev.log_prob
                    if ev.finish:
                        msg.prompt_tokens = len(prep.prompt_ids)
                        msg.generated_tokens = run.generated
                        if ev.cum_log_prob is not None and prep.sampling.return_log_probs:
                            msg.cum_log_prob = ev.cum_log_prob
                    yield msg
                self.record(run.record(run.status if context.is_active() else "cancelled"))
        except RequestError as e:
            self._fail(context, name, e, arrival)

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
