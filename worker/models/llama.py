"""Llama-family decoder (Llama, Mistral, Qwen2): the math only; sharding lives in the layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.layers.attention import PagedAttention
from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from worker.layers.norm import RMSNorm
from worker.layers.rotary import RotaryEmbedding, rope_inv_freq
from worker.models.base import DecoderModel, make_layers


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, hidden,
                                        bias=bool(getattr(config, "attention_bias", False)))
        self.num_heads = self.qkv_proj.local_heads
        self.num_kv_heads = self.qkv_proj.local_kv_heads
        inv_freq, scaling = rope_inv_freq(config, self.head_dim)
        rotary = RotaryEmbedding(inv_freq, scaling, neox_style=True)
        # Mistral: every layer slides; Qwen2: `layer_types` says which layers do (those from
        # max_window_layers on, and only with use_sliding_window; the config clears the window otherwise)
        window = getattr(config, "sliding_window", None)
        if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        layer_types = getattr(config, "layer_types", None)
        if window is not None and layer_types is not None:
            window = window if layer_types[layer_idx] == "sliding_attention" else None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, sliding_window=window,
                                   rotary=rotary)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        o = self.attn(q, k, v, positions)  # [T, H, D]; rotary applied as k is cached
        return self.o_proj(o.reshape(o.shape[0], -1))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inter = config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported for Llama-family models (silu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(positions, self.input_layernorm(x))
        h, x = self.post_attention_layernorm(h, residual=x)  # x += attention; h = norm(x)
        return x + self.mlp(h)


class LlamaForCausalLM(DecoderModel):
    """Checkpoint names follow transformers' LlamaForCausalLM ('model.layers.N....')."""

    # checkpoint sub-name -> (our packed parameter, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # checkpoint tensors we know and deliberately do not load
    ignored_checkpoint_suffixes = ("rotary_emb.inv_freq",)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.model.layers = make_layers(config.num_hidden_layers, lambda i: LlamaDecoderLayer(config, i))
        self.layers = self.model.layers
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_head(config, self.lm_head, self.model.embed_tokens, default=False)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)
