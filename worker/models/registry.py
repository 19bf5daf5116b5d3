"""Architecture name (config.json `architectures[0]`) -> our model class."""

from __future__ import annotations

import importlib

# architecture -> "module:Class"
_MODELS = {
    "LlamaForCausalLM": "worker.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "worker.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "worker.models.llama:LlamaForCausalLM",
    "GPT2LMHeadModel": "worker.models.gpt2:GPT2LMHeadModel",
    "OPTForCausalLM": "worker.models.opt:OPTForCausalLM",
    "BloomForCausalLM": "worker.models.bloom:BloomForCausalLM",
    "GPTNeoXForCausalLM": "worker.models.gpt_neox:GPTNeoXForCausalLM",
    "GPTJForCausalLM": "worker.models.gptj:GPTJForCausalLM",
    "T5ForConditionalGeneration": "worker.models.t5:T5ForConditionalGeneration",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(config):
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in _MODELS:
            module, cls = _MODELS[arch].split(":")
            return getattr(importlib.import_module(module), cls)
    raise ValueError(
        f"unsupported architecture {archs or config.model_type!r}; supported: {', '.join(supported_architectures())}"
    )


def is_encoder_decoder(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def max_positions(config) -> int:
    """The longest sequence (prompt + generated, decoder side for T5) a model handles: its class's
    `max_positions(config)` where it has no position table, else max_position_embeddings."""
    custom = getattr(model_class(config), "max_positions", None)
    if custom is not None:
        return int(custom(config))
    return int(config.max_position_embeddings)
