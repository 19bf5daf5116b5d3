"""Block manager and scheduler: allocation, admission, preemption, no leaks."""

import random

from worker.engine.block_manager import BlockManager
from worker.engine.scheduler import Scheduler, SchedulerConfig
from worker.engine.sequence import Finish, Sampling, Sequence


def seq(i, n, max_new=4):
    return Sequence(f"r{i}", list(range(1, n + 1)), Sampling(max_new_tokens=max_new))


def test_allocate_and_release_round_trip():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(0, 10)
    bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free == 5
    bm.allocate(s, 12)  # still fits in 3 blocks
    assert len(s.block_table) == 3
    bm.allocate(s, 13)
    assert len(s.block_table) == 4
    bm.release(s)
    assert bm.num_free == 8 and s.block_table == []


def test_admission_respects_batch_size_and_token_budget():
    sched = Scheduler(SchedulerConfig(max_batch_size=2, max_batch_tokens=10), BlockManager(64, 4))
    for i in range(3):
        sched.add(seq(i, 6))
    batch = sched.schedule()
    # first prompt fits whole (6), second gets the rest of the budget as a chunk (4); third waits
    assert [s.request_id for s in batch.seqs] == ["r0", "r1"] and batch.num_tokens == [6, 4]
    assert batch.samples() == [True, False]
    assert len(sched.waiting) == 1


def test_preemption_instead_of_failure_when_blocks_run_out():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), bm)
    a, b = seq(0, 8), seq(1, 8)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and bm.num_free == 0
    for s, n in zip(batch.seqs, batch.num_tokens):
        s.num_computed += n
        s.token_ids.append(99)  # each needs a 3rd block now
    batch = sched.schedule()
    assert batch.seqs == [a] and sched.preemptions == 1
    assert b.num_computed == 0 and b.block_table == [] and sched.waiting[0] is b


def test_random_traffic_leaks_no_blocks_and_finishes_everyone_once():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=4)
    sched = Scheduler(SchedulerConfig(max_batch_size=6, max_batch_tokens=32), bm)
    finished: dict[str, int] = {}
    live: list[Sequence] = []
    for step in range(3000):
        if rng.random() < 0.3 and len(live) < 30:
            s = seq(step, rng.randint(1, 40), max_new=rng.randint(1, 20))
            live.append(s)
            sched.add(s)
        if live and rng.random() < 0.05:  # cancellation
            s = rng.choice(live)
            sched.finish(s, Finish.ABORTED)
            live.remove(s)
            finished[s.request_id] = finished.get(s.request_id, 0) + 1
        batch = sched.schedule()
        for s, n, samples in zip(batch.seqs, batch.num_tokens, batch.samples()):
            s.num_computed += n
            if samples:
                s.token_ids.append(7)
                if s.num_generated >= s.sampling.max_new_tokens:
                    sched.finish(s, Finish.LENGTH)
                    live.remove(s)
                    finished[s.request_id] = finished.get(s.request_id, 0) + 1
        used = sum(len(s.block_table) for s in sched.running)
        assert used == bm.num_used, "every used block belongs to a running sequence"
    for s in list(live):
        sched.finish(s, Finish.ABORTED)
        finished[s.request_id] = finished.get(s.request_id, 0) + 1
    assert bm.num_free == bm.num_blocks
    assert all(v == 1 for v in finished.values())


def test_decodes_first_then_prompt_chunks_within_the_prefill_budget():
    sched = Scheduler(SchedulerConfig(max_batch_size=8, max_batch_tokens=2048), BlockManager(256, 4), prefill_budget=64)
    long = Sequence("long", list(range(100)), Sampling(max_new_tokens=4))
    sched.add(long)
    batch = sched.schedule()
    assert batch.seqs == [long] and batch.num_tokens == [64]  # one chunk of the budget
    long.num_computed += 64
    short = [Sequence(f"s{i}", [1] * 10, Sampling(max_new_tokens=4)) for i in range(6)]
    for s in short:
        sched.add(s)
    batch = sched.schedule()  # the running prompt's next chunk first, then admissions, 64 tokens in all
    assert batch.seqs == [long, short[0], short[1], short[2]] and batch.num_tokens == [36, 10, 10, 8]
    for s, n in zip(batch.seqs, batch.num_tokens):
        s.num_computed += n
        if s.num_computed == len(s.token_ids):
            s.token_ids.append(7)  # sampled: now decoding
    batch = sched.schedule()  # the three decoding streams come first, one token each
    assert batch.seqs[:3] == [long, short[0], short[1]] and batch.num_tokens[:3] == [1, 1, 1]
    assert batch.seqs[3:] == [short[2], short[3], short[4], short[5]] and sum(batch.num_tokens[3:]) <= 64
