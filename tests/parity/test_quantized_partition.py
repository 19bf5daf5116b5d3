"""Partitions stored quantized (`shardserve partition --quantize int8|int4|w8a8`): each rank file holds the
tensors load-time quantization would make on that rank's shard, bit for bit, so served tokens and
logits are those of `serve --quantize` on the checkpoint at the same layout."""

from __future__ import annotations

import concurrent.futures as cf
import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from controller.acquire.partition import partition
from tests.oracle import make_random_model, run_ours
from worker.manifest import check_layout, read_manifest

PROMPTS = [[1, 5, 9, 77, 3], [200, 11, 42], [7] * 6]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """hidden 96: int4 groups of 32 (q/k/v, gate/up), 128 (down); at tp=2 o_proj has 48 inputs per rank,
    which no int4 group size divides: its last group of 64 is padded with 16 zero weights."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    return make_random_model(cfg, tmp_path_factory.mktemp("qpart") / "llama")


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
def test_tp1_partition_serves_the_load_time_tokens(llama_dir, tmp_path, method):
    m = partition(llama_dir, tmp_path / "p", tp=1, pp=1, processes=1, quantize=method)
    assert m["quantize"] == method and read_manifest(tmp_path / "p")["quantize"] == method
    tensors = m["ranks"][0]["tensors"]
    assert "model.layers.0.mlp.down_proj.qweight" in tensors and "model.layers.0.mlp.down_proj.weight" not in tensors
    assert ("model.layers.0.mlp.down_proj.zeros" in tensors) == (method == "int4")
    assert m["ranks"][0]["quantized_layers"] == 2 * 4  # qkv, o, gate_up, down per layer
    want_tokens, want_logits = run_ours(llama_dir, PROMPTS, NEW_TOKENS, quantize=method)
    tokens, logits = run_ours(tmp_path / "p", PROMPTS, NEW_TOKENS)  # no --quantize: the partition's own
    assert tokens == want_tokens and any(len(set(t)) > 2 for t in tokens)
    assert all(torch.equal(a, b) for a, b in zip(logits, want_logits))
    assert run_ours(tmp_path / "p", PROMPTS, NEW_TOKENS, quantize=method)[0] == want_tokens
    raw = (tmp_path / "p" / "rank-0.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    start = 8 + int.from_bytes(raw[:8], "little")
    for name, t in header.items():  # int8/uint8 next to fp32: every mapped tensor naturally aligned
        if name != "__metadata__":
            assert (start + t["data_offsets"][0]) % {"F32": 4, "I8": 1, "U8": 1}[t["dtype"]] == 0, name
    full = sum(f.stat().st_size for f in llama_dir.glob("*.safetensors"))
    assert (tmp_path / "p" / "rank-0.safetensors").stat().st_size < 0.6 * full


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
def test_tp2_rank_files_hold_the_load_time_quantization(llama_dir, tmp_path, method):
    """Each rank's file == what that rank's load-time quantization holds, tensor for tensor."""
    from worker.distributed import ParallelState, reset_parallel_state, set_parallel_state
    from worker.layers.linear import QUANT_BUFFERS, quantize_model
    from worker.loader import load_weights
    from worker.model_config import load_config
    from worker.models.registry import model_class

    m = partition(llama_dir, tmp_path / "p", tp=2, pp=1, processes=1, quantize=method)
    config = load_config(llama_dir)
    for entry in m["ranks"]:
        set_parallel_state(ParallelState(tp_rank=entry["tp_rank"], tp_size=2, pp_rank=0, pp_size=1))
        try:
            model = model_class(config)(config)
            load_weights(model, llama_dir)
            quantize_model(model, method)
        finally:
            reset_parallel_state()
        want = dict(model.named_parameters())
        for prefix, layer in model.named_modules():
            if getattr(layer, "quant", None):
                want.update({f"{prefix}.{k}": getattr(layer, k) for k in QUANT_BUFFERS if getattr(layer, k) is not None})
        with safe_open(str(tmp_path / "p" / entry["file"]), framework="pt") as f:
            assert set(f.keys()) == set(want)
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), want[name]), name
        o_proj = "model.layers.0.self_attn.o_proj"
        assert f"{o_proj}.weight" not in want  # 48 inputs per rank: int4 pads the last group
        if method == "int4":
            assert tuple(want[f"{o_proj}.qweight"].shape) == (96, 32) and tuple(want[f"{o_proj}.scales"].shape) == (96, 1)
    # the partitioner processes' command line (python -m worker.partition_rank) writes the same file
    from worker.partition_rank import main

    (tmp_path / "cli").mkdir()
    assert main([str(llama_dir), str(tmp_path / "cli"), "--tp", "2", "--rank", "1", "--quantize", method]) == 0
    assert (tmp_path / "cli" / "rank-1.safetensors").read_bytes() == (tmp_path / "p" / "rank-1.safetensors").read_bytes()


def test_quantize_mismatch_is_refused(llama_dir, tmp_path):
    from worker.engine.build import build_engine
    from worker.engine.engine import EngineConfig

    partition(llama_dir, tmp_path / "p", tp=1, pp=1, processes=1, quantize="int8")
    with pytest.raises(ValueError, match=r"quantize=int8.*--quantize int4"):
        build_engine(EngineConfig(model_dir=tmp_path / "p", max_model_len=64, quantize="int4"))
    with pytest.raises(ValueError, match=r"quantize=int8.*quantize=int4"):
        check_layout(tmp_path / "p", 1, 1, "fp32", "int4")
    assert check_layout(tmp_path / "p", 1, 1, "fp32", None)["quantize"] == "int8"


def test_full_precision_partition_quantizes_at_load(llama_dir, tmp_path):
    """A manifest from before quantized partitions (no "quantize" key) still loads; --quantize applies at load."""
    partition(llama_dir, tmp_path / "p", tp=1, pp=1, processes=1)
    manifest = tmp_path / "p" / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["quantize"]
    manifest.write_text(json.dumps(old))
    assert check_layout(tmp_path / "p", 1, 1, "fp32", "int4")["layout"] == {"tp": 1, "pp": 1}
    want = run_ours(llama_dir, PROMPTS, NEW_TOKENS, quantize="int4")
    got = run_ours(tmp_path / "p", PROMPTS, NEW_TOKENS, quantize="int4")
    assert got[0] == want[0] and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def test_runtime_partition_is_stored_quantized_and_keyed(llama_dir, tmp_path):
    from controller.acquire.prepare import prepare_model

    q = prepare_model(str(llama_dir), tmp_path, tp=1, pp=2, quantize="int8", progress=False, processes=1)
    assert q.partition == "created" and q.path.name.endswith("-tp1-pp2-fp32-int8")
    assert read_manifest(q.path)["quantize"] == "int8"
    plain = prepare_model(str(llama_dir), tmp_path, tp=1, pp=2, progress=False, processes=1)
    assert plain.partition == "created" and plain.path.name.endswith("-tp1-pp2-fp32")
    again = prepare_model(str(llama_dir), tmp_path, tp=1, pp=2, quantize="int8", progress=False, processes=1)
    assert again.partition == "reused" and again.path == q.path


def _serve(model_dir: Path, tp: int, quantize: str | None) -> list[list[int]]:
    from controller.fleet.replica import Replica, ReplicaSpec
    from shardserve.v1 import worker_pb2 as wpb

    spec = ReplicaSpec(model_dir=model_dir, tensor_parallel=tp, quantize=quantize, max_model_len=64,
                       num_kv_blocks=32, block_size=8, collective_timeout_s=60.0, max_restarts=0)
    replica = Replica(f"q-tp{tp}", spec, Path(tempfile.mkdtemp(prefix="shardserve-test-")))
    replica.start()
    try:
        def one(i):
            req = wpb.WorkerGenerateRequest(request_id=f"r{i}", prompt_token_ids=PROMPTS[i], sampling=wpb.SamplingParams(
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS))
            toks = []
            for msg in replica.generate(req, timeout=120):
                assert msg.finish_reason != wpb.WORKER_FINISH_ERROR, msg.error
                toks += list(msg.token_ids)
            return toks

        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            return list(pool.map(one, range(len(PROMPTS))))
    finally:
        replica.stop()


def test_tp2_served_partition_gives_the_load_time_tokens(llama_dir, tmp_path):
    """Two real worker processes load their int4 rank files (o_proj left unquantized on both ranks)."""
    partition(llama_dir, tmp_path / "p", tp=2, pp=1, processes=1, quantize="int4")
    assert _serve(tmp_path / "p", 2, None) == _serve(llama_dir, 2, "int4")
