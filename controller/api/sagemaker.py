"""The SageMaker container contract over HTTP: GET /ping, POST /invocations, and the paths boto3's
sagemaker-runtime client posts to (`invoke_endpoint` -> POST /endpoints/NAME/invocations, the same;
`invoke_endpoint_with_response_stream` -> POST /endpoints/NAME/invocations-response-stream, the jsonlines
stream framed as AWS event-stream PayloadPart events, controller/api/eventstream.py).

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
from collections.abc import AsyncIterator

import grpc
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from controller.api import eventstream
from controller.api.http import BodyTooLarge, events, gather_all, json_response, read_body, until_disconnect
from controller.api.limits import RequestLimits, check_count, check_parameters, check_prompt
from controller.api.params import RequestError, parameters_from_dict
from controller.api.service import STATUS_NAMES, Prepared, Running, prepare
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


def _error(err: RequestError) -> Response:
    # "message" too: botocore reads it into the ClientError a boto3 caller sees
    return json_response(HTTP_STATUS.get(err.code, 500),
                         {"error": err.message, "code": err.code.name, "message": err.message})


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
    accept = (_header(headers, "accept") + " " + _header(headers, "x-amzn-sagemaker-accept")).lower()
    stream = any(t in accept for t in JSONLINES) or obj.get("stream") is True
    return prompts, parameters_from_dict(params), is_list, model, stream


def _header(headers: dict, name: str) -> str:
    for k, v in headers.items():
        if k.lower() == name:
            return v
    return ""


class SageMakerRoutes:
    """Adds /ping, /invocations and boto3's /endpoints/NAME/... paths to an HttpServer; requests go
    through the router like gRPC ones."""

    def __init__(self, router, ready, record=lambda rec: None, timeout_s: float | None = None,
                 limits: RequestLimits = RequestLimits()):
        self.router = router
        self.limits = limits  # the gRPC servicer's limits (api/limits.py), checked before tokenizing
        self.ready = ready  # () -> bool: every model has a ready replica and the server admits requests
        self.record = record  # RequestRecord sink (the metrics module)
        self.timeout_s = timeout_s

    def install(self, http) -> None:
        http.add("GET", "/ping", self.ping)
        http.add_endpoint("POST", "/invocations", self.invocations)
        http.add_endpoint("POST", "/endpoints/{endpoint}/invocations", self.invocations)
        http.add_endpoint("POST", "/endpoints/{endpoint}/invocations-response-stream", self.response_stream)

    def ping(self, body, headers):
        ok = self.ready()
        return 200 if ok else 503, "application/json", json.dumps({"status": "ready" if ok else "not ready"}).encode()

    async def _parse(self, request: Request):
        """(prepared requests, entry, stream asked for) or an error Response."""
        arrival = time.monotonic()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        # curl's default form type and text/plain are read as JSON too; anything else is refused
        if ctype and ctype not in ("application/json", "text/json", "application/x-www-form-urlencoded", "text/plain"):
            return json_response(415, {"error": f"Content-Type {ctype!r} is not supported; send application/json",
                                       "code": "INVALID_ARGUMENT"})
        try:
            body = await read_body(request)
        except BodyTooLarge as e:
            return json_response(413, {"error": str(e), "code": "INVALID_ARGUMENT"})
        name = ""
        try:
            prompts, params, is_list, wanted, stream = parse_body(body, dict(request.headers))
            entry = self.router.get(wanted)  # only a served model's name becomes a metrics label
            name = entry.name
            check_count(len(prompts), 0, self.limits, "inputs")
            check_parameters(params, self.limits)
            for p in prompts:
                check_prompt(p, self.limits, "inputs")
            return [prepare(entry, p, params, arrival) for p in prompts], entry, stream
        except RequestError as e:
            self._fail(name, e, arrival)
            return _error(e)

    async def invocations(self, request: Request) -> Response:
        parsed = await self._parse(request)
        if isinstance(parsed, Response):
            return parsed
        preps, entry, stream = parsed
        if stream:
            return self._start_stream(entry, preps, "application/jsonlines", lambda line: line)
        try:
            with self.router.admit(entry, len(preps)):
                runs = [Running(p, self.router, self.timeout_s) for p in preps]
                try:
                    outputs = await until_disconnect(request, self._collect_all(runs))
                finally:
                    for r in runs:  # the client left before a run's consumer started
                        if not r.consumed:
                            self.record(r.record("cancelled"))
                            r.abandon()
        except RequestError as e:
            self._fail(entry.name, e, preps[0].arrival)
            return _error(e)
        if outputs is None:  # the client left: its runs were cancelled
            return Response(status_code=499)
        return json_response(200, {"outputs": outputs})

    async def response_stream(self, request: Request) -> Response:
        """boto3's invoke_endpoint_with_response_stream: the jsonlines stream, one line a PayloadPart."""
        parsed = await self._parse(request)
        if isinstance(parsed, Response):
            return parsed
        preps, entry, _ = parsed
        resp = self._start_stream(entry, preps, eventstream.CONTENT_TYPE, eventstream.payload_part)
        resp.headers["X-Amzn-SageMaker-Content-Type"] = "application/jsonlines"
        return resp

    def _start_stream(self, entry, preps: list[Prepared], media_type: str, frame) -> Response:
        try:
            if len(preps) != 1:
                raise _bad(f"field inputs: streaming (application/jsonlines) takes one input, got {len(preps)}")
            self.router.pick(entry)  # no ready replica: a 503 now rather than an error line later
        except RequestError as e:
            self._fail(entry.name, e, preps[0].arrival)
            return _error(e)
        return StreamingResponse(self._stream(entry, preps[0], frame), media_type=media_type)

    async def _collect_all(self, runs: list[Running]) -> list[str]:
        return await gather_all([self._collect(r) for r in runs])

    async def _collect(self, run: Running) -> str:
        status = "cancelled"
        try:
            text = "".join([ev.text async for ev in events(run)])
            status = run.status
        except RequestError as e:
            status = STATUS_NAMES.get(e.code, "error")
            raise
        finally:
            self.record(run.record(status))
        return text

    def _fail(self, model: str, err: RequestError, arrival: float) -> None:
        self.record(RequestRecord(model=model, replica="", status=STATUS_NAMES.get(err.code, "error"),
                                  arrival_s=arrival, finished_s=time.monotonic()))

    async def _stream(self, entry, prep: Prepared, frame) -> AsyncIterator[bytes]:
        """jsonlines (each line through `frame`); admission is held while it runs; a client that leaves
        cancels the generator, and so the run."""
        status = "cancelled"
        run = None
        try:
            with self.router.admit(entry):
                run = Running(prep, self.router, self.timeout_s)
                text = []
                index = 0
                async for ev in events(run):
                    text.append(ev.text)
                    line = {"token": {"id": ev.token_id, "text": ev.text}, "index": index}
                    if ev.log_prob is not None:
                        line["token"]["log_prob"] = ev.log_prob
                    if ev.finish:
                        line["finish_reason"] = FINISH_NAMES[ev.finish]
                        line["generated_text"] = "".join(text)
                    index += 1
                    yield frame((json.dumps(line, ensure_ascii=False) + "\n").encode())
                status = run.status
        except RequestError as e:
            status = STATUS_NAMES.get(e.code, "error")
            yield frame((json.dumps({"error": e.message, "code": e.code.name}) + "\n").encode())
        finally:
            if run is not None:
                self.record(run.record(status))
            elif status != "ok":
                self.record(RequestRecord(model=entry.name, replica="", status=status, arrival_s=prep.arrival,
                                          finished_s=time.monotonic()))
