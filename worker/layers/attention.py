"""Paged attention: writes this step's K/V into cache blocks (rotating q and k first when the
layer owns a rotary embedding), then attends over each sequence's cached keys through its block table.

Cache layout (per layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
Mixed steps are fine: a sequence with query_len > 1 (a prompt chunk) and one with query_len 1
(a decode) share the same call; the mask makes each query see keys at positions <= its own.

Kernels: with the native library for the device (native/ops.py), rotary + cache write is one fused
kernel and decode rows (query_len 1) read the block tables directly in the paged-attention kernel;
prompt chunks, sliding windows past their width and additive biases (T5) take the torch path,
which gathers each sequence's keys and runs SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from native import ops
from worker.context import decode_count, get_context, int32_tables
from worker.layers.rotary import RotaryEmbedding


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                 rotary: RotaryEmbedding | None = None):
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
        self.rotary = rotary  # applied to q and k (given `positions`) as k is written to the cache
        # Set by the model runner when the KV cache is allocated.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D]; positions: [T] (needed with a rotary) -> [T, H, D]
        # bias: added to the scores, [B, H, max_query_len, max_context_len] (T5's relative positions)
        ctx = get_context()
        q, k_flat, v_flat = self.write_cache(q, k, v, positions, ctx)
        return attend(q, k_flat, v_flat, ctx, self.scale, self.sliding_window, self.alibi_slopes, bias)

    def write_cache(self, q, k, v, positions, ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotate q and k (if this layer has a rotary), store k and v at ctx.slot_mapping.
        Returns (q [T, H, D], k_flat, v_flat [num_blocks * block_size, Hkv, D] views of the cache)."""
        if self.k_cache is None:
            raise RuntimeError("KV cache not allocated")
        k_flat = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        if self.rotary is not None and ops.is_native(q.device):
            table = self.rotary.cos_sin_table(ctx.max_context_len, q.device)
            q, _ = ops.rotary_cache_write(q, k, v, positions, table, self.k_cache, self.v_cache,
                                          ctx.slot_mapping, self.rotary.neox_style, self.rotary.rotary_dim)
            return q, k_flat, v_flat
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k, ctx.max_context_len)
        k_flat.index_copy_(0, ctx.slot_mapping, k.to(k_flat.dtype))
        v_flat.index_copy_(0, ctx.slot_mapping, v.to(v_flat.dtype))
        return q, k_flat, v_flat


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
    long prompt chunk in the step does not pad every decode row to its length. Decode rows go to
    the native paged-attention kernel when there is one for the device and nothing it lacks is
    asked for (an additive bias; a sliding window narrower than the longest context).
    """
    n_decode = decode_count(ctx)
    native = (bias is None and ops.is_native(q.device)
              and (sliding_window is None or ctx.max_context_len <= sliding_window))
    if n_decode == ctx.query_lens.numel() and native:  # T == B: one token per sequence, in order
        return _decode_native(q, k_flat, v_flat, ctx, *int32_tables(ctx), scale, alibi_slopes)
    if n_decode in (0, ctx.query_lens.numel()):
        rows = torch.arange(ctx.query_lens.numel(), device=q.device)
        return _attend_rows(q, k_flat, v_flat, ctx, rows, scale, sliding_window, alibi_slopes, bias)
    decode = ctx.query_lens == 1
    out = torch.empty_like(q)
    rows = torch.nonzero(decode).flatten()
    tokens = ctx.query_start[rows]
    if native:
        tables, lens = int32_tables(ctx)
        out[tokens] = _decode_native(q[tokens], k_flat, v_flat, ctx, tables[rows], lens[rows], scale, alibi_slopes)
    else:
        out[tokens] = _attend_rows(q, k_flat, v_flat, ctx, rows, scale, sliding_window, alibi_slopes, bias)
    rows = torch.nonzero(~decode).flatten()
    qi = torch.arange(int(ctx.query_lens[rows].max()), device=q.device)
    valid = qi[None, :] < ctx.query_lens[rows][:, None]
    tokens = (ctx.query_start[rows][:, None] + qi[None, :])[valid]  # this group's rows of q, in order
    out[tokens] = _attend_rows(q, k_flat, v_flat, ctx, rows, scale, sliding_window, alibi_slopes, bias)
    return out


def _decode_native(q, k_flat, v_flat, ctx, block_tables, context_lens, scale, alibi_slopes):
    """q: [B, H, D], one token per sequence -> [B, H, D], reading the cache through block tables."""
    Hkv, D = k_flat.shape[1], k_flat.shape[2]
    k_cache = k_flat.view(-1, ctx.block_size, Hkv, D)
    v_cache = v_flat.view(-1, ctx.block_size, Hkv, D)
    return ops.paged_attention_decode(q.to(k_cache.dtype), k_cache, v_cache, block_tables, context_lens,
                                      scale, alibi_slopes)


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
