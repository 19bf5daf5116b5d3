"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

A request is parsed into its pydantic schema (controller/api/openai_models.py), mapped onto the typed
GenerationParameters, and each prompt x sample runs on the gRPC servicer's path (service.prepare ->
router.admit -> Running.events()), so validation, admission, metrics and cancellation are shared.
`n` samples of a prompt are n runs (seeds seed, seed+1, ...). `stream: true` answers Server-Sent
Events: `data: {chunk}` per token piece, `data: [DONE]` last; a client that goes away cancels every
run at the worker's next step. Errors are OpenAI's shape {"error": {"message", "type", "param",
"code"}}: 400 bad parameter or body, 404 unknown model, 413 body over MAX_BODY_BYTES, 429 admission
refused, 503 no ready replica.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from controller.api.http import (
    BodyTooLarge,
    ClosingStream,
    events,
    gather_all,
    json_response,
    read_body,
    until_disconnect,
)
from controller.api.limits import RequestLimits, check_count, check_parameters, check_prompt
from controller.api.openai_models import ChatRequest, CompletionRequest
from controller.api.params import RequestError
from controller.api.service import STATUS_NAMES, Event, Prepared, Running, prepare
from controller.metrics.stats import RequestRecord
from shardserve.v1 import generate_pb2 as gpb

FINISH = {gpb.FINISH_REASON_LENGTH: "length", gpb.FINISH_REASON_EOS: "stop", gpb.FINISH_REASON_STOP: "stop",
          gpb.FINISH_REASON_CANCELLED: "abort"}
HTTP = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.INTERNAL: 500}
TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 503: "service_unavailable", 405: "invalid_request_error"}
CODES = {404: "model_not_found", 429: "rate_limit_exceeded", 413: "request_too_large"}
# params.resolve names the typed field; the client sent the OpenAI name
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "num_beams": "best_of",
                "prompt": "prompt", "prompts": "prompt"}


def error(status: int, message: str, param: str | None = None) -> Response:
    return json_response(status, {"error": {"message": message, "type": TYPES.get(status, "server_error"),
                                            "param": param, "code": CODES.get(status)}})


def _named(message: str) -> tuple[str, str | None]:
    m = re.match(r"(?:parameters?|field) (\w+)", message)
    if m is None and "max_new_tokens" in message:
        return message.replace("max_new_tokens", "max_tokens"), "max_tokens"
    if m is None:
        return message, None
    name = OPENAI_NAMES.get(m.group(1), m.group(1))
    return message.replace(m.group(1), name, 1), name


def request_error(err: RequestError) -> Response:
    message, param = _named(err.message)
    return error(HTTP.get(err.code, 500), message, param)


def _validation(e: ValidationError) -> Response:
    first = e.errors()[0]
    param = ".".join(str(x) for x in first["loc"]) or None
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    if param is None and (m := re.match(r"(\w+): ", msg)):  # a check across fields names its field first
        return error(400, msg, m.group(1))
    return error(400, f"{param}: {msg}" if param else msg, param)


INLINE_BODY_BYTES = 64 << 10


async def _off_loop(request: Request, fn, *args):
    """Tokenizing (and rendering a chat template) on the loop for small bodies, where a hop to a thread
    and back costs more than the work under load; in a thread for large ones, so the loop stays free."""
    if int(request.headers.get("content-length") or 0) <= INLINE_BODY_BYTES:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _best_first(alt: list[tuple[str, float]]) -> dict[str, float]:
    """{text: log-prob}, best first; of tokens that decode to the same text the best is kept."""
    out: dict[str, float] = {}
    for text, lp in alt:
        out.setdefault(text, lp)
    return out


class _Choice:
    """What one run (a prompt x sample) has produced so far."""

    def __init__(self, index: int, run: Running):
        self.index = index
        self.run = run
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list = []  # gpb.TopLogProbs per token, when top alternatives are asked for
        self.finish: str | None = None
        self.started = False  # its events are being consumed (else close() drains them)


