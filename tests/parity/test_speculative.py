"""Speculative decoding in the engine, on tiny random Llamas: greedy tokens and log-probs identical to
decoding without it and to transformers (n-gram proposals, the target itself as its draft, a
different draft), in mixed batches beside requests that do not speculate, through prefix-cache
hits; sampled tokens keep their distribution (n-gram and draft proposals, small vocabulary)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.oracle import make_random_model
from tests.parity.test_generation import hf_generate, hf_greedy_logprobs, ours
from worker.engine.build import build_engine
from worker.engine.engine import EngineConfig
from worker.engine.sequence import Finish, Sampling

LOGPROB_ATOL = 1e-4
NEW = 16
PROMPTS = [[1, 5, 9, 200, 17], [1] + list(range(30, 52)), [1, 88, 3], [1] + [40, 41, 42, 43] * 5]
K = 3


def llama(out: Path, vocab: int, layers: int, hidden: int, seed: int) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    return make_random_model(cfg, out, seed=seed)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return llama(tmp_path_factory.mktemp("spec-target"), 512, 2, 64, seed=0)


def perturbed(model_dir: Path, out: Path, std: float, seed: int = 1) -> Path:
    """The model at model_dir with noise added to every weight: a draft that mostly agrees."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn(prm.shape, generator=g) * std)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def engines(model_dir, tmp_path_factory):
    draft = perturbed(model_dir, tmp_path_factory.mktemp("spec-draft"), std=0.03)
    kw = {"block_size": 4, "max_batch_tokens": 64}
    spec = {"num_speculative_tokens": K}
    return {
        "plain": build_engine(EngineConfig(model_dir=model_dir, **kw)),
        "ngram": build_engine(EngineConfig(model_dir=model_dir, speculative_method="ngram", **spec, **kw)),
        # the target as its own draft: every greedy proposal is right (the KV bookkeeping of both caches)
        "self": build_engine(EngineConfig(model_dir=model_dir, speculative_method="draft",
                                          speculative_model=str(model_dir), **spec, **kw)),
        "draft": build_engine(EngineConfig(model_dir=model_dir, speculative_method="draft",
                                           speculative_model=str(draft), **spec, **kw)),
    }


def spec_counts(engine) -> tuple[int, int]:
    st = engine.snapshot_stats()
    return st.spec_decode_proposed_tokens_total, st.spec_decode_accepted_tokens_total


def draft_blocks_back(engine) -> bool:
    p = engine.proposer
    if p is None or not hasattr(p, "blocks"):
        return True
    p._sweep()
    return p.blocks.num_free == p.blocks.num_blocks


def test_greedy_tokens_and_log_probs_are_those_of_plain_decoding_and_transformers(engines, model_dir):
    from transformers import AutoModelForCausalLM

    jobs = [(p, Sampling(max_new_tokens=NEW, return_log_probs=True)) for p in PROMPTS]
    plain = ours(engines["plain"], jobs)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for prompt, (toks, lps, _, _) in zip(PROMPTS, plain):
        ref, out = hf_generate(hf, prompt, max_new_tokens=NEW)
        assert toks == ref
        assert max(abs(a - b) for a, b in zip(lps, hf_greedy_logprobs(out, ref))) < LOGPROB_ATOL
    for name in ("ngram", "self", "draft"):
        engine = engines[name]
        before = spec_counts(engine)
        for attempt in ("cold", "prefix-cache hits"):  # the second run reuses the first one's blocks
            got = ours(engine, jobs)
            for i, ((toks, lps, fin, cum), (ref, ref_lps, ref_fin, ref_cum)) in enumerate(zip(got, plain)):
                assert toks == ref and fin is ref_fin is Finish.LENGTH, f"{name} {attempt} prompt {i}"
                assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < LOGPROB_ATOL
                assert abs(cum - ref_cum) < LOGPROB_ATOL * NEW
        proposed, accepted = (a - b for a, b in zip(spec_counts(engine), before))
        assert proposed > 0 and accepted > 0, name
        if name == "self":
            assert accepted >= 0.95 * proposed, f"the target as draft: {accepted} of {proposed} accepted"
        else:
            assert accepted < proposed, f"{name}: no proposal rejected"
        assert engine.blocks.hits > 0 and draft_blocks_back(engine)


