"""Pieces shared by the GPT-style families: multi-head self-attention over the paged cache with
packed q/k/v, and activations by their config names. Attribute names are given by each family so
that our parameter names mirror its checkpoint names."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from worker.layers.attention import PagedAttention
from worker.layers.linear import QKVParallelLinear, RowParallelLinear
from worker.layers.position import alibi_slopes, local_heads
from worker.layers.rotary import RotaryEmbedding


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:  # transformers' NewGELUActivation, op for op
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _fast_gelu(x: torch.Tensor) -> torch.Tensor:  # transformers' FastGELUActivation, op for op
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:  # transformers' QuickGELUActivation, op for op
    return x * torch.sigmoid(1.702 * x)


# The config names the supported families use, written as transformers writes them (bit-identical:
# tests/unit/test_activations.py), so that building a model needs no transformers import.
ACTIVATIONS = {
    "gelu": F.gelu, "gelu_new": _tanh_gelu, "gelu_fast": _fast_gelu, "quick_gelu": _quick_gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"), "relu": F.relu, "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str):
    """transformers' activation of that config name (gelu_new, gelu, relu, ...), exactly."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class SelfAttention(nn.Module):
    """x [T, hidden] -> [T, hidden]; heads split over tensor-parallel ranks by the packed qkv
    (column-parallel) and the output projection (row-parallel, bias added once)."""

    def __init__(self, hidden: int, num_heads: int, *, qkv_name: str, out_name: str, qkv_bias: bool,
                 out_bias: bool, rotary: RotaryEmbedding | None = None, alibi: bool = False,
                 scale: float | None = None, sliding_window: int | None = None):
        super().__init__()
        self.head_dim = hidden // num_heads
        self.qkv_name, self.out_name = qkv_name, out_name
        qkv = QKVParallelLinear(hidden, self.head_dim, num_heads, num_heads, bias=qkv_bias)
        setattr(self, qkv_name, qkv)
        setattr(self, out_name, RowParallelLinear(num_heads * self.head_dim, hidden, bias=out_bias))
        self.num_heads = qkv.local_heads
        slopes = alibi_slopes(num_heads)[local_heads(num_heads)] if alibi else None
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale=scale,
                                   sliding_window=sliding_window, alibi_slopes=slopes, rotary=rotary)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = getattr(self, self.qkv_name)(x)  # [T, 3 * H_local * D]
        q, k, v = (t.reshape(-1, self.num_heads, self.head_dim) for t in qkv.chunk(3, dim=-1))
        o = self.attn(q, k, v, positions)  # [T, H_local, D]; rotary (if any) applied as k is cached
        return getattr(self, self.out_name)(o.reshape(o.shape[0], -1))