class OpenAIRoutes:
    def __init__(self, router, record=lambda rec: None, chat_template: Path | None = None,
                 timeout_s: float | None = None, limits: RequestLimits = RequestLimits()):
        self.router = router
        self.record = record
        self.limits = limits  # the gRPC servicer's limits (api/limits.py), checked before tokenizing
        self.chat_template = chat_template.read_text() if chat_template else None
        self.timeout_s = timeout_s
        self.created = int(time.time())

    def install(self, http) -> None:
        http.error_shape("/v1/", error)
        http.add_endpoint("GET", "/v1/models", self.models)
        http.add_endpoint("POST", "/v1/completions", self.completions)
        http.add_endpoint("POST", "/v1/chat/completions", self.chat)

    async def models(self, request: Request) -> Response:
        data = []
        for name in self.router.names():
            if name in self.router.failed:
                continue
            entry = self.router.models.get(name)
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "shardserve",
                         "max_model_len": entry.max_model_len if entry else None})
        return json_response(200, {"object": "list", "data": data})

    # ---- parsing ------------------------------------------------------------------------------
    async def _parse(self, request: Request, schema: type[BaseModel]):
        try:
            body = await read_body(request)
        except BodyTooLarge as e:
            return error(413, str(e))
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return error(400, f"body is not valid JSON: {e}")
        if not isinstance(obj, dict):
            return error(400, "body must be a JSON object")
        try:
            return schema.model_validate(obj)
        except ValidationError as e:
            return _validation(e)

    def _prepare(self, req, prompts: list[str | list[int]], logprobs: bool, arrival: float):
        """(entry, [Prepared per prompt x sample]) in choice order; raises RequestError."""
        entry = self.router.get(req.model or "")
        req.check_constraint()  # structured output: a bad schema is a 400 naming its field
        params, seeded = req.parameters(logprobs)
        check_count(len(prompts), req.n, self.limits, "prompt")
        check_parameters(params, self.limits)
        for prompt in prompts:
            check_prompt(prompt, self.limits)
        preps = []
        for prompt in prompts:
            for i in range(req.n):
                p = params
                if i and seeded:
                    p = gpb.GenerationParameters()
                    p.CopyFrom(params)
                    p.seed = (params.seed + i) & ((1 << 64) - 1)
                preps.append(prepare(entry, prompt, p, arrival))
        return entry, preps

    def _chat_ids(self, entry, req: ChatRequest) -> list[int]:
        tok = entry.codec.tok
        template = self.chat_template or getattr(tok, "chat_template", None)
        if not template:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"field messages: model {entry.name} has no chat template (none in its tokenizer "
                               f"config); start the server with --chat-template FILE, or use /v1/completions")
        try:
            text = tok.apply_chat_template(req.conversation(), chat_template=template, tokenize=False,
                                           add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # a template that raises (e.g. roles it refuses) is the request's problem
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"field messages: the chat template failed: {e}") \
                from None
        return entry.codec.encode_plain(text)  # the template carries the special tokens it wants

    # ---- routes -------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await self._parse(request, CompletionRequest)
        if isinstance(req, Response):
            return req
        if req.echo and req.logprobs is not None:
            return error(400, "echo: with logprobs it needs the prompt's log-probabilities, which are not "
                              "available; drop one of them", "echo")
        try:
            entry, preps = await _off_loop(request, self._prepare, req, req.prompts(), req.logprobs is not None,
                                           arrival)
        except RequestError as e:
            return self._refused(req.model or "", e, arrival)
        echo = [entry.codec.decode(p.prompt_ids) if req.echo else "" for p in preps]
        return await self._serve(request, req, entry, preps, "text_completion", "cmpl", echo)

    async def chat(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await self._parse(request, ChatRequest)
        if isinstance(req, Response):
            return req

        def prep():
            entry = self.router.get(req.model or "")
            return self._prepare(req, [self._chat_ids(entry, req)], req.logprobs, arrival)

        try:
            entry, preps = await _off_loop(request, prep)
        except RequestError as e:
            return self._refused(req.model or "", e, arrival)
        return await self._serve(request, req, entry, preps, "chat.completion", "chatcmpl", None)

    def _refused(self, model: str, err: RequestError, arrival: float) -> Response:
        served = model if model in self.router.models else (next(iter(self.router.models), "")
                                                            if not model and len(self.router.models) == 1 else "")
        self.record(RequestRecord(model=served, replica="", status=STATUS_NAMES.get(err.code, "error"),
                                  arrival_s=arrival, finished_s=time.monotonic()))
        return request_error(err)

    async def _serve(self, request, req, entry, preps: list[Prepared], kind: str, prefix: str, echo):
        admission = self.router.admit(entry, len(preps))
        try:
            admission.__enter__()
        except RequestError as e:  # 429 (queue full) or 503 (draining): nothing was taken
            return self._refused(entry.name, e, preps[0].arrival)
        try:
            choices = self._start(entry, preps)
        except RequestError as e:  # 503: no ready replica
            admission.__exit__(None, None, None)
            return self._refused(entry.name, e, preps[0].arrival)
        meta = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": entry.name}
        close = self._closer(choices, admission)
        if req.stream:
            body = self._stream(req, entry, preps, choices, kind, meta, echo, close)
            return ClosingStream(body, close, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            done = await until_disconnect(request, gather_all([self._consume(c) for c in choices]))
        except RequestError as e:
            return request_error(e)
        finally:
            close()
        if done is None:
            return Response(status_code=499)
        return json_response(200, self._unary(req, entry, preps, choices, kind, meta, echo))

    def _closer(self, choices: list[_Choice], admission):
        """Once: cancel every run nobody consumed yet (and drain it, which releases its replica count),
        release the admission slots."""
        closed = []

        def close() -> None:
            if closed:
                return
            closed.append(True)
            for c in choices:
                if not c.started:
                    c.started = True
                    self.record(c.run.record("cancelled"))
                    c.run.abandon()
            admission.__exit__(None, None, None)

        return close

    def _start(self, entry, preps: list[Prepared]) -> list[_Choice]:
        """A worker call per prepared request; none started when no replica is ready."""
        self.router.pick(entry)
        choices: list[_Choice] = []
        try:
            for i, p in enumerate(preps):
                choices.append(_Choice(i, Running(p, self.router, self.timeout_s)))
        except RequestError:  # the replica went away between two picks: release what started
            for c in choices:
                c.run.abandon()
            raise
        return choices

    async def _consume(self, c: _Choice, on_event=None) -> None:
        if c.started:  # closed before this task ran
            return
        c.started = True
        status = "cancelled"
        try:
            async for ev in events(c.run):
                self._take(c, ev)
                if on_event is not None:
                    await on_event(c, ev)
            status = c.run.status
            if c.finish is None:
                c.finish = "abort"
        except RequestError as e:
            status = STATUS_NAMES.get(e.code, "error")
            raise
        finally:
            self.record(c.run.record(status))

    @staticmethod
    def _take(c: _Choice, ev: Event) -> None:
        c.text.append(ev.text)
        c.tokens.append(ev.token_id)
        if ev.log_prob is not None:
            c.logprobs.append(ev.log_prob)
        if ev.top is not None:
            c.tops.append(ev.top)
        if ev.finish:
            c.finish = FINISH.get(ev.finish, "stop")

    def _usage(self, preps: list[Prepared], choices: list[_Choice], n: int) -> dict:
        prompt = sum(len(p.prompt_ids) for p in preps[::n])  # each prompt once, whatever n
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _logprobs(self, entry, kind: str, tokens: list[int], lps: list[float], offset: int = 0, tops=()):
        """OpenAI's logprobs object for `tokens`; `tops`: their gpb.TopLogProbs (empty when the request
        asked for no alternatives)."""
        pieces = [entry.codec.decode([t]) for t in tokens]
        alts = [list(zip(t.texts, t.log_probs)) for t in tops] if tops else [[] for _ in tokens]
        if kind.startswith("chat"):
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()),
                                 "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode())} for a, v in alt]}
                                for s, lp, alt in zip(pieces, lps, alts)]}
        offsets = []
        for s in pieces:
            offsets.append(offset)
            offset += len(s)
        top = [_best_first(alt) for alt in alts] if tops else None
        return {"tokens": pieces, "token_logprobs": list(lps), "top_logprobs": top, "text_offset": offsets}

    def _unary(self, req, entry, preps, choices, kind, meta, echo) -> dict:
        out = []
        want_lp = req.logprobs is not None if kind == "text_completion" else req.logprobs
        for c in choices:
            text = "".join(c.text)
            lp = self._logprobs(entry, kind, c.tokens, c.logprobs, 0, c.tops) if want_lp else None
            if kind == "chat.completion":
                out.append({"index": c.index, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": c.finish})
            else:
                out.append({"index": c.index, "text": (echo[c.index] if echo else "") + text, "logprobs": lp,
                            "finish_reason": c.finish})
        return {**meta, "object": kind, "choices": out, "usage": self._usage(preps, choices, req.n)}

    async def _stream(self, req, entry, preps, choices, kind, meta, echo, close) -> AsyncIterator[bytes]:
        """SSE chunks as tokens arrive, from every choice at once; admission held until the end; a
        cancelled generator (the client left) cancels every run."""
        chat = kind == "chat.completion"
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage = req.include_usage()
        want_lp = req.logprobs if chat else req.logprobs is not None
        queue: asyncio.Queue = asyncio.Queue()

        def chunk(choice: dict) -> bytes:
            d = {**meta, "object": obj, "choices": [choice]}
            if usage:
                d["usage"] = None
            return _sse(d)

        async def on_event(c: _Choice, ev: Event) -> None:
            if not (ev.text or ev.finish or want_lp):
                return  # text held back (an incomplete character, a possible stop string)
            lp = None
            if want_lp and ev.log_prob is not None:
                lp = self._logprobs(entry, kind, [ev.token_id], [ev.log_prob],
                                    sum(len(t) for t in c.text[:-1]), [ev.top] if ev.top is not None else ())
            finish = FINISH.get(ev.finish, "stop") if ev.finish else None
            if chat:
                queue.put_nowait(chunk({"index": c.index, "delta": {"content": ev.text} if ev.text else {},
                                        "logprobs": lp, "finish_reason": finish}))
            else:
                queue.put_nowait(chunk({"index": c.index, "text": ev.text, "logprobs": lp,
                                        "finish_reason": finish}))

        async def run_all() -> None:
            try:
                await gather_all([self._consume(c, on_event) for c in choices])
            except RequestError as e:
                message, param = _named(e.message)
                status = HTTP.get(e.code, 500)
                queue.put_nowait(_sse({"error": {"message": message, "type": TYPES.get(status, "server_error"),
                                                 "param": param, "code": CODES.get(status)}}))
            finally:
                queue.put_nowait(None)

        try:
            for c in choices:  # the first chunk of each choice: the role (chat) or the echoed prompt
                if chat:
                    yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None})
                elif echo and echo[c.index]:
                    yield chunk({"index": c.index, "text": echo[c.index], "logprobs": None, "finish_reason": None})
            task = asyncio.ensure_future(run_all())
            try:
                while (item := await queue.get()) is not None:
                    yield item
            finally:
                task.cancel()
            if usage:
                yield _sse({**meta, "object": obj, "choices": [], "usage": self._usage(preps, choices, req.n)})
            yield b"data: [DONE]\n\n"
        finally:
            close()
