"""One model replica: its worker process(es), the channel to its leader, and its supervision.

The controller talks only to the leader (rank 0) over a unix socket. A replica whose worker
dies is marked not ready at once (in-flight calls fail with UNAVAILABLE as the socket closes)
and restarted with exponential backoff, up to `max_restarts`; then it is marked failed.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from shardserve.v1 import worker_pb2 as wpb
from shardserve.v1 import worker_pb2_grpc as wpb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaSpec:
    """How to launch one replica of a model (frozen; per-replica copies via dataclasses.replace)."""

    model_dir: Path
    dtype: str = "fp32"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_bytes: int = 512 << 20
    num_kv_blocks: int = 0
    max_batch_size: int = 32
    max_batch_tokens: int = 2048
    max_model_len: int = 0
    threads: int = 0
    start_timeout_s: float = 900.0
    max_restarts: int = 5

    def worker_args(self, socket_path: str) -> list[str]:
        return [
            sys.executable, "-m", "worker", "shardserve-worker",
            "--model-dir", str(self.model_dir), "--socket", socket_path, "--dtype", self.dtype,
            "--device", self.device, "--block-size", str(self.block_size),
            "--kv-cache-bytes", str(self.kv_cache_bytes), "--num-kv-blocks", str(self.num_kv_blocks),
            "--max-batch-size", str(self.max_batch_size), "--max-batch-tokens", str(self.max_batch_tokens),
            "--max-model-len", str(self.max_model_len), "--threads", str(self.threads),
            "--parent-pid", str(os.getpid()),
        ]


class WorkerStartError(RuntimeError):
    pass


class Replica:
    def __init__(self, name: str, spec: ReplicaSpec, runtime_dir: Path, on_event=None):
        self.name = name
        self.spec = spec
        self.runtime_dir = runtime_dir
        self.socket_path = str(runtime_dir / f"{name}.sock")
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None
        self.stub: wpb_grpc.WorkerStub | None = None
        self.status: wpb.WorkerStatusResponse | None = None
        self.ready = False
        self.state = "starting"  # starting | ready | restarting | failed | stopped
        self.failure = ""
        self.restarts = 0
        self.outstanding = 0  # requests in flight through this replica
        self.lock = threading.Lock()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self.stopping = False
        self.on_event = on_event or (lambda *a: None)  # (event, replica) for metrics/logs

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Launch the worker and block until it answers Status (or fail with its stderr)."""
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self.proc = subprocess.Popen(self.spec.worker_args(self.socket_path), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._pump_stderr, args=(self.proc,), daemon=True).start()
        self.channel = grpc.insecure_channel(f"unix:{self.socket_path}")
        self.stub = wpb_grpc.WorkerStub(self.channel)
        deadline = time.monotonic() + self.spec.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise WorkerStartError(f"worker for {self.name} exited with code {self.proc.returncode} "
                                       f"while loading:\n" + "\n".join(self.stderr_tail))
            if time.monotonic() > deadline:
                self.proc.kill()
                raise WorkerStartError(f"worker for {self.name} not ready after {self.spec.start_timeout_s:.0f}s")
            if os.path.exists(self.socket_path):
                try:
                    self.status = self.stub.Status(wpb.WorkerStatusRequest(), timeout=5)
                    break
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        self.ready, self.state = True, "ready"
        self.on_event("up", self)
        log.info("replica %s ready (pid %d, %s, kernels: %s)", self.name, self.proc.pid,
                 self.status.architecture, self.status.kernel_path)
        threading.Thread(target=self._supervise, args=(self.proc,), daemon=True, name=f"sup-{self.name}").start()

    def _pump_stderr(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.stderr_tail.append(line.rstrip())
            sys.stderr.write(f"[{self.name}] {line}")

    def _supervise(self, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if self.stopping:
            return
        self.ready, self.state = False, "restarting"
        self.on_event("down", self)
        log.error("replica %s: worker exited with code %s", self.name, code)
        while not self.stopping:
            if self.restarts >= self.spec.max_restarts:
                self.state = "failed"
                self.failure = f"worker exited {self.restarts + 1} times; last code {code}"
                log.error("replica %s failed: %s", self.name, self.failure)
                return
            delay = min(30.0, 0.5 * 2 ** self.restarts)
            self.restarts += 1
            self.on_event("restart", self)
            time.sleep(delay)
            try:
                self.start()
                self.proc.wait()  # PR_SET_PDEATHSIG: the new worker lives only while this thread does
                return
            except WorkerStartError as e:
                log.error("replica %s restart failed: %s", self.name, e)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping = True
        self.ready, self.state = False, "stopped"
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.channel:
            self.channel.close()

    # ---- requests -----------------------------------------------------------------------------
    def refresh_status(self) -> wpb.WorkerStatusResponse | None:
        if not self.ready:
            return None
        try:
            self.status = self.stub.Status(wpb.WorkerStatusRequest(), timeout=2)
        except grpc.RpcError:
            return None
        return self.status

    def generate(self, request: wpb.WorkerGenerateRequest, timeout: float | None):
        return self.stub.Generate(request, timeout=timeout)
