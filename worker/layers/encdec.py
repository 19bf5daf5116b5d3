"""Attention pieces of encoder-decoder models (T5), beside the decoder's self-attention over the paged
cache (PagedAttention called with `bias=`, T5's relative positions): cross-attention over per-sequence encoder keys/values kept with the request,
and plain bidirectional attention for the encoder (no cache: the encoder runs once per request).

Cross state (from the step context): `ctx.cross_states[b][layer]` = (k, v), each
[S_b, H_local, D] for sequence b of the step (None for layers on other pipeline stages).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.context import get_context


def step_positions(ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """(query positions [B, Q], key positions [L]) of the current step, as `attend` lays them out."""
    qi = torch.arange(ctx.max_query_len, device=ctx.context_lens.device)
    q_pos = (ctx.context_lens - ctx.query_lens)[:, None] + qi[None, :]
    return q_pos, torch.arange(ctx.max_context_len, device=ctx.context_lens.device)


def _scatter_queries(q: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    qi = torch.arange(ctx.max_query_len, device=q.device)
    q_valid = qi[None, :] < ctx.query_lens[:, None]  # [B, Q]
    q_index = torch.where(q_valid, ctx.query_start[:-1, None] + qi[None, :], 0)
    return q[q_index], q_valid  # [B, Q, H, D], [B, Q]


def cross_attend(q: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """q: [T, H, D] (flat, sequence-major) against each sequence's encoder k/v -> [T, H, D]."""
    ctx = get_context()
    kv = [state[layer] for state in ctx.cross_states]
    lens = torch.tensor([k.shape[0] for k, _ in kv], device=q.device)
    keys = torch.nn.utils.rnn.pad_sequence([k for k, _ in kv], batch_first=True)  # [B, S, H, D]
    values = torch.nn.utils.rnn.pad_sequence([v for _, v in kv], batch_first=True)
    mask = torch.arange(keys.shape[1], device=q.device)[None, :] < lens[:, None]  # [B, S]
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    qp, q_valid = _scatter_queries(q, ctx)
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=bias[:, None, None, :], scale=scale)  # [B, H, Q, D]
    return out.transpose(1, 2)[q_valid]


def full_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence, every token sees every token. q, k, v: [S, H, D]; bias [H, S, S] -> [S, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=bias[None].to(q.dtype), scale=scale)
    return out[0].transpose(0, 1)
