"""GPT-NeoX (Pythia, GPT-NeoX-20B): partial rotary (rotate-half on the first rotary_dims of each
head), parallel residual (x + attn(ln1 x) + mlp(ln2 x)) or sequential, per-head fused
query_key_value ([heads, 3, head_dim] along out), untied embed_out by default."""

from __future__ import annotations

import torch
from torch import nn

from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear
from worker.layers.norm import LayerNorm
from worker.layers.rotary import RotaryEmbedding, rope_inv_freq
from worker.layers.views import per_head_part, set_loader
from worker.models.base import DecoderModel, make_layers, map_with_prefix
from worker.models.common import SelfAttention, activation


class GPTNeoXLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, heads, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
        head_dim = hidden // heads
        rotary_dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq, scaling = rope_inv_freq(config, head_dim, rotary_dim)
        self.parallel_residual = config.use_parallel_residual
        self.input_layernorm = LayerNorm(hidden, eps)
        self.post_attention_layernorm = LayerNorm(hidden, eps)
        bias = bool(getattr(config, "attention_bias", True))
        self.attention = SelfAttention(hidden, heads, qkv_name="query_key_value", out_name="dense", qkv_bias=bias,
                                       out_bias=bias, rotary=RotaryEmbedding(inv_freq, scaling, neox_style=True))
        set_loader(self.attention.query_key_value,
                   split=lambda t: [(s, per_head_part(t, heads, 3, i)) for i, s in enumerate("qkv")])
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = ColumnParallelLinear(hidden, [config.intermediate_size], bias=True)
        self.mlp.dense_4h_to_h = RowParallelLinear(config.intermediate_size, hidden, bias=True)
        self.act = activation(config.hidden_act)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.dense_4h_to_h(self.act(self.mlp.dense_h_to_4h(x)))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        attn = self.attention(positions, self.input_layernorm(x))
        if self.parallel_residual:
            return x + attn + self._mlp(self.post_attention_layernorm(x))
        h, x = self.post_attention_layernorm(attn, residual=x)  # x += attention; h = norm(x)
        return x + self._mlp(h)


class GPTNeoXForCausalLM(DecoderModel):
    """Checkpoint names follow transformers' GPTNeoXForCausalLM ('gpt_neox.layers.N....', 'embed_out')."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.gpt_neox = nn.Module()
        self.gpt_neox.embed_in = VocabParallelEmbedding(config.vocab_size, hidden)
        self.gpt_neox.layers = make_layers(config.num_hidden_layers, lambda i: GPTNeoXLayer(config))
        self.layers = self.gpt_neox.layers
        self.gpt_neox.final_layer_norm = LayerNorm(hidden, config.layer_norm_eps)
        self.embed_out = ParallelLMHead(config.vocab_size, hidden)
        self.tie_head(config, self.embed_out, self.gpt_neox.embed_in, default=False)

    def map_checkpoint_name(self, name: str):
        if self.tied and name == "embed_out.weight":
            return None  # the same tensor as embed_in
        if name.startswith("embed_out."):
            return name, None
        return map_with_prefix(self, name, "gpt_neox.", ignored=(".attention.bias", ".attention.masked_bias",
                                                                 ".rotary_emb.inv_freq"))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.gpt_neox.embed_in(input_ids)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.gpt_neox.final_layer_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embed_out(hidden).float()
