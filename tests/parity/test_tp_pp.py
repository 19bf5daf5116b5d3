"""Tensor and pipeline parallelism over real worker processes (CPU, gloo): same greedy tokens and
log-probs as one process, and each rank holds about 1/N of the parameters.

Each layout launches a real replica (controller.fleet.replica.Replica: layout check, placement, one
process per rank, torch.distributed rendezvous) and talks to its leader over worker.proto, as the
controller does. Families plug in through _configs(): a family runs once its architecture is in the
worker's registry.
"""

from __future__ import annotations

import concurrent.futures as cf
import tempfile
from pathlib import Path

import pytest

from controller.fleet.replica import Replica, ReplicaSpec
from shardserve.v1 import worker_pb2 as wpb
from tests.oracle import make_random_model, record_logits
from worker.models.registry import supported_architectures

NEW_TOKENS = 6
# one prompt longer than the step's token budget, so prefill runs in chunks that sample nothing
PROMPTS = [[1, 5, 9, 200, 17], [1] + list(range(30, 58)), [1, 88, 3]]
MAX_BATCH_TOKENS = 16
LOGPROB_ATOL = 1e-3  # fp32; all-reduce sums partial products in another order
BYTES_TOLERANCE = 0.10  # per-rank parameter bytes within 10 % of whole / ranks


V, H = 384, 64  # tiny: each layout is a few seconds of process start-up


def _configs():
    """family -> transformers config (untied heads where the family allows, so 1/PP holds)."""
    import transformers as tf

    return {
        "llama": tf.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                tie_word_embeddings=False, architectures=["LlamaForCausalLM"]),
        "gpt2": tf.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=128, tie_word_embeddings=False,
                              architectures=["GPT2LMHeadModel"]),
        "opt": tf.OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                            max_position_embeddings=128, word_embed_proj_dim=H, tie_word_embeddings=False,
                            architectures=["OPTForCausalLM"]),
        # 6 heads, 3 per rank at TP=2: each rank must take its own slice of the ALiBi slopes
        "bloom": tf.BloomConfig(vocab_size=V, hidden_size=96, n_layer=2, n_head=6, tie_word_embeddings=False,
                                architectures=["BloomForCausalLM"]),
        "gpt_neox": tf.GPTNeoXConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128, rotary_pct=0.5,
                                     tie_word_embeddings=False, architectures=["GPTNeoXForCausalLM"]),
        "gptj": tf.GPTJConfig(vocab_size=V, n_embd=H, n_layer=2, n_head=4, rotary_dim=8, n_positions=128,
                              tie_word_embeddings=False, architectures=["GPTJForCausalLM"]),
        # relative-position bias: its buckets' heads are split over ranks with the attention heads
        "t5": tf.T5Config(vocab_size=V, d_model=H, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                          num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                          decoder_start_token_id=0, architectures=["T5ForConditionalGeneration"]),
    }


STD = {"bloom": 0.4, "opt": 0.25, "gpt2": 0.25, "gpt_neox": 0.25, "gptj": 0.25, "t5": 0.25}  # else 0.08
# family -> layouts (tp, pp, stage_layers) compared with one process
LAYOUTS = {
    "llama": [(2, 1, ()), (1, 2, ()), (2, 2, (3, 1))],
    "t5": [(2, 1, ()), (1, 2, ()), (2, 2, ())],
}
DEFAULT_LAYOUTS = [(2, 1, ()), (1, 2, ())]


