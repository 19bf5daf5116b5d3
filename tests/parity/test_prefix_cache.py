"""Prefix caching against transformers: a request whose prompt prefix was cached by an earlier,
different request gets the same greedy tokens, logits and log-probs as without a cache hit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.oracle import make_random_model, record_logits
from tests.parity.test_generation import hf_generate, hf_greedy_logprobs, ours
from worker.engine.build import build_engine
from worker.engine.engine import EngineConfig
from worker.engine.sequence import Sampling

LOGIT_ATOL = 1e-3
LOGPROB_ATOL = 1e-4
NEW = 12
SYSTEM = [1] + list(range(100, 139))  # 40 tokens: 10 blocks of 4, 2 of 16
FIRST = SYSTEM + [7, 8, 9, 10, 11]
SECOND = SYSTEM + [300, 301, 302]  # the same prefix, a different question


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    return make_random_model(cfg, tmp_path_factory.mktemp("llama-pfx"))


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def engine_of(model_dir, **kw):
    return build_engine(EngineConfig(model_dir=Path(model_dir), **kw))


def logits_of(engine) -> dict[str, list[torch.Tensor]]:
    rows: dict[str, list[torch.Tensor]] = {}
    record_logits(engine, lambda seqs, lg: [rows.setdefault(s.request_id, []).append(lg[i].clone())
                                            for i, s in enumerate(seqs)])
    return rows


@pytest.mark.parametrize("block_size", [4, 16])
def test_a_cache_hit_gives_transformers_tokens_logits_and_log_probs(model_dir, hf, block_size):
    engine = engine_of(model_dir, block_size=block_size)
    queries = engine.blocks.queries  # the warm-up's
    greedy = Sampling(max_new_tokens=NEW, return_log_probs=True)
    ours(engine, [(FIRST, greedy)])  # caches SYSTEM's full blocks
    hits = engine.blocks.hits
    rows = logits_of(engine)
    (toks, lps, _, _), = ours(engine, [(SECOND, greedy)])
    reused = engine.blocks.hits - hits
    assert reused == len(SYSTEM) // block_size * block_size > 0, "the second request missed the cache"
    ref, out = hf_generate(hf, SECOND, max_new_tokens=NEW)
    assert toks == ref and len(set(ref)) > 3
    assert max(abs(a - b) for a, b in zip(lps, hf_greedy_logprobs(out, ref))) < LOGPROB_ATOL
    diff = (torch.stack(rows["g0"]) - torch.stack([s[0].float() for s in out.scores])).abs().max().item()
    assert diff < LOGIT_ATOL, f"max logit difference {diff}"
    # and the same engine with the cache off gives the same (no hit at all)
    cold = engine_of(model_dir, block_size=block_size, prefix_caching=False)
    ours(cold, [(FIRST, greedy)])
    (cold_toks, cold_lps, _, _), = ours(cold, [(SECOND, greedy)])
    assert cold.blocks.hits == 0 and cold_toks == toks
    assert max(abs(a - b) for a, b in zip(lps, cold_lps)) < LOGPROB_ATOL
    st = engine.snapshot_stats()
    assert st.prefix_cache_hits_total == engine.blocks.hits and st.kv_blocks_cached > 0
    assert st.prefix_cache_queries_total - queries == len(FIRST) + len(SECOND)


def test_whole_prompt_cached_still_computes_its_last_token(model_dir, hf):
    """The very same prompt again: every full block but the one holding the last token is reused."""
    engine = engine_of(model_dir, block_size=4)
    greedy = Sampling(max_new_tokens=NEW)
    prompt = SYSTEM  # 40 tokens: exactly 10 full blocks
    first, = ours(engine, [(prompt, greedy)])
    hits = engine.blocks.hits
    again, = ours(engine, [(prompt, greedy)])
    assert engine.blocks.hits - hits == 36 and again[0] == first[0] == hf_generate(hf, prompt, max_new_tokens=NEW)[0]


def test_concurrent_sharers_beams_and_preemption_match_the_uncached_engine(model_dir):
    """Requests sharing the prefix in one batch, a beam request among them, and a KV cache so small
    that sequences are preempted and re-admitted through the cache: the same output as with the
    cache off."""
    jobs = [(SYSTEM + [200 + i, 201 + i, 202], Sampling(max_new_tokens=NEW, return_log_probs=True))
            for i in range(4)]
    jobs.append((SYSTEM + [250, 251], Sampling(max_new_tokens=NEW, num_beams=3, return_log_probs=True)))
    kw = dict(block_size=4, num_kv_blocks=24, max_model_len=96, max_batch_tokens=64)
    cold = engine_of(model_dir, prefix_caching=False, **kw)
    warm = engine_of(model_dir, **kw)
    ours(warm, [(FIRST, Sampling(max_new_tokens=2))])
    want = ours(cold, jobs)
    got = ours(warm, jobs)
    assert warm.blocks.hits > 0 and warm.scheduler.preemptions > 0
    for (t1, l1, f1, c1), (t2, l2, f2, c2) in zip(want, got):
        assert t1 == t2 and f1 is f2
        assert max(abs(a - b) for a, b in zip(l1, l2)) < LOGPROB_ATOL and abs(c1 - c2) < LOGPROB_ATOL * NEW
