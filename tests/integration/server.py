"""Run `shardserve serve` as a real subprocess on free loopback ports, for integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from controller.fleet.placement import free_port

ROOT = Path(__file__).resolve().parents[2]
# a test chat template (the demo tokenizer has none): <|role|>content</s> per message
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def with_demo(cache: Path, demo_cache: Path) -> Path:
    """`cache` (a module's own: its downloads, partitions, logs) holding a link to the demo model already
    built in `demo_cache` (tests/conftest.py): a server on it skips the build (~5 s, more on CI)."""
    from controller.acquire.demo_model import DEMO_VERSION

    (Path(cache) / DEMO_VERSION).symlink_to(Path(demo_cache) / DEMO_VERSION)
    return Path(cache)


class ServerProcess:
    def __init__(self, *args: str, cache_dir: Path, timeout: float = 300.0, env: dict | None = None,
                 launcher: tuple[str, ...] = ("-m", "controller.cli")):
        self.port, self.http_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = Path(cache_dir) / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, *launcher, "serve", "--port", str(self.port),
               "--http-port", str(self.http_port), "--cache-dir", str(cache_dir), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_path.read_text()}")
            time.sleep(0.2)
        self.channel = grpc.insecure_channel(self.address)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def http(self, path: str, data: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return None, b""

    def ready(self) -> bool:
        status, _ = self.http("/health/ready")
        return status == 200

    def stats(self) -> dict:
        return json.loads(self.http("/v1/stats")[1])

    def stop(self, sig: str = "term", timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate() if sig == "term" else self.proc.kill()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "channel"):
            self.channel.close()
        self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
