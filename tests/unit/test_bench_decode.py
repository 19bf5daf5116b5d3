"""bench/decode.py end to end on a tiny random Llama: our engine (fp32, int8) and transformers, two decode
steps, the step breakdown; every row has its figures. Checks the bench runs, never how fast."""

from __future__ import annotations

import json

from tests.oracle import make_random_model


def test_decode_bench_runs(tmp_path):
    from transformers import LlamaConfig

    from bench import decode

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = make_random_model(cfg, tmp_path / "llama")
    out = tmp_path / "decode.json"
    assert decode.main(["--model-dir", str(model), "--variants", "fp32,int8,hf", "--tokens", "2", "--prompt", "4",
                        "--batches", "1,2", "--reps", "1", "--profile-steps", "2", "--bandwidth-gib", "0.01",
                        "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    got = {(r["variant"], r["batch"]) for r in doc["results"]}
    assert got == {("ours fp32", 1), ("ours fp32", 2), ("ours fp32 int8", 1), ("ours fp32 int8", 2),
                   ("transformers fp32", 1)}
    for r in doc["results"]:  # (transformers' decode time is a difference of two runs: any sign at 2 tokens)
        assert r["size_bytes"] > 0 and r["floor_ms_per_step"] > 0
        if r["variant"].startswith("ours"):
            assert r["tokens_per_s"] > 0 and r["x_floor"] > 0
    int8 = next(r for r in doc["results"] if r["variant"] == "ours fp32 int8")
    fp32 = next(r for r in doc["results"] if r["variant"] == "ours fp32")
    assert int8["weight_bytes_per_step"] < fp32["weight_bytes_per_step"]
    assert doc["profile"]["hooks_ms_per_step"]["linear layers"] > 0
    assert doc["machine"]["kernel_path"] in ("native", "torch")
