"""Normalisation layers (replicated on every rank).

Both take an optional `residual`: `norm(x)` -> normed x; `norm(x, residual=r)` -> (normed x + r,
x + r), the residual add fused into the norm (one native kernel where the device has one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from native import ops
from worker.layers.linear import replicated_loader


class RMSNorm(nn.Module):
    """HF Llama semantics: computed in fp32, scaled by weight in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = replicated_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None and not ops.is_native(x.device):
            dtype = x.dtype
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * h.to(dtype)
        out, summed = ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return out if residual is None else (out, summed)


class LayerNorm(nn.LayerNorm):
    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(hidden_size, eps=eps, bias=bias)
        self.weight.requires_grad_(False)
        self.weight.weight_loader = replicated_loader
        if self.bias is not None:
            self.bias.requires_grad_(False)
            self.bias.weight_loader = replicated_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None and not ops.is_native(x.device):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        out, summed = ops.fused_add_layer_norm(x, residual, self.weight, self.bias, self.eps)
        return out if residual is None else (out, summed)
