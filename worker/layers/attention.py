"""Paged attention in plain torch: writes this step's K/V into cache blocks, then attends over
each sequence's cached keys through its block table.

Cache layout (per layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
Mixed steps are fine: a sequence with query_len > 1 (a prompt chunk) and one with query_len 1
(a decode) share the same call; the mask makes each query see keys at positions <= its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from worker.context import get_context


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self.sliding_window = sliding_window
        if alibi_slopes is not None:
            self.register_buffer("alibi_slopes", alibi_slopes.float(), persistent=False)
        else:
            self.alibi_slopes = None
        # Set by the model runner when the KV cache is allocated.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H, D]
        ctx = get_context()
        if self.k_cache is None:
            raise RuntimeError("KV cache not allocated")
        k_flat = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_flat.index_copy_(0, ctx.slot_mapping, k.to(k_flat.dtype))
        v_flat.index_copy_(0, ctx.slot_mapping, v.to(v_flat.dtype))
        return attend(q, k_flat, v_flat, ctx, self.scale, self.sliding_window, self.alibi_slopes)


def gather_slots(ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat slots [B, L] of every cached key of each sequence (L = max context) and valid mask [B, L]."""
    L = ctx.max_context_len
    pos = torch.arange(L, device=ctx.block_tables.device)
    blocks = ctx.block_tables.gather(1, (pos // ctx.block_size).expand(ctx.block_tables.shape[0], L))
    slots = blocks * ctx.block_size + pos % ctx.block_size
    valid = pos[None, :] < ctx.context_lens[:, None]
    return torch.where(valid, slots, 0), valid


def attend(q, k_flat, v_flat, ctx, scale, sliding_window=None, alibi_slopes=None, bias=None):
    """q: [T, H, D] against cached keys; `bias`, if given, is added to scores: [B, H, Q, L]."""
    B = ctx.context_lens.shape[0]
    H = q.shape[1]
    Hkv = k_flat.shape[1]
    Q, L = ctx.max_query_len, ctx.max_context_len
    slots, valid = gather_slots(ctx)
    keys = k_flat[slots]  # [B, L, Hkv, D]
    values = v_flat[slots]
    if Hkv != H:
        keys = keys.repeat_interleave(H // Hkv, dim=2)
        values = values.repeat_interleave(H // Hkv, dim=2)
    # scatter flat queries into [B, Q, H, D]
    qi = torch.arange(Q, device=q.device)
    q_valid = qi[None, :] < ctx.query_lens[:, None]  # [B, Q]
    q_index = torch.where(q_valid, ctx.query_start[:-1, None] + qi[None, :], 0)
    qp = q[q_index]  # [B, Q, H, D]
    q_pos = (ctx.context_lens - ctx.query_lens)[:, None] + qi[None, :]  # [B, Q] absolute positions
    k_pos = torch.arange(L, device=q.device)
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & valid[:, None, :]  # [B, Q, L]
    if sliding_window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    scores_bias = torch.zeros(B, 1, Q, L, dtype=torch.float32, device=q.device)
    scores_bias.masked_fill_(~allowed[:, None], float("-inf"))
    if alibi_slopes is not None:
        rel = (k_pos[None, None, :] - q_pos[:, :, None]).float()  # [B, Q, L]
        scores_bias = scores_bias + alibi_slopes[None, :, None, None] * rel[:, None]
    if bias is not None:
        scores_bias = scores_bias + bias
    # padded query rows see nothing: give them one key to avoid NaN, they are dropped anyway
    scores_bias[:, :, :, 0].masked_fill_(~q_valid[:, None, :], 0.0)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=scores_bias.to(qp.dtype), scale=scale,
    )  # [B, H, Q, D]
    out = out.transpose(1, 2)  # [B, Q, H, D]
    return out[q_valid]  # [T, H, D] in flat order (sequence-major, as q)
