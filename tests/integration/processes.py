"""What the tests that kill, stop and watch real processes share: polling for a condition, a stream
consumed in a thread, the controller's worker children and whether a pid still lives."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import grpc

from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from worker.config import WorkerConfig


def wait_for(cond, timeout: float, what: str, every: float = 0.05):
    """cond()'s first truthy value, polled every `every` s; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Stream:
    """A GenerateStream call consumed in a thread: messages seen (`tokens`), then how it ended (`code`,
    `details`; None while open) and when (`ended_at`, time.monotonic())."""

    def __init__(self, server, request: gpb.GenerateStreamRequest, timeout: float):
        self.timeout = timeout  # the call's deadline, s: past it the server must have ended the stream
        self.call = gpb_grpc.GenerationStub(server.channel).GenerateStream(request, timeout=timeout)
        self.tokens, self.code, self.details = 0, None, ""
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._consume, daemon=True)
        self.thread.start()

    def _consume(self):
        try:
            for _ in self.call:
                self.tokens += 1
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.code, self.details = e.code(), e.details()
        self.ended_at = time.monotonic()

    def wait(self) -> bool:
        """Whether the stream ended (waits up to its deadline and 10 s more)."""
        self.thread.join(self.timeout + 10)
        return not self.thread.is_alive()

    def ended(self) -> tuple[grpc.StatusCode | None, str]:
        assert self.wait(), "the stream hung past its deadline"
        return self.code, self.details


def workers(controller_pid: int) -> dict[int, WorkerConfig]:
    """pid -> launch config of each worker child of the controller (`python -m worker ROLE --config JSON`,
    worker/config.py), read from their command lines."""
    out = subprocess.run(["pgrep", "-P", str(controller_pid)], capture_output=True, text=True).stdout.split()
    found = {}
    for pid in out:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--config" in args:
            found[int(pid)] = WorkerConfig.from_json(args[args.index(b"--config") + 1].decode())
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False
