"""Attention pieces of encoder-decoder models (T5), beside the decoder's self-attention over the paged
cache (PagedAttention called with `bias=`, T5's relative positions): cross-attention over each
request's encoder keys/values, laid out once when its encoder runs, and plain bidirectional attention
for the encoder (no cache: the encoder runs once per request).

Cross state: `CrossCache` holds every live request's cross K/V of this stage's decoder layers in one
buffer, a row per request, written once by `put` when the encoder runs. `CrossCache.step(slots)`
gives the step's view (`StepCross`: K/V [B, H_local, S, D] per layer, S = the longest encoder input
of the step, and one length mask) that every layer's `cross_attend` reads from `ctx.cross_states`:
no per-layer padding or gathering, no per-layer loop over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.context import get_context

S_ALIGN = 64  # the buffer's encoder length grows in steps of this many tokens


@dataclass
class StepCross:
    """The cross-attention inputs of one step, shared by every decoder layer of this stage."""
    kv: torch.Tensor                 # [2, L_local, B, H, S, D]: a view of the cache, or one gather of it
    layer_index: dict[int, int]      # decoder layer -> index into kv's L_local
    mask: torch.Tensor | None        # [B, 1, 1, S] additive (0 / -inf); None when every row has S keys
    q_index: torch.Tensor | None     # [B, Q] rows of the step's flat queries (None: one query per row)
    q_out: torch.Tensor | None       # [T] rows of the flattened [B * Q] outputs that are real tokens


class CrossCache:
    """Cross-attention K/V of the live requests: one buffer [2, L_local, R, H, S_max, D] (K and V of this
    stage's decoder layers, a row per request), rows and length grown on demand (doubling rows, S_max
    in steps of S_ALIGN) and reused once a request is freed. Bounded by the requests alive at once
    (the engine reserves max_batch_size x the encoder limit out of the KV budget for them)."""

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.layer_index: dict[int, int] = {}
        self.rows: dict[int, int] = {}   # engine cross slot -> row
        self.lens: dict[int, int] = {}   # engine cross slot -> encoder length
        self.free_rows: list[int] = []
        self._step_key = None            # (rows, S) of the last gathered step view
        self._step_kv: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, slot: int) -> bool:
        return slot in self.rows

    def drop(self, slot: int) -> None:
        row = self.rows.pop(slot, None)
        if row is not None:
            self.lens.pop(slot)
            self.free_rows.append(row)

    def put(self, slot: int, states: list) -> None:
        """states: per decoder layer (k, v) [S, H_local, D] of one request (None for other stages' layers)."""
        mine = [(i, kv) for i, kv in enumerate(states) if kv is not None]
        if not mine:
            return
        S = mine[0][1][0].shape[0]
        self.drop(slot)
        row = self._row(mine, S)
        for j, (_, (k, v)) in enumerate(mine):
            self.buf[0, j, row, :, :S] = k.transpose(0, 1)
            self.buf[1, j, row, :, :S] = v.transpose(0, 1)
        self.rows[slot], self.lens[slot] = row, S
        self._step_key = None  # a gathered view may hold this row's old contents

    def _row(self, mine: list, S: int) -> int:
        k = mine[0][1][0]
        if self.buf is None:
            self.layer_index = {i: j for j, (i, _) in enumerate(mine)}
            H, D = k.shape[1], k.shape[2]
            self.buf = torch.zeros(2, len(mine), 1, H, _align(S), D, dtype=k.dtype, device=k.device)
            self.free_rows = [0]
        R, S_max = self.buf.shape[2], self.buf.shape[4]
        if not self.free_rows or S > S_max:
            grow_r = R * 2 if not self.free_rows else R
            new = self.buf.new_zeros(*self.buf.shape[:2], grow_r, self.buf.shape[3], max(S_max, _align(S)),
                                     self.buf.shape[5])
            new[:, :, :R, :, :S_max] = self.buf
            self.buf = new
            self.free_rows.extend(range(R, grow_r))
            self._step_key = None
        self.free_rows.sort(reverse=True)  # lowest row first: requests arriving together sit side by side
        return self.free_rows.pop()

    def step(self, slots: list[int], ctx) -> StepCross:
        """The step's cross state for its sequences `slots` (in step order)."""
        rows = [self.rows[s] for s in slots]
        lens = [self.lens[s] for s in slots]
        S = max(lens)
        device = self.buf.device
        if rows == list(range(rows[0], rows[0] + len(rows))):
            kv = self.buf[:, :, rows[0]:rows[0] + len(rows), :, :S]  # a view: nothing copied
        else:
            key = (tuple(rows), S)
            if key != self._step_key:
                index = torch.tensor(rows, device=device)
                self._step_kv = self.buf[:, :, :, :, :S].index_select(2, index)  # one gather, all layers
                self._step_key = key
            kv = self._step_kv
        mask = None
        if min(lens) < S:
            n = torch.tensor(lens, device=device)
            pad = torch.arange(S, device=device)[None, :] >= n[:, None]  # [B, S]
            mask = torch.zeros(pad.shape, dtype=self.buf.dtype, device=device).masked_fill_(pad, float("-inf"))
            mask = mask[:, None, None, :]
        q_index = q_out = None
        if ctx.max_query_len > 1:
            qi = torch.arange(ctx.max_query_len, device=device)
            q_valid = qi[None, :] < ctx.query_lens[:, None]  # [B, Q]
            q_index = torch.where(q_valid, ctx.query_start[:-1, None] + qi[None, :], 0)
            q_out = torch.nonzero(q_valid.flatten()).flatten()
        return StepCross(kv, self.layer_index, mask, q_index, q_out)


def _align(S: int) -> int:
    return -(-S // S_ALIGN) * S_ALIGN


def cross_attend(q: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """q: [T, H, D] (flat, sequence-major) against each sequence's encoder k/v -> [T, H, D]."""
    cross: StepCross = get_context().cross_states
    j = cross.layer_index[layer]
    keys, values = cross.kv[0, j], cross.kv[1, j]  # [B, H, S, D]
    if cross.q_index is None:  # one query per sequence: q is already [B, H, D]
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=cross.mask, scale=scale)
        return out[:, :, 0]
    qp = q[cross.q_index].transpose(1, 2)  # [B, H, Q, D]
    out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=cross.mask, scale=scale)  # [B, H, Q, D]
    return out.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])[cross.q_out]


def full_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: list[torch.Tensor],
                scale: float) -> torch.Tensor:
    """Sequences back to back, every token sees every token of its own sequence. q, k, v: [E, H, D]
    (E = sum of the S_i); bias: per sequence [H, S_i, S_i] (its length is S_i) -> [E, H, D]."""
    if len(bias) == 1:
        return _attend_one(q, k, v, bias[0], scale)
    out, at = torch.empty_like(q), 0
    for b in bias:
        n = b.shape[-1]
        out[at:at + n] = _attend_one(q[at:at + n], k[at:at + n], v[at:at + n], b, scale)
        at += n
    return out


def _attend_one(q, k, v, bias, scale):
    # one sequence: q, k, v [S, H, D]; bias [H, S, S] -> [S, H, D]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=bias[None].to(q.dtype), scale=scale)
    return out[0].transpose(0, 1)
