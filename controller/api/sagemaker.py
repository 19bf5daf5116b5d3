"""The SageMaker container contract over HTTP: GET /ping, POST /invocations.

/invocations takes the FasterTransformer-handler JSON users already send:
    {"inputs": "prompt" | ["p1", "p2"], "parameters": {"max_seq_len": 20, "temperature": 0.7, ...}}
    -> {"outputs": ["text 1", "text 2"]}   (one per input, in order)
and, when the client sends `Accept: application/jsonlines`, streams one JSON object a line (one input):
    {"token": {"id": 17, "text": " the"}, "index": 0}
    ...
    {"token": {...}, "index": 41, "finish_reason": "length", "generated_text": "..."}
A request runs exactly as gRPC Generate does (service.prepare -> Running -> events, the same parameter
names through params.parameters_from_dict), so both doors give the same tokens. The model is the only
one served, or the one named by the `X-Amzn-SageMaker-Target-Model` header (or a "model" key).

Errors are JSON `{"error": message, "code": status}` with an HTTP status: 400 bad body or parameter,
404 unknown model, 415 not JSON, 429 queue full, 503 no ready replica or draining, 504 deadline.
An error after streaming began ends the stream with one `{"error": ...}` line.
"""

from __future__ import annotations

import json
import logging
import time

import grpc

from controller.api.params import RequestError, parameters_from_dict
from controller.api.service import STATUS_NAMES, Running, prepare
from controller.metrics.stats import RequestRecord
from shardserve.v1 import generate_pb2 as gpb

log = logging.getLogger(__name__)

JSONLINES = ("application/jsonlines", "application/jsonl", "application/x-jsonlines")
TARGET_MODEL_HEADER = "x-amzn-sagemaker-target-model"
BODY_KEYS = {"inputs", "parameters", "model", "padding", "stream"}  # padding: sent by FT users, ignored
FINISH_NAMES = {v.number: v.name.removeprefix("FINISH_REASON_").lower() for v in gpb.FinishReason.DESCRIPTOR.values}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.CANCELLED: 499,
}


def _json(status: int, obj) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj, ensure_ascii=False).encode()


def _error(err: RequestError) -> tuple[int, str, bytes]:
    return _json(HTTP_STATUS.get(err.code, 500), {"error": err.message, "code": err.code.name})


def _bad(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def parse_body(body: bytes, headers: dict) -> tuple[list[str], gpb.GenerationParameters, bool, str, bool]:
    """(prompts, parameters, the input was a list, model name, stream asked for). Raises RequestError."""
    try:
        obj = json.loads(body.decode("utf-8")) if body.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _bad('body must be a JSON object: {"inputs": "..." or ["...", ...], "parameters": {...}}')
    unknown = sorted(set(obj) - BODY_KEYS)
    if unknown:
        raise _bad(f"unknown key(s) {', '.join(map(repr, unknown))} in the body; known: {', '.join(sorted(BODY_KEYS))}")
    if "inputs" not in obj:
        raise _bad('field inputs: required (a string or a list of strings)')
    inputs = obj["inputs"]
    is_list = isinstance(inputs, list)
    prompts = inputs if is_list else [inputs]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise _bad("field inputs: must be a string or a non-empty list of strings")
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("field parameters: must be a JSON object of generation parameters")
    model = obj.get("model") or ""
    if not isinstance(model, str):
        raise _bad("field model: must be a string")
    model = _header(headers, TARGET_MODEL_HEADER) or model
    accept = _header(headers, "accept").lower()
    stream = any(t in accept for t in JSONLINES) or obj.get("stream") is True
    return prompts, parameters_from_dict(params), is_list, model, stream


def _header(headers: dict, name: str) -> str:
    for k, v in headers.items():
        if k.lower() == name:
            return v
    return ""


class SageMakerRoutes:
    """Adds /ping and /invocations to an HttpServer; requests go through the router like gRPC ones."""

    def __init__(self, router, ready, record=lambda rec: None, timeout_s: float | None = None):
        self.router = router
        self.ready = ready  # () -> bool: every model has a ready replica and the server admits requests
        self.record = record  # RequestRecord sink (the metrics module)
        self.timeout_s = timeout_s

    def install(self, http) -> None:
        http.add("GET", "/ping", self.ping)
        http.add("POST", "/invocations", self.invocations)

    def ping(self, body, headers):
        ok = self.ready()
        return _json(200 if ok else 503, {"status": "ready" if ok else "not ready"})

    def invocations(self, body: bytes, headers: dict):
        arrival = time.monotonic()
        ctype = _header(headers, "content-type").split(";")[0].strip().lower()
        # curl's default form type and text/plain are read as JSON too; anything else is refused
        if ctype and ctype not in ("application/json", "text/json", "application/x-www-form-urlencoded", "text/plain"):
            return _json(415, {"error": f"Content-Type {ctype!r} is not supported; send application/json",
                               "code": "INVALID_ARGUMENT"})
        name = ""
        try:
            prompts, params, is_list, wanted, stream = parse_body(body, headers)
            entry = self.router.get(wanted)  # only a served model's name becomes a metrics label
            name = entry.name
            if stream and len(prompts) != 1:
                raise _bad(f"streaming (application/jsonlines) takes one input, got {len(prompts)}")
            preps = [prepare(entry, p, params, arrival) for p in prompts]
            if stream:
                self.router.pick(entry)  # no ready replica: a 503 now rather than an error line later
                return 200, "application/jsonlines", self._stream(entry, preps[0])
            with self.router.admit(entry, len(preps)):
                runs = [Running(p, self.router.pick(entry), self.timeout_s) for p in preps]
                outputs = [self._collect(r) for r in runs]
        except RequestError as e:
            self._fail(name, e, arrival)
            return _error(e)
        return _json(200, {"outputs": outputs})

    def _collect(self, run: Running) -> str:
        try:
            text = "".join(ev.text for ev in run.events())
        except RequestError as e:
            self.record(run.record(STATUS_NAMES.get(e.code, "error")))
            raise
        self.record(run.record(run.status))
        return text

    def _fail(self, model: str, err: RequestError, arrival: float) -> None:
        self.record(RequestRecord(model=model, replica="", status=STATUS_NAMES.get(err.code, "error"),
                                  arrival_s=arrival, finished_s=time.monotonic()))

    def _stream(self, entry, prep):
        """Yields jsonlines; admission is held while the generator runs (closed when the client leaves)."""
        status = "ok"
        run = None
        try:
            with self.router.admit(entry):
                run = Running(prep, self.router.pick(entry), self.timeout_s)
                text = []
                for index, ev in enumerate(run.events()):
                    text.append(ev.text)
                    line = {"token": {"id": ev.token_id, "text": ev.text}, "index": index}
                    if ev.log_prob is not None:
                        line["token"]["log_prob"] = ev.log_prob
                    if ev.finish:
                        line["finish_reason"] = FINISH_NAMES[ev.finish]
                        line["generated_text"] = "".join(text)
                    yield (json.dumps(line, ensure_ascii=False) + "\n").encode()
                status = run.status
        except RequestError as e:
            status = STATUS_NAMES.get(e.code, "error")
            yield (json.dumps({"error": e.message, "code": e.code.name}) + "\n").encode()
        except GeneratorExit:  # the client went away: free the worker slot now
            status = "cancelled"
            if run is not None:
                run.cancel()
            raise
        finally:
            if run is not None:
                self.record(run.record(status))
            elif status != "ok":
                self.record(RequestRecord(model=entry.name, replica="", status=status, arrival_s=prep.arrival,
                                          finished_s=time.monotonic()))
