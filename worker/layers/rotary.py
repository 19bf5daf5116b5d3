"""Rotary position embeddings with the rope scaling types Hugging Face configs carry."""

from __future__ import annotations

import torch
from torch import nn


def rope_inv_freq(config, head_dim: int, rotary_dim: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2], attention_scaling) exactly as transformers computes them."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    dim = rotary_dim or head_dim
    if rope_type in ("default", "dynamic"):
        # dynamic NTK only changes frequencies past max_position_embeddings, which the controller
        # refuses (prompt + new tokens <= max context), so within limits it equals default.
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    with torch.device("cpu"):  # real numbers even when the model is built on meta (partitioning)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


_TABLES: dict[tuple, torch.Tensor] = {}  # see RotaryEmbedding.cos_sin_table


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    """Applies rotary to the first `rotary_dim` dims of q and k.

    neox_style=True: rotate-half (Llama, NeoX); False: interleaved pairs (GPT-J).
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0, neox_style: bool = True):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = attention_scaling
        self.neox_style = neox_style
        self.rotary_dim = inv_freq.numel() * 2
        self._table_key: tuple | None = None

    def cos_sin_table(self, length: int, device: torch.device) -> torch.Tensor:
        """[n >= length, rotary_dim] fp32: cos(p * inv_freq) * scaling, then sin, for positions p < n
        (the layout of ops.rotary_cache_write). One table per device and frequencies, shared by all
        layers, grown by doubling."""
        if self._table_key is None:  # not at construction: the model may be built on meta
            self._table_key = (tuple(self.inv_freq.tolist()), self.scaling)
        key = (*self._table_key, str(device))
        table = _TABLES.get(key)
        if table is None or table.shape[0] < length:
            n = max(256, 1 << max(0, length - 1).bit_length())
            freqs = torch.arange(n, dtype=torch.float)[:, None] * self.inv_freq.float().cpu()[None, :]
            table = torch.cat((freqs.cos() * self.scaling, freqs.sin() * self.scaling), dim=-1).to(device)
            _TABLES[key] = table
        return table

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rotary_dim] in `dtype` for positions [T] < length, from the shared table, laid
        out for rotate_half (neox) or rotate_every_two."""
        half = self.rotary_dim // 2
        cs = self.cos_sin_table(length, positions.device)[positions]  # [T, rot]: cos half, sin half
        cos, sin = cs[:, :half], cs[:, half:]
        if self.neox_style:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        else:
            cos, sin = torch.repeat_interleave(cos, 2, dim=-1), torch.repeat_interleave(sin, 2, dim=-1)
        return cos.to(dtype), sin.to(dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, length: int):
        # positions: [T], each < length; q: [T, H, D]; k: [T, Hkv, D]
        cos, sin = self.cos_sin(positions, q.dtype, length)
        cos, sin = cos[:, None, :], sin[:, None, :]
        rot = rotate_half if self.neox_style else rotate_every_two
        r = self.rotary_dim

        def apply(x):
            if r == x.shape[-1]:
                return x * cos + rot(x) * sin
            xr, xp = x[..., :r], x[..., r:]
            return torch.cat((xr * cos + rot(xr) * sin, xp), dim=-1)

        return apply(q), apply(k)
