"""The controller's HTTP side: health (liveness never depends on load), metrics, and any extra
routes (SageMaker /ping, /invocations) registered by other modules."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

# handler(body: bytes, headers) -> (status, content_type, body bytes | iterator of bytes)
Route = Callable[[bytes, dict], tuple[int, str, object]]


class HttpServer:
    def __init__(self, host: str, port: int, ready: Callable[[], bool], metrics=None, ssl_context=None):
        self.routes: dict[tuple[str, str], Route] = {}
        self.ready = ready
        self.metrics = metrics  # object with exposition() -> (bytes, content_type), or None
        self.add("GET", "/health/live", lambda b, h: (200, "application/json", b'{"status":"live"}'))
        self.add("GET", "/health/ready", self._ready)
        self.add("GET", "/metrics", self._metrics)
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]

    def add(self, method: str, path: str, route: Route) -> None:
        self.routes[(method, path)] = route

    def _ready(self, body, headers):
        ok = self.ready()
        return (200 if ok else 503), "application/json", json.dumps({"ready": ok}).encode()

    def _metrics(self, body, headers):
        if self.metrics is None:
            return 404, "text/plain", b"metrics are not enabled\n"
        data, ctype = self.metrics.exposition()
        return 200, ctype, data

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                log.debug("http: " + fmt, *args)

            def _dispatch(self, method):
                path = self.path.split("?", 1)[0]
                route = server.routes.get((method, path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if route is None:
                    known = any(p == path for _, p in server.routes)
                    status = 405 if known else 404
                    self._send(status, "application/json", json.dumps({"error": f"{method} {path}: not found"
                                                                       if status == 404 else "method not allowed"}).encode())
                    return
                try:
                    status, ctype, payload = route(body, dict(self.headers))
                except Exception as e:  # a route bug is a 500 for this request, never a dead server
                    log.exception("http route %s failed", path)
                    self._send(500, "application/json", json.dumps({"error": str(e)}).encode())
                    return
                if isinstance(payload, (bytes, bytearray)):
                    self._send(status, ctype, payload)
                else:  # streaming: chunked transfer encoding
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        for chunk in payload:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            self.wfile.flush()
                        self.wfile.write(b"0\r\n\r\n")
                    except (BrokenPipeError, ConnectionResetError):  # the client left mid-stream:
                        log.info("http %s: client left mid-stream", path)  # not an error of ours
                        self.close_connection = True
                    finally:
                        close = getattr(payload, "close", None)
                        if close is not None:
                            close()  # a generator's cleanup (admission, the request) runs now

            def _send(self, status, ctype, data):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

        return Handler

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, daemon=True, name="http").start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
