"""Speculative decoding without a model: the n-gram proposer, the rejection sampler against the
target distribution (statistically, on a small vocabulary), greedy verification, and the
scheduler's lookahead slots and rollback of rejected tokens' KV blocks."""

from __future__ import annotations

import math

import pytest
import torch

from worker.engine.block_manager import BlockManager
from worker.engine.scheduler import Scheduler, SchedulerConfig
from worker.engine.sequence import Finish, Sampling, Sequence
from worker.engine.speculative import ngram_propose, rejection_sample, sampling_probs, speculable, verify

torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a busy machine

V = 6
TRIALS = 3000


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~0.001 (z = 3.09; Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_distributed_as(counts: torch.Tensor, p: torch.Tensor) -> None:
    """counts [V] of draws against probabilities p [V]: chi-square over the tokens with mass (and no
    draw where p is 0)."""
    n = float(counts.sum())
    assert n > 200, "too few draws to judge"
    assert counts[p == 0].sum() == 0, f"drew tokens outside the target's support: {counts.tolist()}"
    on = p > 0
    expected = p[on] * n
    stat = float(((counts[on] - expected) ** 2 / expected).sum())
    df = int(on.sum()) - 1
    assert stat < chi2_critical(df), f"chi2 {stat:.1f} (df {df}): {(counts / n).tolist()} vs {p.tolist()}"
    assert 0.5 * float((counts / n - p).abs().sum()) < 0.05


def target(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """The distribution sampling draws from, written out independently of the engine: softmax of
    logits / temperature over the top_k tokens."""
    z = logits.double() / temperature
    keep = torch.zeros_like(z, dtype=torch.bool)
    keep[torch.topk(z, top_k).indices] = True
    p = torch.where(keep, torch.softmax(z.masked_fill(~keep, float("-inf")), -1), 0.0)
    return p / p.sum()


def sampled_seq(seed: int, temperature=0.8, top_k=0) -> Sequence:
    s = Sequence("r", [1, 2, 3], Sampling(max_new_tokens=8, temperature=temperature, top_k=top_k, seed=seed))
    s.generator = torch.Generator().manual_seed(seed)
    return s


def test_ngram_proposes_what_followed_the_latest_match():
    assert ngram_propose([1, 2, 3, 9, 7, 1, 2, 3], 2) == [9, 7]  # the 3-gram 1 2 3
    assert ngram_propose([4, 1, 2, 5, 8, 2], 3, min_n=1) == [5, 8, 2]  # only the 1-gram 2 matches
    assert ngram_propose([4, 1, 2, 5, 8, 2], 3) == []  # the default needs 2 tokens to match
    assert ngram_propose([1, 2, 3, 4], 3) == []
    assert ngram_propose([5, 6, 5, 6, 5], 5) == [6, 5, 6, 5, 6]  # a loop continues periodically
    assert ngram_propose([7, 7, 7], 4) == [7, 7, 7, 7]
    assert ngram_propose([256, 1, 0, 0, 1], 2, min_n=1) == [0, 0]  # byte patterns across tokens: no match
    assert ngram_propose([3, 3, 3], 0) == [] and ngram_propose([3], 2) == []


def test_which_requests_speculate():
    ok = Sequence("a", [1, 2], Sampling(temperature=0.7))
    assert speculable(ok)
    for s in (Sampling(repetition_penalty=1.2), Sampling(presence_penalty=0.5), Sampling(frequency_penalty=0.1),
              Sampling(bad_word_token_sequences=((3,),)), Sampling(num_beams=2)):
        assert not speculable(Sequence("b", [1, 2], s))
    waiting_for_min = Sequence("c", [1, 2], Sampling(min_new_tokens=2, eos_token_ids=(2,)))
    assert not speculable(waiting_for_min)
    waiting_for_min.token_ids += [5, 6]
    assert speculable(waiting_for_min)


def test_greedy_verification_accepts_the_agreeing_prefix_and_one_more():
    logits = torch.full((4, V), -1.0)
    for row, best in enumerate([3, 1, 4, 5]):
        logits[row, best] = 2.0
    seqs = [Sequence("g", [1], Sampling()) for _ in range(3)]
    rows = torch.cat([logits, logits[:3], logits[:1]])  # 3 + 1, 2 + 1 and 0 + 1 rows
    toks, lps, acc = verify(rows, seqs, [[3, 1, 0], [3, 2], []], [None, None, None])
    assert toks == [[3, 1, 4], [3, 1], [3]] and acc == [2, 1, 0]  # the correction is row a's argmax
    toks, _, acc = verify(logits, seqs[:1], [[3, 1, 4]], [None])
    assert toks == [[3, 1, 4, 5]] and acc == [3]  # all accepted: the bonus token
    assert lps[0] == pytest.approx(torch.log_softmax(logits, -1)[[0, 1, 2], [3, 1, 4]].tolist(), abs=1e-6)


@pytest.mark.parametrize("top_k", [0, 4])
def test_rejection_sampling_with_ngram_drafts_keeps_the_target_distribution(top_k):
    torch.manual_seed(0)
    logits = torch.randn(3, V) * 1.5  # rows: after the prompt, after d1, after d1 d2
    drafts = [int(torch.argsort(logits[0])[-2]), 0]  # d1: the second most likely token
    seq = sampled_seq(1, top_k=top_k)
    p = sampling_probs(logits, [seq], [3])  # what verify draws against: the sampler's distribution
    want = torch.stack([target(row, 0.8, top_k or V) for row in logits])
    assert torch.allclose(p, want, atol=1e-9)
    first, second = torch.zeros(V), torch.zeros(V)
    accepted = 0
    for _ in range(TRIALS):
        toks, a = rejection_sample(p, drafts, None, seq.generator)
        first[toks[0]] += 1
        if toks[0] == drafts[0]:
            second[toks[1]] += 1
        accepted += a
    assert_distributed_as(first, want[0])
    assert_distributed_as(second, want[1])  # given d1 accepted, the next token is drawn from the next row
    assert 0 < accepted < 2 * TRIALS


def test_rejection_sampling_with_a_draft_distribution_keeps_the_target_distribution():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(3, V).double() * 1.5, -1)  # the target's distributions
    q = torch.softmax(torch.randn(2, V).double() * 1.5, -1)  # the draft's own
    g = torch.Generator().manual_seed(2)
    draws = torch.Generator().manual_seed(3)  # the draft samples its tokens from q
    d = torch.stack([torch.multinomial(q[j], TRIALS, replacement=True, generator=draws) for j in range(2)], 1)
    first, second = torch.zeros(V), torch.zeros(V)
    for t in range(TRIALS):
        toks, _ = rejection_sample(p, d[t].tolist(), q, g)
        first[toks[0]] += 1
        if len(toks) > 1:  # d1 accepted: toks[1] is the next row's
            second[toks[1]] += 1
    assert_distributed_as(first, p[0])
    assert_distributed_as(second, p[1])


def test_rows_draw_from_their_own_generators():
    logits = torch.randn(2, V)
    alone = [verify(logits, [sampled_seq(s)], [[1]], [None])[0][0] for s in range(20)]
    batch = [sampled_seq(s) for s in range(20)]
    together, _, _ = verify(logits.repeat(20, 1), batch, [[1]] * 20, [None] * 20)
    assert together == alone


class ArgmaxSampler:
    counts = None

    def __call__(self, logits, seqs):
        return [int(r.argmax()) for r in logits], [0.0] * len(seqs)


def run(sched: Scheduler, batch, nxt) -> None:
    """Postprocess `batch` as if the target predicted nxt(seq, j) at row j of each sequence."""
    rows = []
    for seq, ok, d in zip(batch.seqs, batch.samples(), batch.draft_lists()):
        for j in range(1 + len(d) if ok else 0):
            r = torch.zeros(64)
            r[nxt(seq, j)] = 5.0
            rows.append(r)
    logits = torch.stack(rows) if rows else torch.zeros(0, 64)
    sched.postprocess(batch, logits, ArgmaxSampler(), lambda seq, reason, t, lp: sched.finish(seq, reason))


def test_lookahead_rollback_and_prefix_hashes_of_accepted_tokens_only():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), bm, num_speculative_tokens=3)
    seq = Sequence("s", [1, 2, 3, 4, 5, 6], Sampling(max_new_tokens=12))
    sched.add(seq)
    truth = list(range(7, 19))  # what the "target" generates
    target_says = lambda s, j: truth[s.num_generated + j]  # noqa: E731
    run(sched, sched.schedule(), target_says)  # prefill -> 7
    assert seq.generated == [7] and seq.num_computed == 6
    batch = sched.schedule()
    assert batch.lookahead == [3] and batch.num_tokens == [4] and len(seq.block_table) == 3  # 10 slots
    batch.set_drafts([[8, 9, 99]], [None])  # two right, one wrong
    run(sched, batch, target_says)
    assert seq.generated == [7, 8, 9, 10] and seq.num_computed == 9  # 8, 9 accepted + the correction 10
    assert len(seq.block_table) == 3 and seq.num_hashed == 2  # blocks [1..4] [5..8] full and hashed
    assert sched.spec_proposed == 3 and sched.spec_accepted == 2
    bm.check([seq.block_table])
    batch = sched.schedule()
    batch.set_drafts([[55]], [None])  # rejected at once: its slot is dropped again
    run(sched, batch, target_says)
    assert seq.generated == [7, 8, 9, 10, 11] and seq.num_computed == 10 and len(seq.block_table) == 3
    bm.check([seq.block_table])
    assert [bm.hash_of[b] for b in seq.block_table[:2]] == bm._chain(seq, 2)  # hashes of the real tokens
    while seq.finish is None:  # to the end, every proposal right: max_new_tokens exactly
        batch = sched.schedule()
        batch.set_drafts([truth[seq.num_generated:seq.num_generated + k] for k in batch.lookahead if k], [None])
        run(sched, batch, target_says)
    assert seq.generated == truth and seq.finish is Finish.LENGTH and bm.num_free == bm.num_blocks


