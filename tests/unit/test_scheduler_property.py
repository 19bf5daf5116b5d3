"""Scheduler + block manager + beam groups under random traffic (no model: random logits).

Thousands of random arrivals (plain and beam-search requests, long and short prompts),
cancellations and completions through the real Scheduler, BlockManager and BeamGroup code, with
a KV cache small enough to force preemption. After every step: reference counts equal the live
block tables (no leak, no double free), every scheduled sequence has blocks for its tokens, the
batch respects its row limit; at the end every request finished exactly once and the cache is empty.
"""

import random

import pytest
import torch

from worker.engine.beam import beam_step
from worker.engine.block_manager import BlockManager
from worker.engine.sampler import Sampler
from worker.engine.scheduler import Scheduler, SchedulerConfig, unit_of
from worker.engine.sequence import Finish, Sampling, Sequence, Status

VOCAB = 12
EOS = 11
MAX_LEN = 96


def run_traffic(seed: int, steps: int, drain_limit: int = 20000, speculative: int = 0):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    bm = BlockManager(num_blocks=40, block_size=4)
    cfg = SchedulerConfig(max_batch_size=8, max_batch_tokens=24)
    sched = Scheduler(cfg, bm, MAX_LEN, num_speculative_tokens=speculative)
    sampler = Sampler()
    finished: dict[str, int] = {}
    live: dict[str, Sequence] = {}

    def finish(seq, reason, new=(), lps=(), error=""):
        sched.finish(seq, reason)
        live.pop(seq.request_id, None)
        finished[seq.request_id] = finished.get(seq.request_id, 0) + 1

    def arrive(i):
        beams = rng.choice([1, 1, 1, 2, 3])
        prompt = rng.randint(20, 60) if rng.random() < 0.3 else rng.randint(1, 12)
        sampling = Sampling(max_new_tokens=rng.randint(1, 20), num_beams=beams,
                            eos_token_ids=(EOS,) if rng.random() < 0.5 else ())
        s = Sequence(f"r{i}", [rng.randrange(VOCAB) for _ in range(prompt)], sampling)
        live[s.request_id] = s
        sched.add(s)

    step = 0
    while step < steps or live:
        if step < steps and rng.random() < 0.35 and len(live) < 24:
            arrive(step)
        if step < steps and live and rng.random() < 0.04:  # a client cancels
            finish(live[rng.choice(sorted(live))], Finish.ABORTED)
        batch = sched.schedule()
        rows = len(batch.seqs)
        assert rows <= cfg.max_batch_size or len({id(unit_of(s)[0]) for s in batch.seqs}) == 1
        if any(batch.lookahead):  # random proposals, some of them what the "target" will say
            rows = [i for i, k in enumerate(batch.lookahead) if k]
            sched.set_drafts(batch, [[rng.randrange(VOCAB) for _ in range(rng.randint(0, batch.lookahead[i]))]
                                     for i in rows], [None] * len(rows))
        for s, n in zip(batch.seqs, batch.num_tokens):
            assert n >= 1 and len(s.block_table) * bm.block_size >= s.num_computed + n
        drafts = batch.draft_lists()
        logits = torch.randn(sum(1 + len(d) for d, ok in zip(drafts, batch.samples()) if ok), VOCAB, generator=gen)
        at = 0
        for d, ok in zip(drafts, batch.samples()):
            if ok:
                for j in range(rng.randint(0, len(d))):  # the target agrees with the first few drafts
                    logits[at + j, d[j]] = 10.0
                at += 1 + len(d)
        sched.postprocess(batch, logits, sampler, finish)  # the engine's own update of a step
        bm.check([s.block_table for s in sched.running])
        assert all(not s.block_table and s.status is Status.WAITING for s in sched.waiting)
        step += 1
        assert step < steps + drain_limit, "requests starved: the queue never drained"
    return sched, bm, finished


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_traffic_no_leaks_everyone_finishes_once(seed):
    sched, bm, finished = run_traffic(seed, steps=2500)
    assert bm.num_free == bm.num_blocks and not sched.running and not sched.waiting
    assert finished and set(finished.values()) == {1}
    assert sched.preemptions > 0, "the cache was never short: the test does not exercise preemption"


def test_random_traffic_with_speculative_lookahead():
    sched, bm, finished = run_traffic(3, steps=1500, speculative=3)
    assert bm.num_free == bm.num_blocks and not sched.running and not sched.waiting
    assert finished and set(finished.values()) == {1}
    assert sched.preemptions > 0 and 0 < sched.spec_accepted < sched.spec_proposed


def test_beam_group_shares_prompt_blocks_and_reserves_rows():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), bm)
    beam = Sequence("b", list(range(10)), Sampling(max_new_tokens=5, num_beams=3))
    plain = [Sequence(f"p{i}", [1, 2], Sampling(max_new_tokens=5)) for i in range(2)]
    sched.add(beam)
    for p in plain:
        sched.add(p)
    batch = sched.schedule()
    # the beam request reserves 3 of 4 rows: one plain request fits beside it
    assert batch.seqs == [beam, plain[0]] and list(sched.waiting) == [plain[1]]
    for s, n in zip(batch.seqs, batch.num_tokens):
        s.num_computed += n
    logits = torch.zeros(2, 16)
    logits[0, 5], logits[0, 6], logits[0, 7] = 3.0, 2.0, 1.0
    beam_step(batch.seqs, logits, sched, lambda *a: None, 100)
    group = beam.beam
    assert len(group.beams) == 3 and [b.token_ids[-1] for b in group.beams] == [5, 6, 7]
    prompt_blocks = beam.block_table[:2]  # 10 prompt tokens: 2 full blocks shared, the 3rd partial
    for b in group.beams[1:]:
        assert b.block_table == prompt_blocks and b.num_computed == 8
    assert all(bm.ref_count[x] == 3 for x in prompt_blocks)
    bm.check([s.block_table for s in sched.running])
    sched.finish(beam, Finish.ABORTED)
    sched.finish(plain[0], Finish.ABORTED)
    sched.finish(plain[1], Finish.ABORTED)
    assert bm.num_free == bm.num_blocks
