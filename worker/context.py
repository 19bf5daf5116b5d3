"""The attention metadata of the current engine step, set by the model runner around a forward.

Models never see batching details: attention layers read this context. Shapes:
T = tokens in the step (all sequences flattened), B = sequences in the step.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class StepContext:
    slot_mapping: torch.Tensor   # [T] int64: flat KV slot (block * block_size + offset) of each token
    block_tables: torch.Tensor   # [B, max_blocks] int64 (padded with 0)
    context_lens: torch.Tensor   # [B] int64: tokens in the cache after this step, per sequence
    query_lens: torch.Tensor     # [B] int64: tokens of this step, per sequence
    query_start: torch.Tensor    # [B+1] int64: offsets of each sequence in the T tokens
    max_query_len: int
    max_context_len: int
    block_size: int
    num_decode: int = -1         # sequences with query_len == 1 (-1: counted from the host lengths)
    # int32 copies of block_tables / context_lens for the native kernels, made once per step
    tables_i32: tuple[torch.Tensor, torch.Tensor] | None = None
    # Encoder-decoder models: per-sequence encoder outputs handed to cross-attention.
    cross_states: list | None = None
    # Models whose attention wants extra per-sequence data put it here (e.g. encoder lengths).
    extras: dict | None = None
    # Host copies of query_lens / context_lens (the runner passes the plan's, no device read)
    query_lens_host: list[int] | None = None
    context_lens_host: list[int] | None = None
    # Attention metadata derived from the above (index tensors, masks), built by the first layer
    # that needs it and read by every other layer of the step (worker/layers/attention.py)
    cache: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.query_lens_host is None:
            self.query_lens_host = self.query_lens.tolist()
        if self.context_lens_host is None:
            self.context_lens_host = self.context_lens.tolist()
        if self.num_decode < 0:
            self.num_decode = sum(n == 1 for n in self.query_lens_host)


def decode_count(ctx: StepContext) -> int:
    """Sequences of the step decoding one token (counted once per step, on the host)."""
    return ctx.num_decode


def int32_tables(ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_tables, context_lens) as int32, converted once per step, read by every layer."""
    if ctx.tables_i32 is None:
        ctx.tables_i32 = (ctx.block_tables.int(), ctx.context_lens.int())
    return ctx.tables_i32


_CTX: StepContext | None = None


def get_context() -> StepContext:
    if _CTX is None:
        raise RuntimeError("attention called outside an engine step (no StepContext set)")
    return _CTX


@contextmanager
def step_context(ctx: StepContext):
    global _CTX
    prev, _CTX = _CTX, ctx
    try:
        yield ctx
    finally:
        _CTX = prev
