"""Normalisation layers (replicated on every rank)."""

from __future__ import annotations

import torch
from torch import nn

from worker.layers.linear import replicated_loader


class RMSNorm(nn.Module):
    """HF Llama semantics: computed in fp32, scaled by weight in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = replicated_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class LayerNorm(nn.LayerNorm):
    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(hidden_size, eps=eps, bias=bias)
        self.weight.requires_grad_(False)
        self.weight.weight_loader = replicated_loader
        if self.bias is not None:
            self.bias.requires_grad_(False)
            self.bias.weight_loader = replicated_loader
