"""Ahead-of-time partitioning: rank files + manifest, served with the same tokens; cache reuse."""

import json

import pytest
from safetensors import safe_open

from controller.partition import ensure_partition, partition, read_manifest, source_hash
from tests.oracle import make_random_model, run_ours

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