def _cases():
    archs = set(supported_architectures())
    for family, config in _configs().items():
        arch = config.architectures[0]
        marks = () if arch in archs else pytest.mark.skip(reason=f"{arch} not in the worker's registry yet")
        for tp, pp, stages in LAYOUTS.get(family, DEFAULT_LAYOUTS):
            yield pytest.param(family, tp, pp, stages, id=f"{family}-tp{tp}-pp{pp}" + ("-split" if stages else ""),
                               marks=marks)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """family -> (model dir, tokens, log-probs, whole-model parameter bytes) from one in-process
    engine (world size 1), built lazily."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            config = _configs()[family]
            model_cls = None
            if getattr(config, "is_encoder_decoder", False):
                from transformers import AutoModelForSeq2SeqLM as model_cls
            path = make_random_model(config, tmp_path_factory.mktemp(family), std=STD.get(family, 0.08),
                                     model_cls=model_cls)
            cache[family] = (path, *_in_process(path))
        return cache[family]

    return get


def _in_process(model_dir: Path):
    import torch

    from worker.engine.build import build_engine
    from worker.engine.engine import EngineConfig
    from worker.engine.sequence import Sampling, Sequence

    engine = build_engine(EngineConfig(model_dir=model_dir, max_model_len=96))
    done = set()
    # encoder-decoder engines make their own sequences (the prompt feeds the encoder)
    make = getattr(engine, "new_sequence", lambda rid, p, sampling, emit: Sequence(rid, list(p), sampling, emit=emit))
    seqs = [make(f"r{i}", p, Sampling(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS),
                 emit=lambda t, lp, fin, err, i=i: done.add(i) if fin else None) for i, p in enumerate(PROMPTS)]
    lps: dict[str, list[float]] = {s.request_id: [] for s in seqs}

    def hook(sampled, logits):
        for i, s in enumerate(sampled):
            lps[s.request_id].append(logits[i])

    record_logits(engine, hook)
    for s in seqs:
        engine.add(s)
    while len(done) < len(seqs):
        engine.step()
    logprobs = [[float(torch.log_softmax(lg, -1)[t]) for lg, t in zip(lps[s.request_id], s.generated)] for s in seqs]
    return [s.generated for s in seqs], logprobs, engine.param_bytes


def _serve_once(model_dir: Path, tp: int, pp: int, stages: tuple[int, ...]):
    """Launch a replica with this layout, run every prompt concurrently (one batch), stop it.
    Returns (tokens per prompt, log-probs per prompt, parameter bytes per rank)."""
    spec = ReplicaSpec(model_dir=model_dir, tensor_parallel=tp, pipeline_parallel=pp, stage_layers=stages, max_model_len=96,
                       max_batch_tokens=MAX_BATCH_TOKENS, num_kv_blocks=64, block_size=8,
                       collective_timeout_s=60.0, max_restarts=0)
    replica = Replica(f"tp{tp}pp{pp}", spec, Path(tempfile.mkdtemp(prefix="shardserve-test-")))
    replica.start()
    try:
        def one(i):
            req = wpb.WorkerGenerateRequest(request_id=f"r{i}", prompt_token_ids=PROMPTS[i], sampling=wpb.SamplingParams(
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, return_log_probs=True))
            toks, lps = [], []
            for msg in replica.generate(req, timeout=120):
                assert msg.finish_reason != wpb.WORKER_FINISH_ERROR, msg.error
                toks += list(msg.token_ids)
                lps += list(msg.log_probs)
            return toks, lps

        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(one, range(len(PROMPTS))))
        ranks = [r.parameter_bytes for r in replica.status.ranks]
        assert replica.status.tensor_parallel == tp and replica.status.pipeline_parallel == pp
    finally:
        replica.stop()
    return [r[0] for r in results], [r[1] for r in results], ranks


@pytest.mark.parametrize("family, tp, pp, stages", list(_cases()))
def test_layout_gives_the_tokens_of_one_process(reference, family, tp, pp, stages):
    path, ref_tokens, ref_logprobs, whole = reference(family)
    tokens, logprobs, ranks = _serve_once(path, tp, pp, stages)
    assert tokens == ref_tokens
    assert any(len(set(t)) > 2 for t in ref_tokens), "degenerate reference output: widen the weights"
    for got, want in zip(logprobs, ref_logprobs):
        assert max(abs(a - b) for a, b in zip(got, want)) < LOGPROB_ATOL
    assert len(ranks) == tp * pp
    # balanced: every rank holds about 1/N of the whole (an encoder runs whole on every stage)
    if not stages and not (pp > 1 and getattr(_configs()[family], "is_encoder_decoder", False)):
        share = whole / (tp * pp)
        for r, got in enumerate(ranks):
            assert abs(got - share) <= BYTES_TOLERANCE * share, (
                f"rank {r}: {got} parameter bytes, expected about {share:.0f} (whole {whole}, ranks {ranks})")


def test_partitioned_tp2_pp2_serves_the_same_tokens(reference, tmp_path):
    """Rank files written ahead of time (same pruning per stage) load and serve like the checkpoint."""
    from controller.acquire.partition import partition

    path, ref_tokens, _, _ = reference("llama")
    partition(path, tmp_path / "p", tp=2, pp=2, processes=1)
    tokens, _, ranks = _serve_once(tmp_path / "p", 2, 2, ())
    assert tokens == ref_tokens and len(ranks) == 4
