"""Paged attention: writes this step's K/V into cache blocks (rotating q and k first when the
layer owns a rotary embedding), then attends over each sequence's cached keys through its block table.

Cache layout (per layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
Mixed steps are fine: a sequence with query_len > 1 (a prompt chunk) and one with query_len 1
(a decode) share the same call; the mask makes each query see keys at positions <= its own.

Kernels: with the native library for the device (native/ops.py), rotary + cache write is one fused
kernel and decode rows (query_len 1) read the block tables directly in the paged-attention kernel;
prompt chunks run one SDPA per sequence over its own keys (no dense mask); sliding windows past their
width, ALiBi and additive biases (T5) take the padded torch path, which gathers each sequence's keys
and runs one masked SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from native import ops
from worker.context import get_context, int32_tables
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


def _index(ctx, key: str, values: list[int]) -> torch.Tensor:
    """A per-step int64 index tensor on the step's device, made once and read by every layer."""
    t = ctx.cache.get(key)
    if t is None:
        t = ctx.cache[key] = torch.tensor(values, dtype=torch.long, device=ctx.query_lens.device)
    return t


def _groups(ctx) -> tuple[list[int], list[int], list[int]]:
    """(decode rows, prefill rows, query start per row) from the host lengths, once per step."""
    g = ctx.cache.get("groups")
    if g is None:
        starts, at = [], 0
        for n in ctx.query_lens_host:
            starts.append(at)
            at += n
        decode = [b for b, n in enumerate(ctx.query_lens_host) if n == 1]
        prefill = [b for b, n in enumerate(ctx.query_lens_host) if n != 1]
        g = ctx.cache["groups"] = (decode, prefill, starts)
    return g


def attend(q, k_flat, v_flat, ctx, scale, sliding_window=None, alibi_slopes=None, bias=None):
    """q: [T, H, D] (flat, sequence-major) against cached keys -> [T, H, D].

    `bias`, if given, is added to scores: [B, H, max_query_len, max_context_len] in step layout.
    Decoding sequences (one query token) and prefill chunks are attended in separate groups, so a
    long prompt chunk in the step does not pad every decode row to its length. Decode rows go to
    the native paged-attention kernel when there is one for the device and nothing it lacks is
    asked for (an additive bias; a sliding window narrower than the longest context). Prefill
    chunks without a bias or ALiBi run one SDPA per sequence over its own keys (is_causal when the
    chunk starts the sequence), no dense mask; the rest take the padded, masked path. Index
    tensors and masks are built once per step (ctx.cache) from the host lengths.
    """
    B = len(ctx.query_lens_host)
    n_decode = ctx.num_decode
    native = (bias is None and ops.is_native(q.device)
              and (sliding_window is None or ctx.max_context_len <= sliding_window))
    if n_decode == B and native:  # T == B: one token per sequence, in order
        return _decode_native(q, k_flat, v_flat, ctx, *int32_tables(ctx), scale, alibi_slopes)
    decode, prefill, starts = _groups(ctx)
    per_sequence = bias is None and alibi_slopes is None
    if n_decode == 0 and per_sequence:
        return _prefill_per_sequence(q, k_flat, v_flat, ctx, prefill, starts, scale, sliding_window)
    if n_decode in (0, B):
        return _attend_rows(q, k_flat, v_flat, ctx, "all", list(range(B)), scale, sliding_window, alibi_slopes, bias)
    out = torch.empty_like(q)
    tokens = _index(ctx, "decode_tokens", [starts[b] for b in decode])
    if native:
        if "decode_tables" not in ctx.cache:
            rows = _index(ctx, "decode_rows", decode)
            ctx.cache["decode_tables"] = tuple(t[rows] for t in int32_tables(ctx))
        tables, lens = ctx.cache["decode_tables"]
        out[tokens] = _decode_native(q[tokens], k_flat, v_flat, ctx, tables, lens, scale, alibi_slopes)
    else:
        out[tokens] = _attend_rows(q, k_flat, v_flat, ctx, "decode", decode, scale, sliding_window, alibi_slopes,
                                   bias)
    if per_sequence:
        _prefill_per_sequence(q, k_flat, v_flat, ctx, prefill, starts, scale, sliding_window, out)
        return out
    tokens = _index(ctx, "prefill_tokens", [starts[b] + i for b in prefill for i in range(ctx.query_lens_host[b])])
    out[tokens] = _attend_rows(q, k_flat, v_flat, ctx, "prefill", prefill, scale, sliding_window, alibi_slopes, bias)
    return out


def _decode_native(q, k_flat, v_flat, ctx, block_tables, context_lens, scale, alibi_slopes):
    """q: [B, H, D], one token per sequence -> [B, H, D], reading the cache through block tables."""
    Hkv, D = k_flat.shape[1], k_flat.shape[2]
    k_cache = k_flat.view(-1, ctx.block_size, Hkv, D)
    v_cache = v_flat.view(-1, ctx.block_size, Hkv, D)
    return ops.paged_attention_decode(q.to(k_cache.dtype), k_cache, v_cache, block_tables, context_lens,
                                      scale, alibi_slopes)


