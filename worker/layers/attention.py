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


def gather_slots(block_tables, context_lens, L: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat slots [B, L] of every cached key of each sequence (L = max context) and valid mask [B, L]."""
    pos = torch.arange(L, device=block_tables.device)
    blocks = block_tables.gather(1, (pos // block_size).expand(block_tables.shape[0], L))
    slots = blocks * block_size + pos % block_size
    valid = pos[None, :] < context_lens[:, None]
    return torch.where(valid, slots, 0), valid


def attend(q, k_flat, v_flat, ctx, scale, sliding_window=None, alibi_slopes=None, bias=None):
    """q: [T, H, D] (flat, sequence-major) against cached keys -> [T, H, D].

    `bias`, if given, is added to scores: [B, H, max_query_len, max_context_len] in step layout.
    Decoding sequences (one query token) and prefill chunks are attended in separate groups, so a
    long prompt chunk in the step does not pad every decode row to its length.
    """
    decode = ctx.query_lens == 1
    n_decode = int(decode.sum())
    if n_decode in (0, decode.numel()):
        rows = torch.arange(decode.numel(), device=q.device)
        return _attend_rows(q, k_flat, v_flat, ctx, rows, scale, sliding_window, alibi_slopes, bias)
    out = torch.empty_like(q)
    for rows in (torch.nonzero(decode).flatten(), torch.nonzero(~decode).flatten()):
        qi = torch.arange(int(ctx.query_lens[rows].max()), device=q.device)
        valid = qi[None, :] < ctx.query_lens[rows][:, None]
        tokens = (ctx.query_start[rows][:, None] + qi[None, :])[valid]  # this group's rows of q, in order
        out[tokens] = _attend_rows(q, k_flat, v_flat, ctx, rows, scale, sliding_window, alibi_slopes, bias)
    return out


def _attend_rows(q, k_flat, v_flat, ctx, rows, scale, sliding_window, alibi_slopes, bias):
    """Attention for the step's sequences `rows` [G]; returns their tokens' outputs [Tg, H, D] in order."""
    H = q.shape[1]
    Hkv = k_flat.shape[1]
    q_lens, c_lens = ctx.query_lens[rows], ctx.context_lens[rows]
    G, Q, L = rows.numel(), int(q_lens.max()), int(c_lens.max())
    slots, valid = gather_slots(ctx.block_tables[rows], c_lens, L, ctx.block_size)
    keys = k_flat[slots]  # [G, L, Hkv, D]
    values = v_flat[slots]
    qi = torch.arange(Q, device=q.device)
    q_valid = qi[None, :] < q_lens[:, None]  # [G, Q]
    q_index = torch.where(q_valid, ctx.query_start[rows][:, None] + qi[None, :], 0)
    qp = q[q_index]  # [G, Q, H, D]
    q_pos = (c_lens - q_lens)[:, None] + qi[None, :]  # [G, Q] absolute positions
    k_pos = torch.arange(L, device=q.device)
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & valid[:, None, :]  # [G, Q, L]
    if sliding_window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    scores_bias = torch.zeros(G, 1, Q, L, dtype=torch.float32, device=q.device)
    scores_bias.masked_fill_(~allowed[:, None], float("-inf"))
    if alibi_slopes is not None:
        rel = (k_pos[None, None, :] - q_pos[:, :, None]).float()  # [G, Q, L]
        scores_bias = scores_bias + alibi_slopes[None, :, None, None] * rel[:, None]
    if bias is not None:
        scores_bias = scores_bias + bias[rows][:, :, :Q, :L]
    # padded query rows see nothing: give them one key to avoid NaN, they are dropped anyway
    scores_bias[:, :, :, 0].masked_fill_(~q_valid[:, None, :], 0.0)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=scores_bias.to(qp.dtype), scale=scale, enable_gqa=Hkv != H,
    )  # [G, H, Q, D]
    return out.transpose(1, 2)[q_valid]  # [Tg, H, D]
