"""One model replica: its worker processes (TP x PP ranks), the channel to its leader, and its
supervision.

The controller talks only to the leader (rank 0) over a unix socket; the ranks talk among
themselves over torch.distributed. The layout is checked before any process starts.

Supervision (one thread per replica, which also launches the ranks, so that the workers'
parent-death signal stays armed for the replica's life): every rank is watched. A rank that exits,
or an engine that completes no step for `watchdog_s` while requests wait, brings the whole group
down at once: every rank is SIGKILLed, so the leader's socket closes and in-flight calls fail with
UNAVAILABLE within seconds; readiness drops; the group is relaunched with exponential backoff, up
to `max_restarts`, after which the replica is marked failed with the reason.
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

from controller.fleet.placement import Placement, RankPlacement, check_layout, place
from shardserve.v1 import worker_pb2 as wpb
from shardserve.v1 import worker_pb2_grpc as wpb_grpc
from worker import NATIVE_WARMUP_EXIT  # a rank exiting with it: restart the group on the torch path

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
    threads: int = 0  # torch threads per rank; 0 = the rank's share of the cores
    start_timeout_s: float = 900.0
    max_restarts: int = 5
    tensor_parallel: int = 1  # ranks per pipeline stage (option.tensor_parallel_degree, --tp)
    pipeline_parallel: int = 1  # pipeline stages (option.pipeline_parallel_degree, --pp)
    stage_layers: tuple[int, ...] = ()  # layers per pipeline stage; () = balanced
    collective_timeout_s: float = 60.0  # a collective waiting longer fails and ends the rank
    watchdog_s: float = 120.0  # no engine step for this long while requests wait = hung group
    restart_backoff_s: float = 0.5  # first restart delay; doubles per restart, at most 30 s
    quantize: str | None = None  # None | "int8" | "int4": weight-only quantization (worker --quantize)

    @property
    def tp(self) -> int:
        return self.tensor_parallel

    @property
    def pp(self) -> int:
        return self.pipeline_parallel

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def worker_args(self, socket_path: str, rank: RankPlacement | None = None, master_port: int = 0) -> list[str]:
        rank = rank or RankPlacement(rank=0, tp_rank=0, pp_rank=0, device=self.device, threads=self.threads)
        args = [
            sys.executable, "-m", "worker", "shardserve-worker" if rank.rank == 0 else f"shardserve-rank{rank.rank}",
            "--model-dir", str(self.model_dir), "--socket", socket_path, "--dtype", self.dtype,
            "--device", rank.device, "--block-size", str(self.block_size),
            "--kv-cache-bytes", str(self.kv_cache_bytes), "--num-kv-blocks", str(self.num_kv_blocks),
            "--max-batch-size", str(self.max_batch_size), "--max-batch-tokens", str(self.max_batch_tokens),
            "--max-model-len", str(self.max_model_len), "--threads", str(rank.threads),
            "--parent-pid", str(os.getpid()),
            "--rank", str(rank.rank), "--tp", str(self.tp), "--pp", str(self.pp),
            "--master-port", str(master_port), "--collective-timeout", str(self.collective_timeout_s),
        ]
        if self.quantize:
            args += ["--quantize", self.quantize]
        if self.stage_layers:
            args += ["--stage-layers", ",".join(str(n) for n in self.stage_layers)]
        if rank.cpus:
            args += ["--cpus", ",".join(str(c) for c in rank.cpus)]
        return args


class WorkerStartError(RuntimeError):
    pass


class Replica:
    def __init__(self, name: str, spec: ReplicaSpec, runtime_dir: Path, on_event=None):
        self.name = name
        self.spec = spec
        self.runtime_dir = runtime_dir
        self.socket_path = str(runtime_dir / f"{name}.sock")
        self.procs: list[subprocess.Popen] = []  # index = global rank
        self.placement: Placement | None = None
        self.channel: grpc.Channel | None = None
        self.stub: wpb_grpc.WorkerStub | None = None
        self.status: wpb.WorkerStatusResponse | None = None
        self.ready = False
        self.state = "starting"  # starting | ready | restarting | failed | stopped
        self.failure = ""
        self.last_down_reason = ""
        self.restarts = 0
        self.outstanding = 0  # requests in flight through this replica
        self.lock = threading.Lock()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self.stopping = False
        self._stop_event = threading.Event()
        self.on_event = on_event or (lambda *a: None)  # (event, replica) for metrics/logs
        self.torch_only = False  # set when native kernels failed a warm-up: ranks start with SHARDSERVE_NATIVE=0

    @property
    def proc(self) -> subprocess.Popen | None:
        """The leader's process."""
        return self.procs[0] if self.procs else None

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Check the layout, launch every rank, block until the leader answers Status (or raise
        with the failing rank's stderr). Raises LayoutError before any process starts."""
        check_layout(self.spec.model_dir, self.spec.tp, self.spec.pp, self.spec.stage_layers)
        started = threading.Event()
        result: list[BaseException | None] = []

        def run():
            try:
                self._launch()
                result.append(None)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                result.append(e)
                self._kill_all()
                return
            finally:
                started.set()
            self._supervise()

        threading.Thread(target=run, daemon=True, name=f"sup-{self.name}").start()
        started.wait()
        if result[0] is not None:
            raise result[0]

    def _launch(self) -> None:
        """Start every rank (from the supervising thread) and wait for the leader."""
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        spec = self.spec
        self.placement = place(spec.tp, spec.pp, spec.device, spec.threads)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.torch_only:
            env["SHARDSERVE_NATIVE"] = "0"
        self.procs = []
        for rank in self.placement.ranks:
            proc = subprocess.Popen(spec.worker_args(self.socket_path, rank, self.placement.master_port),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, env=env)
            self.procs.append(proc)
            threading.Thread(target=self._pump_stderr, args=(proc, rank.rank), daemon=True).start()
        if self.channel is not None:
            self.channel.close()
        self.channel = grpc.insecure_channel(f"unix:{self.socket_path}")
        self.stub = wpb_grpc.WorkerStub(self.channel)
        deadline = time.monotonic() + spec.start_timeout_s
        while True:
            dead = self._dead_rank()
            if dead is not None:
                r, code = dead
                # the leader's exit takes its peers down with it: look at every rank, not the first dead
                if any(p.poll() == NATIVE_WARMUP_EXIT for p in self.procs) and not self.torch_only:
                    log.warning("replica %s: native kernels failed at warm-up; restarting every rank on the "
                                "torch path (SHARDSERVE_NATIVE=0)", self.name)
                    self._kill_all()
                    self.torch_only = True
                    return self._launch()
                raise WorkerStartError(f"rank {r} of {self.name} exited with code {code} while loading:\n"
                                       + "\n".join(self.stderr_tail))
            if self.stopping:
                raise WorkerStartError(f"{self.name} stopped while starting")
            if time.monotonic() > deadline:
                raise WorkerStartError(f"worker for {self.name} not ready after {spec.start_timeout_s:.0f}s")
            if os.path.exists(self.socket_path):
                try:
                    self.status = self.stub.Status(wpb.WorkerStatusRequest(), timeout=5)
                    break
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        self.ready, self.state = True, "ready"
        self.on_event("up", self)
        sizes = ", ".join(f"rank {r.rank}: {r.parameter_bytes / 1e6:.1f} MB" for r in self.status.ranks)
        log.info("replica %s ready (tp=%d pp=%d, leader pid %d, %s, kernels: %s; parameters %s)", self.name,
                 spec.tp, spec.pp, self.procs[0].pid, self.status.architecture, self.status.kernel_path, sizes)

    def _pump_stderr(self, proc: subprocess.Popen, rank: int) -> None:
        for line in proc.stderr:
            self.stderr_tail.append(line.rstrip())
            sys.stderr.write(f"[{self.name}/{rank}] {line}")

    def _dead_rank(self) -> tuple[int, int] | None:
        for r, p in enumerate(self.procs):
            code = p.poll()
            if code is not None:
                return r, code
        return None

    def _watch(self) -> str:
        """Block while the group is healthy; returns why it is not."""
        last_steps, last_progress, last_ok = -1, time.monotonic(), time.monotonic()
        next_poll = 0.0
        while not self.stopping:
            dead = self._dead_rank()
            if dead is not None:
                return f"rank {dead[0]} exited with code {dead[1]}"
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + 1.0
                try:
                    st = self.stub.Status(wpb.WorkerStatusRequest(), timeout=2)
                    self.status, last_ok = st, now
                    pending = st.stats.running + st.stats.waiting
                    if st.stats.steps_total != last_steps or not pending:
                        last_steps, last_progress = st.stats.steps_total, now
                    elif now - last_progress > self.spec.watchdog_s:
                        return (f"no engine step for {now - last_progress:.0f}s with {pending} requests "
                                f"pending (step watchdog {self.spec.watchdog_s:g}s)")
                except grpc.RpcError as e:
                    if now - last_ok > self.spec.watchdog_s:
                        return f"leader not answering Status for {now - last_ok:.0f}s: {e.code().name}"
            time.sleep(0.1)
        return "stopping"

    def _supervise(self) -> None:
        while True:
            reason = self._watch()
            if self.stopping:
                return
            self.last_down_reason = reason
            self.ready, self.state = False, "restarting"
            self.on_event("down", self)
            log.error("replica %s down: %s; stopping all %d ranks", self.name, reason, len(self.procs))
            self._kill_all()
            while True:
                if self.stopping:
                    return
                if self.restarts >= self.spec.max_restarts:
                    self.state = "failed"
                    self.failure = f"gave up after {self.restarts} restarts; last failure: {reason}"
                    log.error("replica %s failed: %s", self.name, self.failure)
                    return
                delay = min(30.0, self.spec.restart_backoff_s * 2 ** self.restarts)
                self.restarts += 1
                self.on_event("restart", self)
                if self._stop_event.wait(delay):
                    return
                try:
                    self._launch()
                    break
                except WorkerStartError as e:
                    reason = str(e).splitlines()[0]
                    log.error("replica %s restart failed: %s", self.name, e)
                    self._kill_all()

    def _kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                log.error("rank pid %d did not exit after SIGKILL", p.pid)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the leader (it tells the other ranks to stop), then make sure every rank is gone."""
        self.stopping = True
        self._stop_event.set()
        self.ready, self.state = False, "stopped"
        if self.procs and self.procs[0].poll() is None:
            self.procs[0].terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        self._kill_all()
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
