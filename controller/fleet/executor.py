"""Where a replica's ranks run: an executor starts a group of rank processes and hands back handles.

Two executors share one contract, so supervision (controller/fleet/replica.py) reads the same for both:

  local  every rank is a child process of the controller on this machine (placement.py divides the
         cores or GPUs); the leader serves worker.proto on a unix socket (the default)
  ray    every rank is a process started on its node by a Ray actor, the replica's ranks reserved
         by one placement group (controller/fleet/ray_executor.py); the leader serves worker.proto
         on its node's address over TCP

Either way a rank is `python -m worker ROLE --config JSON` (worker/config.py WorkerConfig) with the
launch token in its environment, and the controller talks only to the leader.

A RankProcess is what Replica needs of a running rank (a subprocess.Popen has the first five):
`pid`, `poll()`, `kill()`, `terminate()`, `wait(timeout)`, plus `node` (where it runs, for `admin
describe`), `lines()` (its stderr, line by line, until it ends) and `report()` (the WorkerReport it
wrote before a failure exit, or None).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from controller.fleet.placement import Placement, place
from worker.config import TOKEN_ENV, WorkerReport

EXECUTORS = ("local", "ray")
PLACEMENT_STRATEGIES = ("pack", "spread", "strict-spread")


class WorkerStartError(RuntimeError):
    """A replica's ranks could not be started or did not become ready; the message says why."""


class RankProcess(Protocol):
    pid: int
    node: str

    def poll(self) -> int | None: ...
    def kill(self) -> None: ...
    def terminate(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def lines(self) -> Iterator[str]: ...
    def report(self) -> WorkerReport | None: ...


@dataclass
class RankGroup:
    """One launch of a replica's ranks. `target` is the leader's gRPC address; `channel_options` the
    controller's options for that channel and `credentials` its TLS (None: plaintext); `close()` stops
    every rank and frees what the launch held."""

    ranks: list  # of RankProcess, index = global rank
    target: str
    placement: Placement | None = None
    channel_options: list = field(default_factory=list)
    credentials: object = None  # grpc.ChannelCredentials for a leader that serves TLS
    listening: object = None  # () -> bool: the leader may answer now (local: its socket exists)

    def leader_listening(self) -> bool:
        return self.listening() if self.listening else True

    def close(self, timeout: float = 10.0) -> None:
        for p in self.ranks:
            if p.poll() is None:
                p.kill()
        for p in self.ranks:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass  # logged by the caller's next look (poll is still None)


def worker_argv(config_json: str, rank: int) -> list[str]:
    role = "shardserve-worker" if rank == 0 else f"shardserve-rank{rank}"
    return ["-m", "worker", role, "--config", config_json]


class LocalRank:
    """A rank that is a child process of the controller."""

    node = "local"

    def __init__(self, proc: subprocess.Popen, report_path: str):
        self.proc, self.report_path, self.pid = proc, report_path, proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        self.proc.kill()

    def terminate(self) -> None:
        self.proc.terminate()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def lines(self) -> Iterator[str]:
        yield from self.proc.stderr

    def report(self) -> WorkerReport | None:
        return WorkerReport.read(self.report_path)


class LocalExecutor:
    """Every rank a child process of this one (placement.py: cores or GPUs divided between them)."""

    name = "local"

    def launch(self, replica, token: str, native_kernels: bool) -> RankGroup:
        spec, socket_path = replica.spec, replica.socket_path
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        placement = place(spec.tp, spec.pp, spec.device, spec.threads)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", TOKEN_ENV: token}
        ranks = []
        for rank in placement.ranks:
            report = str(Path(replica.runtime_dir) / f"{replica.name}-rank{rank.rank}.report.json")
            if os.path.exists(report):
                os.unlink(report)
            config = spec.rank_config(rank, socket_path, placement.master_port, report, native_kernels)
            proc = subprocess.Popen([sys.executable, *worker_argv(config.to_json(), rank.rank)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, env=env)
            ranks.append(LocalRank(proc, report))
        return RankGroup(ranks=ranks, target=f"unix:{socket_path}", placement=placement,
                         listening=lambda: os.path.exists(socket_path))


def executor_for(name: str, spec=None):
    """The executor named `name` (one of EXECUTORS); Ray is imported only when asked for."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        from controller.fleet.ray_executor import RayExecutor

        return RayExecutor(spec)
    raise ValueError(f"executor {name!r}: expected one of {', '.join(EXECUTORS)}")
