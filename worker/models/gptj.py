"""GPT-J: interleaved ("every two") rotary on the first rotary_dim dims of each head, attention
and MLP in parallel off one LayerNorm (x + attn(ln x) + mlp(ln x)), untied LM head with bias."""

from __future__ import annotations

import torch
from torch import nn

from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear
from worker.layers.norm import LayerNorm
from worker.layers.rotary import RotaryEmbedding
from worker.models.base import DecoderModel, make_layers, map_with_prefix
from worker.models.common import SelfAttention, activation


class GPTJBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        rotary_dim = config.rotary_dim or head_dim
        # GPT-J's fixed sinusoid table: base 10000, no scaling types in its config
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
        self.ln_1 = LayerNorm(hidden, config.layer_norm_epsilon)
        self.attn = SelfAttention(hidden, heads, qkv_name="qkv_proj", out_name="out_proj", qkv_bias=False,
                                  out_bias=False, rotary=RotaryEmbedding(inv_freq.float(), neox_style=False))
        inner = config.n_inner or 4 * hidden
        self.mlp = nn.Module()
        self.mlp.fc_in = ColumnParallelLinear(hidden, [inner], bias=True)
        self.mlp.fc_out = RowParallelLinear(inner, hidden, bias=True)
        self.act = activation(config.activation_function)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        return x + self.attn(positions, h) + self.mlp.fc_out(self.act(self.mlp.fc_in(h)))


class GPTJForCausalLM(DecoderModel):
    """Checkpoint names follow transformers' GPTJForCausalLM ('transformer.h.N....')."""

    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}

    def __init__(self, config):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.transformer = nn.Module()
        self.transformer.wte = VocabParallelEmbedding(config.vocab_size, hidden)
        self.transformer.h = make_layers(config.n_layer, lambda i: GPTJBlock(config))
        self.layers = self.transformer.h
        self.transformer.ln_f = LayerNorm(hidden, config.layer_norm_epsilon)
        self.lm_head = ParallelLMHead(config.vocab_size, hidden, bias=True)  # tied or not, the head has a bias
        self.tie_head(config, self.lm_head, self.transformer.wte, default=False)

    def map_checkpoint_name(self, name: str):
        return map_with_prefix(self, name, "transformer.", ignored=(".attn.bias", ".attn.masked_bias"))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer.wte(input_ids)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(x)
