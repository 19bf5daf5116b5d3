"""The batched logits processors and sampler (worker/engine/sampler.py, beam.candidates) against the
per-row reference they replaced (tests/unit/reference_sampler.py): random mixes of parameters in one
batch, several steps with the token counts kept incrementally, and beam groups side by side."""

import math
import random

import pytest
import torch

from tests.unit import reference_sampler as ref
from worker.engine.beam import BeamGroup, candidates
from worker.engine.sampler import TokenCounts, sample
from worker.engine.sequence import Sampling, Sequence, Status

V = 64


def random_sampling(rng: random.Random, beams: int = 1) -> Sampling:
    greedy = beams > 1 or rng.random() < 0.4
    return Sampling(
        max_new_tokens=50,
        temperature=0.0 if greedy else rng.choice([0.5, 1.0, 1.7]),
        top_k=0 if greedy else rng.choice([0, 0, 1, 5, 20, V + 3]),
        top_p=1.0 if greedy else rng.choice([1.0, 1.0, 0.3, 0.9]),
        seed=rng.randrange(1000),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
        presence_penalty=rng.choice([0.0, 0.0, 0.5]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.4, -0.2]),
        min_new_tokens=rng.choice([0, 0, 3]),
        eos_token_ids=rng.choice([(), (7,), (7, 9)]),
        bad_word_token_sequences=rng.choice([(), ((11,),), ((3, 12), (13,))]),
        return_log_probs=rng.random() < 0.6,
        num_beams=beams,
    )


def random_seq(rng: random.Random, i: int, sampling: Sampling) -> Sequence:
    prompt = [rng.randrange(V) for _ in range(rng.randint(1, 12))]
    seq = Sequence(f"r{i}", prompt, sampling)
    seq.token_ids += [rng.randrange(V) for _ in range(rng.randint(0, 4))]  # some already generated
    if rng.random() < 0.3:
        seq.token_ids += [3]  # a bad-word prefix
    return seq


def with_generators(seqs: list[Sequence]) -> None:
    for s in seqs:
        s.generator = None if s.sampling.greedy else torch.Generator().manual_seed(s.sampling.seed)


@pytest.mark.parametrize("seed", range(6))
def test_batched_sampler_matches_per_row_reference_over_steps(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    seqs = [random_seq(rng, i, random_sampling(rng)) for i in range(rng.randint(1, 12))]
    twins = [Sequence(s.request_id, list(s.token_ids), s.sampling, num_prompt=s.num_prompt) for s in seqs]
    with_generators(seqs)
    with_generators(twins)
    counts = TokenCounts()
    for _ in range(5):
        logits = torch.randn(len(seqs), V, generator=gen) * 3
        toks, lps = sample(logits.clone(), seqs, counts)
        ref_toks, ref_lps = ref.sample(logits.clone(), twins)
        assert toks == ref_toks
        assert lps == pytest.approx(ref_lps, abs=1e-5)
        for s, t, tok in zip(seqs, twins, toks):
            s.token_ids.append(tok)
            t.token_ids.append(tok)
        if rng.random() < 0.5:  # one leaves the batch (its counts row is reused), another joins
            seqs[0].status = Status.FINISHED
            new = random_seq(rng, rng.randrange(10**6), random_sampling(rng))
            twin = Sequence(new.request_id, list(new.token_ids), new.sampling, num_prompt=new.num_prompt)
            with_generators([new, twin])
            seqs, twins = seqs[1:] + [new], twins[1:] + [twin]


def test_a_row_does_not_depend_on_its_neighbours():
    rng = random.Random(7)
    seqs = [random_seq(rng, i, random_sampling(rng)) for i in range(10)]
    logits = torch.randn(10, V, generator=torch.Generator().manual_seed(1))
    with_generators(seqs)
    together = sample(logits, seqs)
    with_generators(seqs)
    alone = [sample(logits[i:i + 1], [s]) for i, s in enumerate(seqs)]
    assert together[0] == [a[0][0] for a in alone]
    assert together[1] == [a[1][0] for a in alone]


def test_top_log_probs_are_the_best_of_each_rows_own_distribution():
    """Greedy rows: the k best of log_softmax(processed logits), the chosen token first; sampled rows:
    of the temperature-scaled top-k-filtered distribution (never more than top_k alternatives); rows
    that ask for none get none; a row's alternatives do not depend on its neighbours."""
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3)) * 2
    kinds = [Sampling(top_log_probs=3, return_log_probs=True), Sampling(),
             Sampling(temperature=0.7, top_k=2, top_log_probs=5, return_log_probs=True, seed=4),
             Sampling(top_log_probs=20, return_log_probs=True)]
    seqs = [Sequence(f"r{i}", [1, 2], s) for i, s in enumerate(kinds)]
    with_generators(seqs)
    toks, lps = sample(logits.clone(), seqs)
    (ids0, v0), = seqs[0].top_log_probs
    want = torch.log_softmax(logits[0], -1).topk(3)
    assert ids0 == want.indices.tolist() and v0 == pytest.approx(want.values.tolist(), abs=1e-6)
    assert ids0[0] == toks[0] and v0[0] == pytest.approx(lps[0], abs=1e-6)
    assert seqs[1].top_log_probs == []
    (ids2, v2), = seqs[2].top_log_probs
    assert len(ids2) == 2 and toks[2] in ids2 and sum(math.exp(v) for v in v2) == pytest.approx(1.0, abs=1e-5)
    assert len(seqs[3].top_log_probs[0][0]) == 20
    alone = Sequence("a", [1, 2], kinds[0])
    sample(logits[:1].clone(), [alone])
    assert alone.top_log_probs == seqs[0].top_log_probs
    small = torch.randn(2, 8, generator=torch.Generator().manual_seed(5))  # fewer tokens than asked for
    rows = [Sequence(f"s{i}", [1], Sampling(top_log_probs=20, return_log_probs=True)) for i in range(2)]
    sample(small.clone(), rows)
    for row, lg in zip(rows, small):
        assert rows and row.top_log_probs[0][0] == torch.log_softmax(lg, -1).topk(8).indices.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_beam_candidates_match_per_group_reference(seed):
    rng = random.Random(seed)
    groups = []
    for g in range(rng.randint(1, 5)):
        sampling = random_sampling(rng, beams=rng.choice([2, 3, 4]))
        if rng.random() < 0.3:
            sampling = Sampling(**{**sampling.__dict__, "beam_search_diversity_rate": 0.7})
        handle = random_seq(rng, g, sampling)
        group = BeamGroup(handle)
        if rng.random() < 0.7:  # a group past its first step: several beams with running scores
            n = sampling.num_beams
            group.beams = [handle] + [Sequence(f"{g}.{b}", handle.token_ids[:-1] + [rng.randrange(V)], sampling,
                                               num_prompt=handle.num_prompt) for b in range(1, n)]
            group.scores = [-rng.random() * 5 for _ in range(n)]
        groups.append(group)
    logits = torch.randn(sum(len(g.beams) for g in groups), V, generator=torch.Generator().manual_seed(seed))
    got = candidates(groups, logits.clone(), TokenCounts())
    at = 0
    for group, (cands, lps) in zip(groups, got):
        n = len(group.beams)
        ref_cands, ref_lps = ref.beam_candidates(group, logits[at:at + n].clone())
        at += n
        assert [(b, t) for b, t, _ in cands] == [(b, t) for b, t, _ in ref_cands]
        assert [s for _, _, s in cands] == pytest.approx([s for _, _, s in ref_cands], abs=1e-5)
        assert lps == pytest.approx(ref_lps, abs=1e-5)
