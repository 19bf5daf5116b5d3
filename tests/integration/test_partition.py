"""Ahead-of-time partitioning: rank files + manifest, served with the same tokens; cache reuse."""

import json

import pytest
from safetensors import safe_open

from controller.acquire.partition import ensure_partition, partition, source_hash
from tests.oracle import make_random_model, run_ours
from worker.manifest import read_manifest

PROMPTS = [[1, 5, 9, 200, 17], [1, 88]]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    return make_random_model(cfg, tmp_path_factory.mktemp("llama"))


def test_partition_writes_rank_files_and_manifest(llama_dir, tmp_path):
    m = partition(llama_dir, tmp_path / "p", tp=2, pp=2, processes=2)
    assert read_manifest(tmp_path / "p") == json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert m["layout"] == {"tp": 2, "pp": 2} and m["source"]["hash"] == source_hash(llama_dir)
    assert [r["layers"] for r in m["ranks"]] == [[0, 2], [0, 2], [2, 4], [2, 4]]
    for r in m["ranks"]:
        with safe_open(str(tmp_path / "p" / r["file"]), framework="pt") as f:
            names = set(f.keys())
            assert names == set(r["tensors"])
            assert all(list(f.get_slice(n).get_shape()) == r["tensors"][n] for n in names)
        # a rank holds only its own stage's layers and its half of each sharded matrix
        layer_ids = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert layer_ids == set(range(*r["layers"]))
        assert r["tensors"][f"model.layers.{r['layers'][0]}.self_attn.qkv_proj.weight"] == [64, 64]
    assert (tmp_path / "p" / "config.json").is_file()


def test_served_partition_gives_the_same_tokens(llama_dir, tmp_path):
    partition(llama_dir, tmp_path / "p1", tp=1, pp=1, processes=1)
    base, _ = run_ours(llama_dir, PROMPTS, 8)
    parted, _ = run_ours(tmp_path / "p1", PROMPTS, 8)
    assert parted == base


def test_cache_reuses_a_partition(llama_dir, tmp_path):
    first, reused = ensure_partition(llama_dir, tmp_path, 1, 2, "fp32", processes=1)
    assert not reused
    again, reused = ensure_partition(llama_dir, tmp_path, 1, 2, "fp32", processes=1)
    assert reused and again == first
    other, reused = ensure_partition(llama_dir, tmp_path, 2, 1, "fp32", processes=1)
    assert not reused and other != first


def test_rank_file_is_memory_mapped_not_copied(llama_dir, tmp_path):
    """On CPU a worker's parameters are views of its own mapped rank file (no copy, no other rank's file)."""
    from worker.engine.build import build_engine
    from worker.engine.engine import EngineConfig

    partition(llama_dir, tmp_path / "p", tp=1, pp=1, processes=1)
    engine = build_engine(EngineConfig(model_dir=tmp_path / "p", num_kv_blocks=64))
    rank_file = str((tmp_path / "p" / "rank-0.safetensors").resolve())
    mapped = [line for line in open("/proc/self/maps") if line.rstrip().endswith(rank_file)]
    assert mapped, "the rank file is not mapped"
    spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in mapped]
    params = list(engine.model.parameters())
    inside = [p for p in params if any(lo <= p.data_ptr() < hi for lo, hi in spans)]
    assert len(inside) == len(params)


def test_scaled_rope_model_partitions(tmp_path):
    """The model is built on the meta device while partitioning; scaled RoPE must still get real numbers."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64},
                      architectures=["LlamaForCausalLM"])
    src = make_random_model(cfg, tmp_path / "m")
    partition(src, tmp_path / "p", tp=1, pp=1, processes=1)
    assert run_ours(tmp_path / "p", PROMPTS, 8)[0] == run_ours(src, PROMPTS, 8)[0]


LOAD_WITHOUT_TRANSFORMERS = """
import sys
from pathlib import Path
from worker.engine.build import build_engine
from worker.engine.engine import EngineConfig
build_engine(EngineConfig(model_dir=Path(sys.argv[1]), num_kv_blocks=32))
print(sorted(m for m in sys.modules if m == "transformers" or m.startswith("transformers.")))
"""


def test_a_worker_loads_a_partition_without_importing_transformers(llama_dir, tmp_path):
    """The partitioner resolves the config (every default filled) into the manifest: importing
    transformers is ~1 s of a worker's start that a partition no longer pays."""
    import subprocess
    import sys

    from tests.integration.server import ROOT

    m = partition(llama_dir, tmp_path / "p", tp=1, pp=1, processes=1)
    assert m["resolved_config"]["num_key_value_heads"] == 2 and "resolved_config" not in m["ranks"][0]
    r = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_TRANSFORMERS, str(tmp_path / "p")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
