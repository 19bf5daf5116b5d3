"""Tensor and pipeline parallelism over real worker processes (CPU, gloo): same greedy tokens and
log-probs as one process, and each rank holds about 1/N of the parameters.

Each layout launches a real replica (controller.replica.Replica: layout check, placement, one
process per rank, torch.distributed rendezvous) and talks to its leader over worker.proto, as the
controller does. Families plug in through FAMILIES: a family runs once its architecture is in the
worker's registry.
"""

from __future__ import annotations

import concurrent.futures as cf
import tempfile
from pathlib import Path

import pytest

from controller.replica import Replica, ReplicaSpec
from shardserve.v1 import worker_pb2 as wpb
from tests.oracle import make_random_model
from worker.models.registry import supported_architectures

NEW_TOKENS = 6
# one prompt longer than the step's token budget, so prefill runs in chunks that sample nothing
PROMPTS = [[1, 5, 9, 200, 17], [1] + list(range(30, 58)), [1, 88, 3]]
MAX_BATCH_TOKENS = 16
LOGPROB_ATOL = 1e-3  # fp32; all-reduce sums partial products in another order
BYTES_TOLERANCE = 0.10  # per-rank parameter bytes within 10 % of whole / ranks


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=384, n_embd=64, n_layer=4, n_head=4, n_positions=64,
                      tie_word_embeddings=False, architectures=["GPT2LMHeadModel"])


def _bloom():
    from transformers import BloomConfig

    return BloomConfig(vocab_size=384, hidden_size=64, n_layer=4, n_head=4, tie_word_embeddings=False,
                       architectures=["BloomForCausalLM"])


def _t5():
    from transformers import T5Config

    return T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                    num_heads=4, tie_word_embeddings=False, decoder_start_token_id=0,
                    architectures=["T5ForConditionalGeneration"])


# family -> (config factory, layouts (tp, pp, stage_layers) beyond tp=1)
FAMILIES = {
    "llama": (_llama, [(2, 1, ()), (1, 2, ()), (2, 2, (3, 1))]),
    "gpt2": (_gpt2, [(2, 1, ()), (1, 2, ())]),
    "bloom": (_bloom, [(2, 1, ()), (1, 2, ())]),
    "t5": (_t5, [(2, 1, ()), (1, 2, ()), (2, 2, ())]),
}


def _cases():
    archs = set(supported_architectures())
    for family, (factory, layouts) in FAMILIES.items():
        for tp, pp, stages in layouts:
            arch = factory().architectures[0]
            marks = () if arch in archs else pytest.mark.skip(reason=f"{arch} not in the worker's registry yet")
            yield pytest.param(family, tp, pp, stages, id=f"{family}-tp{tp}-pp{pp}" + ("-split" if stages else ""),
                               marks=marks)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """family -> (model dir, tokens, log-probs, whole-model parameter bytes) from one in-process
    engine (world size 1), built lazily."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            config = FAMILIES[family][0]()
            model_cls = None
            if getattr(config, "is_encoder_decoder", False):
                from transformers import AutoModelForSeq2SeqLM as model_cls
            path = make_random_model(config, tmp_path_factory.mktemp(family), model_cls=model_cls)
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
    seqs = [Sequence(f"r{i}", list(p), Sampling(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS),
                     emit=lambda t, lp, fin, err, i=i: done.add(i) if fin else None) for i, p in enumerate(PROMPTS)]
    lps: dict[str, list[float]] = {s.request_id: [] for s in seqs}

    def hook(sampled, logits):
        for i, s in enumerate(sampled):
            lps[s.request_id].append(logits[i])

    engine.logits_hook = hook
    for s in seqs:
        engine.add(s)
    while len(done) < len(seqs):
        engine.step()
    logprobs = [[float(torch.log_softmax(lg, -1)[t]) for lg, t in zip(lps[s.request_id], s.generated)] for s in seqs]
    return [s.generated for s in seqs], logprobs, engine.param_bytes


def _serve_once(model_dir: Path, tp: int, pp: int, stages: tuple[int, ...]):
    """Launch a replica with this layout, run every prompt concurrently (one batch), stop it.
    Returns (tokens per prompt, log-probs per prompt, parameter bytes per rank)."""
    spec = ReplicaSpec(model_dir=model_dir, tp=tp, pp=pp, stage_layers=stages, max_model_len=96,
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
    if not stages:  # balanced: every rank holds about 1/N of the whole
        share = whole / (tp * pp)
        for r, got in enumerate(ranks):
            assert abs(got - share) <= BYTES_TOLERANCE * share, (
                f"rank {r}: {got} parameter bytes, expected about {share:.0f} (whole {whole}, ranks {ranks})")


def test_partitioned_tp2_pp2_serves_the_same_tokens(reference, tmp_path):
    """Rank files written ahead of time (same pruning per stage) load and serve like the checkpoint."""
    from controller.partition import partition

    path, ref_tokens, _, _ = reference("llama")
    partition(path, tmp_path / "p", tp=2, pp=2, processes=1)
    tokens, _, ranks = _serve_once(tmp_path / "p", 2, 2, ())
    assert tokens == ref_tokens and len(ranks) == 4
