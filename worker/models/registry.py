"""Architecture name (config.json `architectures[0]`) -> our model class."""

from __future__ import annotations

import importlib

# architecture -> "module:Class"
_MODELS = {
    "LlamaForCausalLM": "worker.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "worker.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "worker.models.llama:LlamaForCausalLM",
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