def _sequence_keys(ctx, b: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(flat slots of sequence b's keys [c], its query/key mask [n, c] or None when plain causal
    from position 0), once per step."""
    key = ("seq", b)
    got = ctx.cache.get(key)
    if got is None:
        c = ctx.context_lens_host[b]
        if c == n:  # the chunk starts the sequence: its keys are this step's tokens
            slots = ctx.slot_mapping[start:start + n]
        else:
            pos = torch.arange(c, device=ctx.block_tables.device)
            slots = ctx.block_tables[b, pos // ctx.block_size] * ctx.block_size + pos % ctx.block_size
        got = ctx.cache[key] = (slots, c)
    return got


def _prefill_per_sequence(q, k_flat, v_flat, ctx, rows, starts, scale, sliding_window, out=None):
    """One SDPA per prefill chunk over its own cached keys; causal (is_causal when the chunk starts
    the sequence and no window cuts it, else a [n, c] mask of this sequence only). Writes into `out`
    (or returns the chunks concatenated, when every row is a prefill chunk, in order)."""
    H, Hkv = q.shape[1], k_flat.shape[1]
    parts = []
    for b in rows:
        n, start = ctx.query_lens_host[b], starts[b]
        slots, c = _sequence_keys(ctx, b, start, n)
        qb = q[start:start + n].transpose(0, 1)[None]  # [1, H, n, D]
        kb = k_flat[slots].transpose(0, 1)[None]  # [1, Hkv, c, D]
        vb = v_flat[slots].transpose(0, 1)[None]
        if c == n and (sliding_window is None or c <= sliding_window):
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=Hkv != H)
        else:
            mask = ctx.cache.get(("mask", b, sliding_window))
            if mask is None:
                q_pos = torch.arange(c - n, c, device=q.device)[:, None]
                k_pos = torch.arange(c, device=q.device)[None, :]
                mask = k_pos <= q_pos
                if sliding_window is not None:
                    mask = mask & (k_pos > q_pos - sliding_window)
                ctx.cache[("mask", b, sliding_window)] = mask
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=Hkv != H)
        o = o[0].transpose(0, 1)  # [n, H, D]
        if out is None:
            parts.append(o)
        else:
            out[start:start + n] = o
    if out is not None:
        return out
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _padded_meta(ctx, group: str, rows: list[int], sliding_window):
    """Per-step layout of a padded group: (rows, slots [G, L], q_index [G, Q], q_valid, q_pos, k_pos,
    allowed [G, Q, L])."""
    key = ("padded", group, sliding_window)
    meta = ctx.cache.get(key)
    if meta is not None:
        return meta
    dev = ctx.query_lens.device
    r = _index(ctx, ("rows", group), rows)
    q_lens, c_lens = ctx.query_lens[r], ctx.context_lens[r]
    Q = max(ctx.query_lens_host[b] for b in rows)
    L = max(ctx.context_lens_host[b] for b in rows)
    slots, valid = gather_slots(ctx.block_tables[r], c_lens, L, ctx.block_size)
    qi = torch.arange(Q, device=dev)
    q_valid = qi[None, :] < q_lens[:, None]  # [G, Q]
    q_index = torch.where(q_valid, ctx.query_start[r][:, None] + qi[None, :], 0)
    q_pos = (c_lens - q_lens)[:, None] + qi[None, :]  # [G, Q] absolute positions
    k_pos = torch.arange(L, device=dev)
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & valid[:, None, :]  # [G, Q, L]
    if sliding_window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    meta = ctx.cache[key] = (r, slots, q_index, q_valid, q_pos, k_pos, allowed)
    return meta


def _attend_rows(q, k_flat, v_flat, ctx, group, rows, scale, sliding_window, alibi_slopes, bias):
    """Attention for the step's sequences `rows` [G] padded to one batch with a mask (ALiBi, T5's bias,
    decode rows without the native kernel); returns their tokens' outputs [Tg, H, D] in order."""
    H = q.shape[1]
    Hkv = k_flat.shape[1]
    r, slots, q_index, q_valid, q_pos, k_pos, allowed = _padded_meta(ctx, group, rows, sliding_window)
    G, Q, L = allowed.shape
    keys = k_flat[slots]  # [G, L, Hkv, D]
    values = v_flat[slots]
    qp = q[q_index]  # [G, Q, H, D]
    # the additive mask depends on the step and on (slopes, bias) only: the layers of a step that share
    # them (T5's one relative-position bias per step) build it once. The entry keeps slopes and bias
    # alive, so their ids cannot be reused by other tensors while the step's cache lives.
    key = ("scores_bias", group, sliding_window, id(alibi_slopes), id(bias), qp.dtype)
    scores_bias = ctx.cache.get(key, (None, None, None))[2]
    if scores_bias is None:
        scores_bias = torch.zeros(G, 1, Q, L, dtype=torch.float32, device=q.device)
        scores_bias.masked_fill_(~allowed[:, None], float("-inf"))
        if alibi_slopes is not None:
            rel = (k_pos[None, None, :] - q_pos[:, :, None]).float()  # [G, Q, L]
            scores_bias = scores_bias + alibi_slopes[None, :, None, None] * rel[:, None]
        if bias is not None:
            scores_bias = scores_bias + bias[r][:, :, :Q, :L]
        # padded query rows see nothing: give them one key to avoid NaN, they are dropped anyway
        scores_bias[:, :, :, 0].masked_fill_(~q_valid[:, None, :], 0.0)
        scores_bias = scores_bias.to(qp.dtype)
        ctx.cache[key] = (alibi_slopes, bias, scores_bias)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=scores_bias, scale=scale, enable_gqa=Hkv != H,
    )  # [G, H, Q, D]
    return out.transpose(1, 2)[q_valid]  # [Tg, H, D]