def test_lookahead_stops_at_max_new_tokens_and_skips_penalised_requests():
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), BlockManager(16, 4),
                      num_speculative_tokens=8)
    a = Sequence("a", list(range(1, 8)), Sampling(max_new_tokens=3))
    b = Sequence("b", list(range(1, 8)), Sampling(max_new_tokens=40, repetition_penalty=1.3))
    for s in (a, b):
        sched.add(s)
    target_says = lambda s, j: 20 + s.num_generated + j  # noqa: E731
    run(sched, sched.schedule(), target_says)
    batch = sched.schedule()
    # a may emit 2 more tokens: one draft and the bonus; b is penalised: no speculation
    assert batch.lookahead == [1, 0] and batch.num_tokens == [2, 1]
    batch.set_drafts([[21]], [None])
    run(sched, batch, target_says)
    assert a.finish is Finish.LENGTH and a.generated == [20, 21, 22] and b.generated == [20, 21]


def test_lookahead_takes_only_free_blocks_and_never_preempts():
    bm = BlockManager(num_blocks=3, block_size=4)
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), bm, num_speculative_tokens=8)
    a = Sequence("a", list(range(1, 8)), Sampling(max_new_tokens=40))
    sched.add(a)
    run(sched, sched.schedule(), lambda s, j: 30)
    batch = sched.schedule()
    assert batch.lookahead == [4] and bm.num_free == 0  # 8 slots + the one free block
    bm2 = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_batch_tokens=64), bm2, num_speculative_tokens=8)
    a, b = (Sequence(n, list(range(1, 8)), Sampling(max_new_tokens=40)) for n in "ab")
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule(), lambda s, j: 30)
    batch = sched.schedule()  # both decode in the blocks they hold; no block is left for lookahead
    assert batch.seqs == [a, b] and batch.lookahead == [0, 0] and sched.preemptions == 0
