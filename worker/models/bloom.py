"""BLOOM: ALiBi position biases (slopes sliced to this rank's heads), a LayerNorm right after
the word embeddings, per-head fused query_key_value ([heads, 3, head_dim] along out), tied head."""

from __future__ import annotations

import torch
from torch import nn

from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear
from worker.layers.norm import LayerNorm
from worker.layers.views import per_head_part, set_loader
from worker.models.base import DecoderModel, make_layers, map_with_prefix
from worker.models.common import SelfAttention

DEFAULT_MAX_LEN = 2048  # ALiBi has no position table; BLOOM was trained on 2048-token sequences


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's tanh-approximated GELU with its own rounded constant."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, eps, heads = config.hidden_size, config.layer_norm_epsilon, config.n_head
        self.input_layernorm = LayerNorm(hidden, eps)
        self.self_attention = SelfAttention(hidden, heads, qkv_name="query_key_value", out_name="dense",
                                            qkv_bias=True, out_bias=True, alibi=True)
        set_loader(self.self_attention.query_key_value,
                   split=lambda t: [(s, per_head_part(t, heads, 3, i)) for i, s in enumerate("qkv")])
        self.post_attention_layernorm = LayerNorm(hidden, eps)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = ColumnParallelLinear(hidden, [4 * hidden], bias=True)
        self.mlp.dense_4h_to_h = RowParallelLinear(4 * hidden, hidden, bias=True)
        self.residual_post_ln = config.apply_residual_connection_post_layernorm

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = (h if self.residual_post_ln else x) + self.self_attention(positions, h)
        h = self.post_attention_layernorm(x)
        return (h if self.residual_post_ln else x) + self.mlp.dense_4h_to_h(bloom_gelu(self.mlp.dense_h_to_4h(h)))


class BloomForCausalLM(DecoderModel):
    """Checkpoint names follow transformers' BloomForCausalLM ('transformer.h.N....')."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.transformer = nn.Module()
        self.transformer.word_embeddings = VocabParallelEmbedding(config.vocab_size, hidden)
        self.transformer.word_embeddings_layernorm = LayerNorm(hidden, config.layer_norm_epsilon)
        self.transformer.h = make_layers(config.n_layer, lambda i: BloomBlock(config))
        self.layers = self.transformer.h
        self.transformer.ln_f = LayerNorm(hidden, config.layer_norm_epsilon)
        self.lm_head = ParallelLMHead(config.vocab_size, hidden)
        self.tie_head(config, self.lm_head, self.transformer.word_embeddings, default=True)

    @staticmethod
    def max_positions(config) -> int:
        return int(getattr(config, "seq_length", 0) or DEFAULT_MAX_LEN)

    def map_checkpoint_name(self, name: str):
        return map_with_prefix(self, name, "transformer.")

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer.word_embeddings_layernorm(self.transformer.word_embeddings(input_ids))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(x)