def test_a_mixed_batch_beside_requests_that_do_not_speculate(engines):
    p0, p1, p2, p3 = PROMPTS
    greedy = ours(engines["plain"], [(p, Sampling(max_new_tokens=NEW)) for p in PROMPTS])
    eos, stop = greedy[3][0][5], tuple(greedy[2][0][6:8])
    jobs = [
        (p3, Sampling(max_new_tokens=NEW)),
        (p0, Sampling(max_new_tokens=NEW, repetition_penalty=1.5)),
        (p1, Sampling(max_new_tokens=NEW, num_beams=2)),
        (p2, Sampling(max_new_tokens=NEW, stop_token_sequences=(stop,))),
        (p3, Sampling(max_new_tokens=NEW, eos_token_ids=(eos,))),
        (p1, Sampling(max_new_tokens=NEW, min_new_tokens=4, eos_token_ids=(greedy[1][0][0],))),
        (p0, Sampling(max_new_tokens=NEW, bad_word_token_sequences=((greedy[0][0][2],),))),
        (p3, Sampling(max_new_tokens=7)),
    ]
    want = ours(engines["plain"], jobs)
    assert want[3][2] is Finish.STOP and want[4][2] is Finish.EOS and len(want[4][0]) <= 6
    sampled = (p3, Sampling(max_new_tokens=NEW, temperature=0.8, top_k=50, seed=5))
    for name in ("ngram", "draft"):
        got = ours(engines[name], jobs + [sampled])
        for i, ((toks, _, fin, _), (ref, _, ref_fin, _)) in enumerate(zip(got, want)):
            assert toks == ref and fin is ref_fin, f"{name} job {i}"
        assert len(got[-1][0]) == NEW and got[-1][2] is Finish.LENGTH


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def homogeneous(a: list[int], b: list[int]) -> tuple[float, float]:
    """Two samples of tokens: (chi-square statistic of 'same distribution', its 0.001 critical value);
    tokens expected fewer than 5 times are pooled."""
    tokens = sorted(set(a) | set(b))
    ca = {t: a.count(t) for t in tokens}
    cb = {t: b.count(t) for t in tokens}
    n = len(a) + len(b)
    cells, rest = [], [0, 0]
    for t in tokens:
        if (ca[t] + cb[t]) * min(len(a), len(b)) / n < 5:
            rest[0] += ca[t]
            rest[1] += cb[t]
        else:
            cells.append((ca[t], cb[t]))
    if sum(rest):
        cells.append(tuple(rest))
    stat = 0.0
    for x, y in cells:
        for obs, size in ((x, len(a)), (y, len(b))):
            exp = (x + y) * size / n
            stat += (obs - exp) ** 2 / exp
    return stat, chi2_critical(max(1, len(cells) - 1))


def test_sampled_tokens_keep_their_distribution(tmp_path_factory):
    target = llama(tmp_path_factory.mktemp("spec-small"), 16, 1, 32, seed=2)
    draft = llama(tmp_path_factory.mktemp("spec-small-draft"), 16, 1, 32, seed=3)
    kw = {"block_size": 4, "max_batch_size": 64, "max_batch_tokens": 512}
    runs = {}
    for name, extra in (("plain", {}), ("ngram", {"speculative_method": "ngram", "num_speculative_tokens": K}),
                        ("draft", {"speculative_method": "draft", "speculative_model": str(draft),
                                   "num_speculative_tokens": K})):
        engine = build_engine(EngineConfig(model_dir=target, **kw, **extra))
        prompt = [1, 2, 3, 1, 2, 3, 1, 2]
        jobs = [(prompt, Sampling(max_new_tokens=4, temperature=1.0, seed=s)) for s in range(448)]
        runs[name] = [toks for toks, _, _, _ in ours(engine, jobs)]
        if name != "plain":
            proposed, accepted = spec_counts(engine)
            assert proposed > 0 and 0 < accepted < proposed, name
    for name in ("ngram", "draft"):
        assert [r[0] for r in runs[name]] == [r[0] for r in runs["plain"]]  # the prefill's token: same draw
        for pos in (1, 2, 3):
            stat, critical = homogeneous([r[pos] for r in runs["plain"]], [r[pos] for r in runs[name]])
            assert stat < critical, f"{name}: token {pos} distributed differently (chi2 {stat:.1f} > {critical:.1f})"
        pairs = homogeneous([r[1] * 16 + r[2] for r in runs["plain"]], [r[1] * 16 + r[2] for r in runs[name]])
        assert pairs[0] < pairs[1], f"{name}: tokens 1-2 jointly distributed differently"
