"""OPT: learned positions offset by 2, pre- or post-LayerNorm blocks (do_layer_norm_before),
optional project_in / project_out when word_embed_proj_dim != hidden_size, tied LM head."""

from __future__ import annotations

import torch
from torch import nn

from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from worker.layers.norm import LayerNorm
from worker.layers.position import ReplicatedEmbedding
from worker.models.base import DecoderModel, make_layers, map_with_prefix
from worker.models.common import SelfAttention, activation

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2 (a fairseq legacy)


def _norm(config) -> nn.Module:
    if not config.layer_norm_elementwise_affine:  # plain normalisation, nothing to load
        return nn.LayerNorm(config.hidden_size, 1e-5, elementwise_affine=False)
    return LayerNorm(config.hidden_size, 1e-5)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, bias = config.hidden_size, config.enable_bias
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = SelfAttention(hidden, config.num_attention_heads, qkv_name="qkv_proj", out_name="out_proj",
                                       qkv_bias=bias, out_bias=bias)
        self.self_attn_layer_norm = _norm(config)
        self.fc1 = ColumnParallelLinear(hidden, [config.ffn_dim], bias=bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, bias=bias)
        self.final_layer_norm = _norm(config)
        self.act = activation(config.activation_function)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ln1, ln2 = self.self_attn_layer_norm, self.final_layer_norm
        h = self.self_attn(positions, ln1(x) if self.pre_norm else x)
        x = x + h if self.pre_norm else ln1(x + h)
        h = self.fc2(self.act(self.fc1(ln2(x) if self.pre_norm else x)))
        return x + h if self.pre_norm else ln2(x + h)


class OPTForCausalLM(DecoderModel):
    """Checkpoint names follow transformers' OPTForCausalLM ('model.decoder.layers.N....')."""

    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}

    def __init__(self, config):
        super().__init__()
        self.config = config
        hidden, proj = config.hidden_size, config.word_embed_proj_dim
        self.model = nn.Module()
        d = self.model.decoder = nn.Module()
        d.embed_tokens = VocabParallelEmbedding(config.vocab_size, proj)
        d.embed_positions = ReplicatedEmbedding(config.max_position_embeddings + POSITION_OFFSET, hidden)
        d.project_in = ReplicatedLinear(proj, hidden) if proj != hidden else None
        d.project_out = ReplicatedLinear(hidden, proj) if proj != hidden else None
        d.layers = make_layers(config.num_hidden_layers, lambda i: OPTDecoderLayer(config))
        self.layers = d.layers
        keep_final = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        d.final_layer_norm = _norm(config) if keep_final else None
        self.lm_head = ParallelLMHead(config.vocab_size, proj)
        self.tie_head(config, self.lm_head, d.embed_tokens, default=True)

    def map_checkpoint_name(self, name: str):
        if name.startswith("decoder."):  # older checkpoints: no 'model.' prefix
            name = "model." + name
        return map_with_prefix(self, name, "model.")

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        d = self.model.decoder
        x = d.embed_tokens(input_ids)
        if d.project_in is not None:
            x = d.project_in(x)
        return x + d.embed_positions(positions + POSITION_OFFSET)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        d = self.model.decoder
        if d.final_layer_norm is not None:
            x = d.final_layer_norm(x)
        return d.project_out(x) if d.project_out is not None else x
