"""A real local S3 (moto's server, its own process) and a fault-injecting HTTP proxy in front of it.

Used by tests/integration/test_download.py and bench/download.py. Everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from controller.fleet.placement import free_port

# moto does not check signatures; any non-empty pair works. Region is fixed so URLs are predictable.
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    """`python -m moto.server` on a free loopback port; `with MotoServer() as s3: s3.url`."""

    def __init__(self, log_path: Path | None = None, host: str = "127.0.0.1"):
        self.log_path = log_path
        self.host = host  # another address only inside a private network namespace (test_ray.py)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> MotoServer:
        for _ in range(5):  # the free port can be taken between probe and bind: try another
            self.port = free_port()
            log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **TEST_ENV},
            )
            if log is not subprocess.DEVNULL:
                log.close()
            if self._wait_ready(timeout_s):
                return self
            self.stop()
        raise RuntimeError("moto server did not start")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
                conn.request("GET", "/moto-api/reset-auth")  # any path: we only need an HTTP answer
                conn.getresponse().read()
                conn.close()
                return True
            except OSError:
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=TEST_ENV["AWS_REGION"],
            aws_access_key_id=TEST_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def upload_folder(client, folder: Path, bucket: str, prefix: str) -> dict[str, int]:
    """Put every file under `folder` at `prefix` + its relative path; returns {key: size}."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(folder).as_posix()
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        out[key] = path.stat().st_size
    return out


@dataclass
class Faults:
    """What the proxy does wrong. All fields may be changed while it runs (guarded by `lock`)."""

    throttle_next: int = 0  # answer this many upcoming object requests with `throttle_error`
    throttle_error: tuple[int, str] = (503, "SlowDown")  # or e.g. (500, "InternalError")
    corrupt_suffix: str | None = None  # flip one byte in GET bodies of keys ending with this
    stall_suffix: str | None = None  # send half of the body of GETs of this key, then hang
    stalled: threading.Event = field(default_factory=threading.Event)  # set once a GET is hanging
    release: threading.Event = field(default_factory=threading.Event)  # set to drop hanging GETs
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Seen:
    method: str
    key: str  # object key (path-style URL without the bucket), "" for bucket-level calls
    query: str
    status: int


_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te", "trailer"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def _handle(self) -> None:
        proxy, faults = self.server, self.server.faults
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parsed = urllib.parse.urlsplit(self.path)
        parts = urllib.parse.unquote(parsed.path).lstrip("/").split("/", 1)
        key = parts[1] if len(parts) > 1 else ""
        is_object = bool(key)

        with faults.lock:
            throttle = is_object and faults.throttle_next > 0
            if throttle:
                faults.throttle_next -= 1
        if throttle:
            status, code = faults.throttle_error
            err = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>".encode()
            err += b"<Message>Please reduce your request rate.</Message></Error>"
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(err)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(err)
            proxy.record(Seen(self.command, key, parsed.query, status))
            return

        up = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        up.request(self.command, self.path, body=body or None, headers=headers)
        resp = up.getresponse()
        data = resp.read()
        up.close()

        get_obj = self.command == "GET" and is_object and resp.status in (200, 206)
        if get_obj and faults.corrupt_suffix and key.endswith(faults.corrupt_suffix) and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        stall = get_obj and faults.stall_suffix is not None and key.endswith(faults.stall_suffix)

        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        head_len = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", head_len or str(len(data)))
        self.end_headers()
        proxy.record(Seen(self.command, key, parsed.query, resp.status))
        if self.command == "HEAD":
            return
        if stall:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            faults.stalled.set()
            faults.release.wait()
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle


class FaultProxy(ThreadingHTTPServer):
    """HTTP proxy on 127.0.0.1 (own free port) in front of a MotoServer, injecting `Faults`."""

    daemon_threads = True

    def __init__(self, upstream_port: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream_port = upstream_port
        self.faults = Faults()
        self._seen: list[Seen] = []
        self._seen_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def record(self, seen: Seen) -> None:
        with self._seen_lock:
            self._seen.append(seen)

    def seen(self) -> list[Seen]:
        with self._seen_lock:
            return list(self._seen)

    def object_gets(self) -> list[str]:
        """Keys of object GETs answered 200/206, in order (ranged parts count once each)."""
        return [s.key for s in self.seen() if s.method == "GET" and s.key and s.status in (200, 206)]

    def reset(self) -> None:
        """Forget the log and clear every fault (hanging GETs are released)."""
        self.faults.release.set()
        with self._seen_lock:
            self._seen.clear()
        self.faults = Faults()

    def __enter__(self) -> FaultProxy:
        self._thread = threading.Thread(target=self.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.faults.release.set()
        self.shutdown()
        self.server_close()


def dump_seen(proxy: FaultProxy) -> str:
    """The proxy's log as JSON lines, for assertion messages."""
    return "\n".join(json.dumps(s.__dict__) for s in proxy.seen())


BUCKET = "models"


@pytest.fixture(scope="module", autouse=True)
def aws_env(tmp_path_factory):
    """Credentials for the local server only; no user AWS config can leak in."""
    home = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in TEST_ENV.items():
            mp.setenv(name, value)
        mp.setenv("AWS_CONFIG_FILE", str(home / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="module")
def s3(aws_env, tmp_path_factory):
    """A moto S3 server on loopback with the bucket BUCKET."""
    with MotoServer(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server
