"""Prefix caching in the block manager and at admission: hash chain, refcounts, LRU eviction,
referenced blocks never evicted, preemption then re-admission hitting the cache."""

import random

from worker.engine.block_manager import BlockManager, block_hash
from worker.engine.scheduler import Scheduler, SchedulerConfig
from worker.engine.sequence import Finish, Sampling, Sequence


def seq(name, tokens, max_new=4):
    return Sequence(name, list(tokens), Sampling(max_new_tokens=max_new))


def prefill(bm: BlockManager, s: Sequence) -> None:
    """What admission and one step do for a lone sequence: reuse, allocate, compute, commit."""
    s.num_computed = bm.reuse(s)
    bm.allocate(s, len(s.token_ids))
    s.num_computed = len(s.token_ids)
    bm.commit(s)


def advance(sched: Scheduler, batch) -> None:
    for s, n in zip(batch.seqs, batch.num_tokens):
        s.num_computed += n
        sched.blocks.commit(s)


def test_hash_chain_names_a_block_by_its_tokens_and_everything_before_it():
    a = block_hash(b"", [1, 2, 3, 4])
    assert a == block_hash(b"", [1, 2, 3, 4]) and len(a) == 16
    assert a != block_hash(b"", [1, 2, 3, 5])
    b = block_hash(a, [5, 6, 7, 8])
    assert b != block_hash(block_hash(b"", [0, 2, 3, 4]), [5, 6, 7, 8])  # same tokens, other parent
    bm = BlockManager(16, 4)
    s = seq("a", range(1, 11))  # 2 full blocks + 2 tokens
    prefill(bm, s)
    assert bm.num_cached == 2 and bm.hash_of[s.block_table[1]] == b and bm.hash_of[s.block_table[2]] is None


def test_a_later_request_reuses_the_longest_cached_chain_and_computes_at_least_one_token():
    bm = BlockManager(16, 4)
    first = seq("a", range(1, 13))  # 3 full blocks
    prefill(bm, first)
    # shares 2 blocks, then diverges
    other = seq("b", list(range(1, 9)) + [50, 51, 52, 53, 54])
    assert bm.reuse(other) == 8 and other.block_table == first.block_table[:2]
    assert [bm.ref_count[b] for b in other.block_table] == [2, 2]
    # the very same prompt: every full block but the last is reused, so one block's tokens are computed
    same = seq("c", range(1, 13))
    assert bm.reuse(same) == 8
    assert bm.queries == 13 + 12 + 12 and bm.hits == 16
    bm.check([first.block_table, other.block_table, same.block_table])


def test_freed_blocks_stay_cached_until_needed_then_are_evicted_least_recently_used():
    bm = BlockManager(6, 4)
    old, new = seq("old", range(100, 108)), seq("new", range(200, 208))
    prefill(bm, old)
    prefill(bm, new)
    bm.release(old)
    bm.release(new)
    assert bm.num_free == 6 and bm.num_used == 0 and bm.num_cached == 4
    filler = seq("f", range(300, 312))  # 3 blocks: 2 uncached free ones first, then the LRU cached one
    bm.allocate(filler, 12)
    assert bm.evictions == 1 and bm.num_cached == 3
    # old's tail went first (a chain's tail is evicted before its head), new is intact
    assert bm.reuse(seq("o", range(100, 109))) == 4
    assert bm.reuse(seq("n", range(200, 209))) == 8
    bm.check([filler.block_table, [b for b in range(6) if bm.ref_count[b] and b not in filler.block_table]])


def test_a_block_still_referenced_is_never_evicted():
    bm = BlockManager(4, 4)
    held = seq("held", range(1, 9))
    prefill(bm, held)  # 2 blocks, referenced
    gone = seq("gone", range(50, 54))
    prefill(bm, gone)
    bm.release(gone)  # 1 cached free block
    big = seq("big", range(90, 98))
    bm.allocate(big, 8)  # takes the uncached free block and evicts gone's, never held's
    assert bm.num_free == 0 and all(bm.ref_count[b] == 1 for b in held.block_table)
    assert bm.reuse(seq("h2", range(1, 10))) == 8
    try:
        bm.allocate(seq("x", [1]), 1)
        raise AssertionError("allocated past the last block")
    except RuntimeError:
        pass


