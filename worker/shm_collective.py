"""All-reduce and all-gather for tensor-parallel ranks on one host, through one shared-memory segment.

gloo over loopback costs ~1 ms per small collective on a 2-core machine (two of them per layer per
decode step); here a rank copies its tensor into its slot, publishes a sequence number, waits for
its peers' numbers and reads their slots: tens of microseconds.

Layout of the segment (one per tensor-parallel group, made by the group's first rank, unlinked by it
once every peer has mapped it, so nothing is left in /dev/shm after any exit):
  [world x 64 B] per rank: int64 sequence number of its last published call, int64 pid
  [2 x world x SLOT_BYTES] data slots, double-buffered by call parity.

Ordering: a rank writes its slot, then its sequence number; a reader reads the number, then the
slots. x86-64 keeps stores in order and loads in order (TSO), so a reader that sees call k's number
sees call k's data; other CPUs use gloo. Reuse: call k+2 overwrites slot parity k%2 only after its
writer passed call k+1's wait, i.e. after every peer published k+1, which each does after reading
call k. Results are summed in rank order, so every rank holds bitwise the same result.

A peer that dies is noticed within POLL_S (its pid is gone) and one that hangs at the collective
timeout: both raise, as a gloo failure would, and the runner exits the process for a restart.
"""

from __future__ import annotations

import os
import platform
import time

import torch

SLOT_BYTES = 2 << 20  # per rank and parity (a 512-token chunk of hidden 1024 fp32); larger ones go through gloo
HEADER = 64  # bytes per rank: sequence number, pid (one cache line each)
POLL_S = 0.05  # how often a waiting rank checks that its peers are alive


def supported(master_addr: str) -> bool:
    """Whether a group meeting at `master_addr` can use shared memory: every rank dialled a loopback
    address, so all live on this host (and this network namespace); x86-64 for the ordering above."""
    if os.environ.get("SHARDSERVE_SHM_COLLECTIVES", "1").lower() in {"0", "off", "false", "no"}:
        return False
    return master_addr.startswith("127.") and platform.machine() in {"x86_64", "AMD64"} and os.path.isdir("/dev/shm")


class ShmCollective:
    def __init__(self, path: str, rank: int, world: int, timeout_s: float, create: bool):
        size = world * HEADER + 2 * world * SLOT_BYTES
        if create:  # the pages reserved now: a full /dev/shm fails here (ENOSPC), never later with SIGBUS
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        self.mem = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        self.head = self.mem[: world * HEADER].view(torch.int64).view(world, HEADER // 8)
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.calls = 0
        self.head[rank, 1] = os.getpid()

    def _slots(self, parity: int, nbytes: int) -> list[torch.Tensor]:
        base = self.world * HEADER + parity * self.world * SLOT_BYTES
        return [self.mem[base + r * SLOT_BYTES: base + r * SLOT_BYTES + nbytes] for r in range(self.world)]

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() * x.element_size() <= SLOT_BYTES

    def exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x` (same shape and dtype on all), in rank order, as views of the segment that
        stay valid until this rank's next call but one."""
        self.calls += 1
        k, nbytes = self.calls, x.numel() * x.element_size()
        slots = self._slots(k % 2, nbytes)
        slots[self.rank].view(x.dtype).view(x.shape).copy_(x)
        self.head[self.rank, 0] = k  # after the data (TSO)
        self._wait(k)
        return [s.view(x.dtype).view(x.shape) for s in slots]

    def _wait(self, k: int) -> None:
        seq = self.head[:, 0]
        start = last_poll = time.monotonic()
        spins = 0
        while int(seq.min()) < k:
            spins += 1
            if spins > 200:
                os.sched_yield()  # let the peer have the core when the machine is oversubscribed
                now = time.monotonic()
                if now - last_poll > POLL_S:
                    last_poll = now
                    self._check_peers(k, now - start)

    def _check_peers(self, k: int, waited: float) -> None:
        for r in range(self.world):
            if int(self.head[r, 0]) >= k:
                continue
            pid = int(self.head[r, 1])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise RuntimeError(f"shared-memory collective {k}: rank {r} (pid {pid}) is gone") from None
            except PermissionError:
                pass
        if waited > self.timeout_s:
            late = [r for r in range(self.world) if int(self.head[r, 0]) < k]
            raise RuntimeError(f"shared-memory collective {k}: ranks {late} did not arrive within {waited:.0f}s")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """In place, like dist.all_reduce: x = sum over ranks, added in rank order."""
        parts = self.exchange(x)
        x.copy_(parts[0])
        for p in parts[1:]:
            x.add_(p)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.exchange(x.contiguous()), dim=-1)
