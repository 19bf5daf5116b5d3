"""The Ray actor that hosts one rank on its node: it starts the rank's worker as its own child process,
`python -m worker ROLE --config JSON`, exactly as the local executor does, and reports on it.

Nothing of the model passes through Ray: the actor gets an argv (the WorkerConfig as JSON) and the
launch token for the child's environment, and returns pids, ports, exit codes and stderr lines. The
child dies with the actor (parent_pid in its config is the actor's pid: PR_SET_PDEATHSIG plus a poll),
and Ray kills the actor when its owner, the controller, goes away or when its node dies.

This module imports only the standard library (and Ray, through the decorator at the caller): every
node imports it to run the actor; `fetch` (an S3 partition's rank file, before the start) imports
controller/acquire when called, from the shardserve installed on the node. Every method is async, so
they all run on the actor's one event-loop thread, which lives as long as the actor: the thread that
starts the child must outlive it (the death signal fires when the parent *thread* exits).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

TAIL = 2000  # stderr lines kept per rank


class RankHost:
    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL)
        self.seen = 0  # lines read from the child so far (the index of the next one)
        self.drained = False  # the child's stderr reached its end
        self.lock = threading.Lock()
        self.dir = tempfile.mkdtemp(prefix="shardserve-rank-")

    async def facts(self, ports: int) -> dict:
        """This node's address and id, this actor's pid, a scratch folder, and `ports` free TCP ports on
        the node's address (for the leader: its worker.proto port and the rendezvous port)."""
        import ray

        ip = ray.util.get_node_ip_address()
        free = []
        for _ in range(ports):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((ip, 0))
                free.append(s.getsockname()[1])
        return {"ip": ip, "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
                "pid": os.getpid(), "dir": self.dir, "ports": free}

    async def fetch(self, files_json: str, cache_dir: str) -> dict:
        """This rank's files of an S3 partition into `cache_dir` on this node (acquire/rank_fetch.py):
        {"path": the folder the rank loads, "seconds": ...} or {"error": why}."""
        import time

        from controller.acquire.rank_fetch import RankFiles, fetch

        t0 = time.monotonic()
        try:
            path = await asyncio.to_thread(fetch, RankFiles.from_json(files_json), cache_dir)
        except Exception as e:  # noqa: BLE001 - reported to the controller, which fails the start with it
            return {"error": f"{type(e).__name__}: {e}"}
        return {"path": str(path), "seconds": time.monotonic() - t0}

    async def start(self, args: list[str], env: dict[str, str]) -> int:
        self.proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
        threading.Thread(target=self._pump, daemon=True).start()
        return self.proc.pid

    def _pump(self) -> None:
        for line in self.proc.stderr:
            with self.lock:
                self.lines.append(line.rstrip("\n"))
                self.seen += 1
        self.drained = True

    async def wait(self) -> int:
        """Resolves when the rank exits, with its exit status."""
        while self.proc.poll() is None:
            await asyncio.sleep(0.05)
        return self.proc.returncode

    async def read(self, cursor: int) -> tuple[list[str], int, bool]:
        """Lines from index `cursor` on (waits up to a second for some), the next cursor, and whether the
        rank has ended and every line was read."""
        for _ in range(20):
            if self.seen > cursor or self.drained:
                break
            await asyncio.sleep(0.05)
        done = self.drained  # before the copy: no line can follow it then
        with self.lock:
            lines, seen = list(self.lines), self.seen
        return lines[max(0, len(lines) - (seen - cursor)):], seen, done

    async def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    async def kill(self) -> None:
        await self.signal(signal.SIGKILL)

    async def report(self, path: str) -> str:
        """The WorkerReport the rank wrote at `path` (in this actor's folder), or ""."""
        try:
            return Path(path).read_text()
        except OSError:
            return ""
