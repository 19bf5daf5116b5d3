"""The KV cache sized to the machine when its size is 0 (auto): worker.engine.build.auto_kv_cache_bytes."""

from pathlib import Path

from worker.engine.build import CPU_KV_CAP, CPU_KV_SHARE, activation_bytes, auto_kv_cache_bytes, build_engine
from worker.engine.engine import EngineConfig


class Cfg:
    hidden_size, intermediate_size, vocab_size = 64, 128, 512


def test_cpu_takes_a_share_of_available_memory_up_to_the_cap():
    config = EngineConfig(model_dir=Path("."), kv_cache_bytes=0)
    assert auto_kv_cache_bytes(config, Cfg(), available=4 << 30) == int((4 << 30) * CPU_KV_SHARE)
    assert auto_kv_cache_bytes(config, Cfg(), available=1 << 40) == CPU_KV_CAP


def test_gpu_keeps_the_activations_out_of_the_free_memory():
    config = EngineConfig(model_dir=Path("."), kv_cache_bytes=0, device="cuda")
    free = 8 << 30
    assert auto_kv_cache_bytes(config, Cfg(), available=free) == int(free * 0.9) - activation_bytes(config, Cfg())


def test_auto_size_builds_an_engine_that_holds_a_full_batch(tmp_path):
    from transformers import LlamaConfig

    from tests.oracle import make_random_model

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, architectures=["LlamaForCausalLM"])
    engine = build_engine(EngineConfig(model_dir=make_random_model(cfg, tmp_path), kv_cache_bytes=0, max_batch_size=4))
    assert engine.blocks.num_blocks * engine.config.block_size >= 4 * 64  # a tiny model: the full batch fits
