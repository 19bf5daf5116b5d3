"""GPT-2: learned absolute positions, pre-LayerNorm blocks, tied LM head.

Checkpoint quirk: GPT-2's Conv1D stores weights [in, out] (transposed against nn.Linear), and
c_attn holds q, k and v concatenated along `out`; both are handled by views at load time.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear
from worker.layers.norm import LayerNorm
from worker.layers.position import ReplicatedEmbedding
from worker.layers.views import row_block, set_loader, transposed
from worker.models.base import DecoderModel, make_layers, map_with_prefix
from worker.models.common import SelfAttention, activation


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        head_dim = hidden // config.num_attention_heads
        scale = head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.ln_1 = LayerNorm(hidden, eps)
        self.attn = SelfAttention(hidden, config.num_attention_heads, qkv_name="c_attn", out_name="c_proj",
                                  qkv_bias=True, out_bias=True, scale=scale)
        self.ln_2 = LayerNorm(hidden, eps)
        inner = config.n_inner or 4 * hidden
        self.mlp = nn.Module()
        self.mlp.c_fc = ColumnParallelLinear(hidden, [inner], bias=True)
        self.mlp.c_proj = RowParallelLinear(inner, hidden, bias=True)
        self.act = activation(config.activation_function)
        # Conv1D weights are [in, out]; c_attn is [q | k | v] along out
        set_loader(self.attn.c_attn, wrap=transposed,
                   split=lambda t: [(s, row_block(t, i * hidden, hidden)) for i, s in enumerate("qkv")])
        for lin in (self.attn.c_proj, self.mlp.c_fc, self.mlp.c_proj):
            set_loader(lin, wrap=transposed)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h, x = self.ln_2(self.attn(positions, self.ln_1(x)), residual=x)  # x += attention; h = ln_2(x)
        return x + self.mlp.c_proj(self.act(self.mlp.c_fc(h)))


class GPT2LMHeadModel(DecoderModel):
    """Checkpoint names follow transformers' GPT2LMHeadModel ('transformer.h.N....')."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.transformer = nn.Module()
        self.transformer.wte = VocabParallelEmbedding(config.vocab_size, hidden)
        self.transformer.wpe = ReplicatedEmbedding(config.max_position_embeddings, hidden)
        self.transformer.h = make_layers(config.num_hidden_layers, lambda i: GPT2Block(config, i))
        self.layers = self.transformer.h
        self.transformer.ln_f = LayerNorm(hidden, config.layer_norm_epsilon)
        self.lm_head = ParallelLMHead(config.vocab_size, hidden)
        self.tie_head(config, self.lm_head, self.transformer.wte, default=True)

    def map_checkpoint_name(self, name: str):
        # attn.bias / attn.masked_bias: causal-mask buffers of older checkpoints
        return map_with_prefix(self, name, "transformer.", ignored=(".attn.bias", ".attn.masked_bias"))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer.wte(input_ids) + self.transformer.wpe(positions)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(x)
