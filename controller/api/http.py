"""The controller's HTTP side: an ASGI app (Starlette, via FastAPI) served by uvicorn in a thread of its
own with its own event loop, beside the gRPC server in the same process.

Routes: health (liveness never depends on load), /metrics, and whatever other modules register
(SageMaker /ping and /invocations, OpenAI /v1/*, /v1/stats). A generation request runs on the same
path as a gRPC one (service.prepare -> router.admit -> Running.events()); `events()` below turns that
blocking iterator into an async one, from a thread per request, and cancels the run when its consumer
stops early (the client went away, or the response ended): the worker frees the slot at its next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import uvicorn
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from controller.api.service import Event, Running

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20  # a request body over this is refused with 413 before it is parsed

# a plain route: (body, headers) -> (status, content type, body bytes | iterator of bytes), run in a thread
Route = Callable[[bytes, dict], tuple[int, str, object]]
Endpoint = Callable[[Request], Awaitable[Response]]


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The whole body (chunked or not); BodyTooLarge past `limit` bytes. The rest of a too-large body is
    read and dropped (up to 16x the limit) so that the client, still sending, gets the 413."""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > 16 * limit:
            break
        if size <= limit:
            parts.append(chunk)
    if size > limit:
        raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
    return b"".join(parts)


_DONE = object()


async def events(run: Running) -> AsyncIterator[Event]:
    """`run.events()` as an async iterator. The blocking gRPC iteration runs in a thread of its own (one
    per request: a stream may wait minutes for its next token, so a bounded pool would stall others);
    events cross to the loop through a queue. Leaving early (the consumer was cancelled because the client
    disconnected, or it stopped reading) cancels the worker call."""
    run.consumed = True
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (server stopping): nobody is listening
            run.cancel()

    def pump() -> None:
        try:
            for ev in run.events():
                put(ev)
        except BaseException as e:  # noqa: B036 (handed to the consumer, which raises it)
            put(e)
        else:
            put(_DONE)

    threading.Thread(target=pump, daemon=True, name="http-run").start()
    done = False
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                done = True
                return
            if isinstance(item, BaseException):
                done = True
                raise item
            yield item
    finally:
        if not done:
            run.cancel()


async def gather_all(coros: list[Awaitable]) -> list:
    """Results of every coroutine, run at once; the first error (or a cancellation) cancels the rest,
    so no run is left generating for nobody."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


async def until_disconnect(request: Request, work: Awaitable):
    """Await `work` (whose body has been read already); a client that disconnects first cancels it
    (and so the runs it consumes) and gets None."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        return None
    return task.result()


class ClosingStream(StreamingResponse):
    """A StreamingResponse that calls `close()` when the response ends however it ends, also when the
    client left before the body iterator was ever started (whose own `finally` then never runs)."""

    def __init__(self, content, close: Callable[[], None], **kw):
        super().__init__(content, **kw)
        self.close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.close()


def json_response(status: int, obj) -> Response:
    # json.dumps' default separators: clients (and tests) compare /ping's and /health/ready's bytes
    return Response(json.dumps(obj, ensure_ascii=False).encode(), status_code=status, media_type="application/json")


class HttpServer:
    def __init__(self, host: str, port: int, ready: Callable[[], bool], metrics=None,
                 ssl_context: ssl.SSLContext | None = None):
        self.ready = ready
        self.metrics = metrics  # object with exposition() -> (bytes, content_type), or None
        self.error_shapes: list[tuple[str, Callable[[int, str], Response]]] = []  # path prefix -> error body
        self.app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        self.app.add_exception_handler(HTTPException, self._http_error)
        self.add("GET", "/health/live", lambda b, h: (200, "application/json", b'{"status":"live"}'))
        self.add("GET", "/health/ready", self._ready)
        self.add("GET", "/metrics", self._metrics)
        self.sock = _listen(host, port)  # bound now: errors surface here
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                http="h11",
                                ssl_context_factory=(lambda cfg, default: ssl_context) if ssl_context else None,
                                timeout_graceful_shutdown=2)
        self.uvicorn = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def add(self, method: str, path: str, route: Route) -> None:
        """A plain route, run in a worker thread (it may block: e.g. /v1/stats asks every replica)."""
        async def endpoint(request: Request) -> Response:
            try:
                body = await read_body(request)
            except BodyTooLarge as e:
                return self.error(request.url.path, 413, str(e))
            try:
                status, ctype, payload = await run_in_threadpool(route, body, dict(request.headers))
            except Exception as e:  # a route bug is a 500 for this request, never a dead server
                log.exception("http route %s failed", path)
                return self.error(request.url.path, 500, str(e))
            if isinstance(payload, (bytes, bytearray)):
                return Response(bytes(payload), status_code=status, media_type=ctype)
            return StreamingResponse(_iterate_in_thread(payload), status_code=status, media_type=ctype)

        self.add_endpoint(method, path, endpoint)

    def add_endpoint(self, method: str, path: str, endpoint: Endpoint) -> None:
        """An async route: endpoint(request) -> Response, on the server's event loop."""
        self.app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)

    def error_shape(self, prefix: str, make: Callable[[int, str], Response]) -> None:
        """Errors the server itself produces (404, 405, 413) under `prefix` take this body."""
        self.error_shapes.append((prefix, make))

    def error(self, path: str, status: int, message: str) -> Response:
        for prefix, make in self.error_shapes:
            if path.startswith(prefix):
                return make(status, message)
        return json_response(status, {"error": message})

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        message = {404: f"{request.method} {path}: not found", 405: "method not allowed"}.get(
            exc.status_code, str(exc.detail))
        return self.error(path, exc.status_code, message)

    def _ready(self, body, headers):
        ok = self.ready()
        return (200 if ok else 503), "application/json", json.dumps({"ready": ok}).encode()

    def _metrics(self, body, headers):
        if self.metrics is None:
            return 404, "text/plain", b"metrics are not enabled\n"
        data, ctype = self.metrics.exposition()
        return 200, ctype, data

    def start(self) -> None:
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="http")
        self.thread.start()

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose accepted connections have Nagle off: asyncio turns it off only for
    sockets whose proto is IPPROTO_TCP (accepted ones inherit it), and with it on, a response written
    as headers then body waits ~40 ms for the client's delayed ACK."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def _iterate_in_thread(payload) -> AsyncIterator[bytes]:
    """A plain route's blocking iterator of chunks, one next() per thread hop; closed when the client
    leaves (a generator's cleanup runs)."""
    it = iter(payload)
    sentinel = object()
    try:
        while True:
            chunk = await run_in_threadpool(next, it, sentinel)
            if chunk is sentinel:
                return
            yield chunk
    finally:
        close = getattr(payload, "close", None)
        if close is not None:
            await run_in_threadpool(close)
