"""The benchmark's models, built once into the cache: the demo model and a ~300M-parameter Llama
with random weights (the demo tokenizer, vocab 4096). Random weights time the same as trained ones."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

LLAMA_300M = "bench-llama-300m-v1"


def demo(cache: Path) -> Path:
    from controller.acquire.demo_model import demo_model_path

    return demo_model_path(cache)


def llama_300m(cache: Path) -> Path:
    """hidden 1024, 24 layers, MLP 2816, 16 heads (8 KV), vocab 4096: 306M parameters, fp32 safetensors."""
    target = Path(cache) / LLAMA_300M
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src = demo(cache)
    tmp = Path(tempfile.mkdtemp(prefix=".llama300m-", dir=cache))
    try:
        for f in src.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, tmp / f.name)
        config = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=1024,
                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, rms_norm_eps=1e-5)
        torch.manual_seed(0)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.03)
                else:
                    p.fill_(1.0)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
