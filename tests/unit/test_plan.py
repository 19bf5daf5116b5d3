"""The step plan: build_plan's small-step (plain Python) and vectorised paths give the same tensors,
and the linear layers' two weight layouts multiply alike."""

import random

import pytest
import torch

from worker.engine import runner
from worker.engine.block_manager import BlockManager
from worker.engine.runner import build_plan
from worker.engine.scheduler import Scheduler, SchedulerConfig
from worker.engine.sequence import Sampling, Sequence
from worker.layers.linear import choose_layout, prepack, prepacked_linear


def _batches(seed: int, steps: int = 12):
    """Scheduled batches of random traffic (prefill chunks, decodes, several blocks per sequence)."""
    rng = random.Random(seed)
    sched = Scheduler(SchedulerConfig(max_batch_size=6, max_batch_tokens=200), BlockManager(256, 4),
                      prefill_budget=150)
    for i in range(9):
        sched.add(Sequence(f"r{i}", [rng.randrange(1, 90) for _ in range(rng.randrange(1, 60))],
                           Sampling(max_new_tokens=8)))
    for _ in range(steps):
        batch = sched.schedule()
        if not batch.seqs:
            return
        yield batch
        for s, n in zip(batch.seqs, batch.num_tokens):  # as postprocess: advance, append a token when sampled
            done = s.num_computed + n == len(s.token_ids)
            s.num_computed += n
            if done:
                s.token_ids.append(rng.randrange(1, 90))


@pytest.mark.parametrize("seed", range(4))
def test_small_step_plan_equals_the_vectorised_one(seed, monkeypatch):
    for batch in _batches(seed):
        monkeypatch.setattr(runner, "SMALL_STEP_TOKENS", 1 << 20)
        small = build_plan(batch, 4)
        monkeypatch.setattr(runner, "SMALL_STEP_TOKENS", -1)
        big = build_plan(batch, 4)
        for f in small.__dataclass_fields__:
            a, b = getattr(small, f), getattr(big, f)
            assert a.dtype == b.dtype == torch.long and a.shape == b.shape and torch.equal(a, b), f


@pytest.mark.parametrize("layout", ["onednn", "blas"])
def test_both_weight_layouts_multiply_like_linear(layout):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    torch.manual_seed(0)
    w, b = torch.randn(96, 40), torch.randn(96)
    packed = prepack(w, layout)
    for x in (torch.randn(1, 40), torch.randn(7, 40), torch.randn(2, 3, 40)):
        torch.testing.assert_close(prepacked_linear(x, packed, None), torch.nn.functional.linear(x, w),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prepacked_linear(x, packed, b), torch.nn.functional.linear(x, w, b),
                                   rtol=1e-5, atol=1e-5)
    layout, copy = choose_layout(w)
    assert layout in ("onednn", "blas") and copy.is_mkldnn == (layout == "onednn")
