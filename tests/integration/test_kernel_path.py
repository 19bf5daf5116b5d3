"""The worker reports which kernels it runs (Status.kernel_path) and serves quantized weights:
"native" when the CPU extension is built (`make native`), "torch" with SHARDSERVE_NATIVE=0."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from controller.fleet.replica import Replica, ReplicaSpec
from shardserve.v1 import worker_pb2 as wpb
from tests.oracle import make_random_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return make_random_model(cfg, tmp_path_factory.mktemp("kp") / "llama")


def _serve(model: Path, quantize: str, tp: int = 1, test_hooks: tuple[str, ...] = ()) -> tuple[str, list[int]]:
    spec = ReplicaSpec(model_dir=model, quantize=quantize, max_model_len=64, num_kv_blocks=16, threads=1,
                       max_restarts=0, tensor_parallel=tp, test_hooks=test_hooks)
    replica = Replica(f"kp-{quantize}", spec, Path(tempfile.mkdtemp(prefix="shardserve-test-")))
    replica.start()
    try:
        req = wpb.WorkerGenerateRequest(request_id="r", prompt_token_ids=[1, 2, 3],
                                        sampling=wpb.SamplingParams(max_new_tokens=4, min_new_tokens=4))
        tokens = [t for msg in replica.generate(req, timeout=60) for t in msg.token_ids]
        assert (replica.status.block_size, replica.status.stats.kv_blocks_total) == (16, 16)  # beam limits
        return replica.status.kernel_path, tokens
    finally:
        replica.stop()


def test_native_when_built(model):
    from native import build

    if not build.is_current("cpu"):
        pytest.skip("native CPU extension not built (`make native`)")
    path, tokens = _serve(model, "int8")
    assert path == "native" and len(tokens) == 4


def test_torch_when_disabled(model, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_NATIVE", "0")
    path, tokens = _serve(model, "int4")
    assert path == "torch" and len(tokens) == 4


@pytest.mark.parametrize("tp", [1, 2])
def test_a_native_failure_at_warm_up_falls_back_to_torch(model, tp):
    """tp=1: the worker switches to torch in-process; tp=2: rank 0 reports a native warm-up failure and
    exits, and the controller restarts both ranks on the torch path (the group cannot switch
    mid-collective). The failure is injected by a test hook module the workers import."""
    from native import build

    if not build.is_current("cpu"):
        pytest.skip("native CPU extension not built (`make native`)")
    path, tokens = _serve(model, "", tp=tp, test_hooks=("tests.integration.native_warmup_hook",))
    assert path == "torch" and len(tokens) == 4
