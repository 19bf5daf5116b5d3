"""One model replica: its worker processes (TP x PP ranks), the channel to its leader, and its
supervision.

The controller talks only to the leader (rank 0): over a unix socket when the ranks are its children
(the local executor), over TCP to the leader's node when Ray placed them (controller/fleet/executor.py);
the ranks talk among themselves over torch.distributed. The layout is checked before any process starts.

Supervision (one thread per replica, which also launches the ranks, so that the workers'
parent-death signal stays armed for the replica's life): every rank is watched. A rank that exits,
or an engine that completes no step for `watchdog_s` while requests wait, brings the whole group
down at once: every rank is SIGKILLed (with Ray: its actor killed, its placement group removed, a
dead node's ranks counted dead), so the leader's socket closes and in-flight calls fail with
UNAVAILABLE within seconds; readiness drops; the group is relaunched with exponential backoff, up
to `max_restarts`, after which the replica is marked failed with the reason.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from controller.fleet.executor import (
    EXECUTORS,
    PLACEMENT_STRATEGIES,
    RankGroup,
    WorkerStartError,
    executor_for,
)
from controller.fleet.placement import Placement, RankPlacement, check_layout
from controller.fleet.session import SessionCall, WorkerSession
from shardserve.v1 import worker_pb2 as wpb
from shardserve.v1 import worker_pb2_grpc as wpb_grpc
from worker.config import NATIVE_WARMUP, TOKEN_METADATA, ConfigError, WorkerConfig, WorkerReport

__all__ = ["Replica", "ReplicaSpec", "WorkerStartError"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaSpec(WorkerConfig):
    """How to launch and supervise one replica of a model: the workers' launch contract (every engine
    and layout field and default is WorkerConfig's) plus the supervisor's own settings. Frozen;
    per-replica and per-rank copies via dataclasses.replace."""

    start_timeout_s: float = 900.0
    max_restarts: int = 5
    watchdog_s: float = 120.0  # no engine step for this long while requests wait = hung group
    restart_backoff_s: float = 0.5  # first restart delay; doubles per restart, at most 30 s
    executor: str = "local"  # local (children of the controller) | ray (a placement group across nodes)
    placement_strategy: str = "pack"  # ray: pack | spread | strict-spread (one rank per node)
    ray_address: str = ""  # ray: host:port or "auto"; "" = this machine's cluster, else a local Ray
    # ray, with tls_cert/tls_key (the leader's, on its node): the PEM file on this host that the controller
    # trusts for the leader's certificate, and the name it checks there (the controller dials node IPs)
    worker_tls_ca: str = ""
    worker_tls_name: str = ""
    # ray, an S3 partition: per rank, what it fetches on its node (acquire/rank_fetch.py RankFiles as JSON)
    # into node_cache_dir there (the controller's --cache-dir path); () = every rank reads model_dir as is
    rank_files: tuple[str, ...] = ()
    node_cache_dir: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (("executor", self.executor, EXECUTORS),
                                     ("placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES)):
            if value not in allowed:
                raise ConfigError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
        if self.rank_files and (self.executor != "ray" or len(self.rank_files) != self.world_size):
            raise ConfigError(f"rank_files: {len(self.rank_files)} for {self.world_size} ranks on executor "
                              f"{self.executor}; only the Ray executor fetches rank files on the nodes")
        if self.tls_cert and not (self.worker_tls_ca and self.worker_tls_name):
            raise ConfigError("tls_cert: the leader's TLS needs worker_tls_ca and worker_tls_name on the controller")

    def rank_config(self, rank: RankPlacement, socket_path: str, master_port: int = 0, report_path: str = "",
                    native_kernels: bool = True, auth_token: str = "") -> WorkerConfig:
        """The WorkerConfig one rank is launched with."""
        return dataclasses.replace(
            WorkerConfig(**self.worker_fields()), rank=rank.rank, device=rank.device, threads=rank.threads,
            cpus=rank.cpus, socket=socket_path, master_port=master_port, parent_pid=os.getpid(),
            report_path=report_path, native_kernels=native_kernels and self.native_kernels, auth_token=auth_token)

    def worker_args(self, socket_path: str, rank: RankPlacement | None = None, master_port: int = 0,
                    report_path: str = "", native_kernels: bool = True) -> list[str]:
        from controller.fleet.executor import worker_argv

        rank = rank or RankPlacement(rank=0, tp_rank=0, pp_rank=0, device=self.device, threads=self.threads)
        config = self.rank_config(rank, socket_path, master_port, report_path, native_kernels)
        return [sys.executable, *worker_argv(config.to_json(), rank.rank)]


# Status codes of a leader that is still coming up (its socket not yet served, or busy); any other
# answer to Status while starting is final and fails the start at once (not after start_timeout_s).
STARTING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# gRPC's words for a TLS handshake that reached the leader and failed (a wrong CA or name): final too
TLS_REFUSED = ("Tls handshake failed", "Hostname Verification Check failed", "CERTIFICATE_VERIFY_FAILED")


class Replica:
    def __init__(self, name: str, spec: ReplicaSpec, runtime_dir: Path, on_event=None):
        self.name = name
        self.spec = spec
        self.runtime_dir = runtime_dir
        self.socket_path = str(runtime_dir / f"{name}.sock")
        self.procs: list = []  # executor.RankProcess per global rank
        self.group: RankGroup | None = None
        self.placement: Placement | None = None
        self.executor = executor_for(spec.executor, spec)
        self.channel: grpc.Channel | None = None
        self.stub: wpb_grpc.WorkerStub | None = None
        self.session: WorkerSession | None = None  # every request of this launch over one call
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
        self.metadata: tuple = ()  # the launch token as gRPC metadata (set by _launch)
        self.torch_only = False  # set when native kernels failed a warm-up: ranks start on the torch path

    @property
    def proc(self):
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
        spec = self.spec
        self.token = secrets.token_urlsafe(32)  # per launch: the ranks refuse callers without it
        self.metadata = ((TOKEN_METADATA, self.token),)
        self.procs, self.group = [], None  # a failed launch leaves nothing to close twice
        self.group = self.executor.launch(self, self.token, native_kernels=not self.torch_only)
        self.procs, self.placement = self.group.ranks, self.group.placement
        for rank, proc in enumerate(self.procs):
            threading.Thread(target=self._pump_stderr, args=(proc, rank), daemon=True).start()
        if self.channel is not None:
            self.channel.close()  # ends the last launch's session call, failing what was left on it
        target, options, creds = self.group.target, self.group.channel_options, self.group.credentials
        self.channel = grpc.secure_channel(target, creds, options=options) if creds else \
            grpc.insecure_channel(target, options=options)
        self.stub = wpb_grpc.WorkerStub(self.channel)
        self.session = WorkerSession(self.stub, self.metadata, self.name)
        deadline = time.monotonic() + spec.start_timeout_s
        while True:
            dead = self._dead_rank()
            if dead is not None:
                r, code = dead
                # the leader's exit takes its peers down with it: look at every rank, not the first dead
                if any(rep.failure == NATIVE_WARMUP for rep in self._reports()) and not self.torch_only:
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
            if self.group.leader_listening():
                try:
                    self.status = self.stub.Status(wpb.WorkerStatusRequest(), timeout=5, metadata=self.metadata)
                    break
                except grpc.RpcError as e:
                    if e.code() not in STARTING:  # a worker that answers with an error will not get better
                        raise WorkerStartError(f"worker for {self.name} answered Status with {e.code().name}: "
                                               f"{e.details()}") from None
                    if self.group.credentials is not None and any(m in (e.details() or "") for m in TLS_REFUSED):
                        raise WorkerStartError(f"the leader of {self.name} at {self.group.target} serves TLS, but "
                                               "its certificate fails the controller's check (--worker-tls-ca, "
                                               f"--worker-tls-name): {e.details()}") from None
            time.sleep(0.02)  # a few stat calls per poll: a ready leader is seen within 20 ms
        self.ready, self.state = True, "ready"
        self.on_event("up", self)
        sizes = ", ".join(f"rank {r.rank}: {r.parameter_bytes / 1e6:.1f} MB" for r in self.status.ranks)
        where = "" if self.executor.name == "local" else f" via {self.executor.name}, leader at {self.group.target}"
        log.info("replica %s ready (tp=%d pp=%d, leader pid %d%s, %s, kernels: %s; parameters %s)", self.name,
                 spec.tp, spec.pp, self.procs[0].pid, where, self.status.architecture, self.status.kernel_path, sizes)

    def alive(self) -> bool:
        """The leader process has not exited. Checked when routing, so that no request goes to a rank
        that died in the instant before the supervisor (polling every 0.1 s) marks the replica down."""
        proc = self.proc
        return proc is None or proc.poll() is None

    def _reports(self) -> list[WorkerReport]:
        """What the ranks that stopped said about why (worker/config.py WorkerReport)."""
        found = (p.report() for p in self.procs)
        return [rep for rep in found if rep is not None]

    def _pump_stderr(self, proc, rank: int) -> None:
        for line in proc.lines():
            line = line.rstrip()
            self.stderr_tail.append(line)
            sys.stderr.write(f"[{self.name}/{rank}] {line}\n")

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
                lost = getattr(self.procs[dead[0]], "lost", "")  # Ray: the actor or its node is gone
                return f"rank {dead[0]} exited with code {dead[1]}" + (f" ({lost})" if lost else "")
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + 1.0
                try:
                    st = self.stub.Status(wpb.WorkerStatusRequest(), timeout=2, metadata=self.metadata)
                    self.status, last_ok = st, now
                    pending = st.stats.running + st.stats.waiting
                    if st.stats.steps_total != last_steps or not pending:
                        last_steps, last_progress = st.stats.steps_total, now
                    elif now - last_progress > self.spec.watchdog_s:
                        return (f"no engine step for {now - last_progress:.0f}s with {pending} requests "
                                f"pending (step watchdog {self.spec.watchdog_s:g}s)")
                except grpc.RpcError as e:
                    if now - last_ok > self.spec.watchdog_s:
                        return (f"leader not answering Status for {now - last_ok:.0f}s (step watchdog "
                                f"{self.spec.watchdog_s:g}s): {e.code().name}")
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
        if self.group is not None:
            self.group.close(10)
        for p in self.procs:
            if p.poll() is None:
                log.error("rank pid %d on %s did not exit after SIGKILL", p.pid, p.node)

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
            self.status = self.stub.Status(wpb.WorkerStatusRequest(), timeout=2, metadata=self.metadata)
        except grpc.RpcError:
            return None
        return self.status

    def generate(self, request: wpb.WorkerGenerateRequest, timeout: float | None) -> SessionCall:
        """Start one request on this replica's session (controller/fleet/session.py)."""
        return self.session.generate(request, timeout)
