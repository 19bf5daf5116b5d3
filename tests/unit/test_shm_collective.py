"""The shared-memory tensor-parallel collectives (worker/shm_collective.py): two ranks (threads here,
processes in the TP parity suites) get the same sums and gathers as the plain maths, bitwise the same
on every rank; a peer that is gone is named within a poll, not at the collective timeout."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from worker import shm_collective
from worker.shm_collective import ShmCollective

pytestmark = pytest.mark.skipif(not shm_collective.supported("127.0.0.1"), reason="no /dev/shm or not x86-64")


def pair(tmp_path, timeout_s: float = 30.0) -> list[ShmCollective]:
    path = str(tmp_path / "seg")
    first = ShmCollective(path, 0, 2, timeout_s, create=True)
    return [first, ShmCollective(path, 1, 2, timeout_s, create=False)]


def test_all_reduce_and_gather_match_and_agree_across_ranks(tmp_path):
    ranks = pair(tmp_path)
    g = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(4, 37, generator=g) for _ in range(2)] for _ in range(5)]  # 5 calls x 2 ranks
    out: dict[int, list] = {0: [], 1: []}

    def run(r: int) -> None:
        for call in inputs:
            x = call[r].clone()
            out[r].append((ranks[r].all_reduce(x).clone(), ranks[r].all_gather_last_dim(call[r]).clone()))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for call, (a0, g0), (a1, g1) in zip(inputs, out[0], out[1]):
        assert torch.equal(a0, a1) and torch.equal(a0, call[0] + call[1])
        assert torch.equal(g0, g1) and torch.equal(g0, torch.cat(call, dim=-1))


def test_a_peer_that_is_gone_is_named_within_a_poll(tmp_path):
    ranks = pair(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ranks[1].head[1, 1] = gone.pid  # rank 1 "was" that process and never arrives
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"rank 1 \(pid {gone.pid}\) is gone"):
        ranks[0].all_reduce(torch.ones(8))
    assert time.monotonic() - t0 < 5


def test_a_hung_peer_fails_at_the_timeout(tmp_path):
    ranks = pair(tmp_path, timeout_s=0.3)
    with pytest.raises(RuntimeError, match=r"ranks \[1\] did not arrive"):
        ranks[0].all_reduce(torch.ones(8))


def test_large_or_non_cpu_tensors_are_left_to_gloo(tmp_path):
    r = pair(tmp_path)[0]
    assert r.fits(torch.ones(16, 1024)) and not r.fits(torch.ones(shm_collective.SLOT_BYTES // 4 + 1))
    assert not shm_collective.supported("10.77.0.2")  # another host's rendezvous: gloo