def test_release_keeps_shared_blocks_for_the_other_holder():
    bm = BlockManager(8, 4)
    a = seq("a", range(1, 10))
    prefill(bm, a)
    b = seq("b", range(1, 10))
    prefill(bm, b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    bm.release(a)
    assert [bm.ref_count[x] for x in b.block_table] == [1, 1, 1]
    bm.check([b.block_table])
    bm.release(b)
    bm.check([])
    assert bm.num_free == 8


def test_off_nothing_is_reused_but_queries_are_counted():
    bm = BlockManager(8, 4, prefix_caching=False)
    prefill(bm, seq("a", range(1, 10)))
    assert bm.num_cached == 0 and bm.reuse(seq("b", range(1, 10))) == 0 and bm.queries == 18 and bm.hits == 0


def test_admission_prefills_only_the_uncached_rest():
    bm = BlockManager(32, 4)
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), bm, prefill_budget=64)
    system = list(range(1, 17))  # 4 blocks
    a = seq("a", system + [40, 41])
    sched.add(a)
    batch = sched.schedule()
    assert batch.num_tokens == [18]
    advance(sched, batch)
    b = seq("b", system + [60, 61, 62])
    sched.add(b)
    batch = sched.schedule()
    # a has nothing left to compute (no token was appended); b prefills only its 3 own tokens
    assert batch.seqs[-1] is b and batch.num_tokens[-1] == 3 and b.num_computed == 16
    assert b.block_table[:4] == a.block_table[:4]
    bm.check([a.block_table, b.block_table])


def test_preemption_frees_to_the_cache_and_readmission_hits_it():
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), bm)
    a, b = seq("a", range(1, 9)), seq("b", range(101, 109))
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())
    a.token_ids.append(9)
    b.token_ids.append(109)
    advance(sched, sched.schedule())  # each holds 3 blocks now; none free
    a.token_ids += [10, 11, 12, 13]  # needs a 4th block: b (latest arrived) is preempted
    a.num_computed = 12
    bm.commit(a)
    batch = sched.schedule()
    assert sched.preemptions == 1 and b.block_table == [] and b.num_computed == 0
    assert bm.num_cached >= 4  # b's two full blocks stayed cached while free
    advance(sched, batch)
    sched.finish(a, Finish.LENGTH)  # frees room for b
    hits = bm.hits
    batch = sched.schedule()
    assert batch.seqs == [b] and batch.num_tokens == [1] and b.num_computed == 8
    assert bm.hits - hits == 8  # b's prompt came back from the cache, only its last token recomputed
    advance(sched, batch)
    bm.check([b.block_table])


def test_random_shared_prefix_traffic_keeps_refcounts_and_cache_consistent():
    rng = random.Random(1)
    bm = BlockManager(num_blocks=30, block_size=4)
    sched = Scheduler(SchedulerConfig(max_batch_size=5, max_batch_tokens=24), bm, prefill_budget=16)
    prefixes = [list(range(1000 * k, 1000 * k + rng.randint(4, 14))) for k in range(3)]
    live: list[Sequence] = []
    done = 0
    for step in range(2000):
        if rng.random() < 0.3 and len(live) < 12:
            s = seq(f"r{step}", rng.choice(prefixes) + [rng.randint(1, 50) for _ in range(rng.randint(1, 6))],
                    max_new=rng.randint(1, 8))
            live.append(s)
            sched.add(s)
        batch = sched.schedule()
        for s, n in zip(batch.seqs, batch.num_tokens):
            s.num_computed += n
            bm.commit(s)
            if s.num_computed == len(s.token_ids):
                s.token_ids.append(rng.randint(1, 50))
                if s.num_generated >= s.sampling.max_new_tokens:
                    sched.finish(s, Finish.LENGTH)
                    live.remove(s)
                    done += 1
        bm.check([s.block_table for s in live])
        for s in live:  # a block's registered hash is that of the tokens in it
            for i, b in enumerate(s.block_table[:s.num_hashed]):
                h = b""
                for j in range(i + 1):
                    h = block_hash(h, s.token_ids[j * 4:(j + 1) * 4])
                assert bm.hash_of[b] == h
    assert done > 100 and bm.hits > 0 and bm.evictions > 0
