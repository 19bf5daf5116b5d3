"""Turns a scheduled batch into flat tensors (the step plan) and runs the model on them.

The step plan is a handful of flat tensors so that, with tensor parallelism, the leader can
broadcast it to the other ranks without pickling anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.context import StepContext, step_context
from worker.engine.scheduler import ScheduledBatch


@dataclass
class StepPlan:
    input_ids: torch.Tensor     # [T] int64
    positions: torch.Tensor     # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int64
    query_lens: torch.Tensor    # [B] int64
    context_lens: torch.Tensor  # [B] int64
    sample_index: torch.Tensor  # [S] int64: rows of T whose hidden state is sampled

    def to(self, device) -> StepPlan:
        return StepPlan(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def build_plan(batch: ScheduledBatch, block_size: int) -> StepPlan:
    ids, pos, slots, qlens, clens, tables, sample_rows = [], [], [], [], [], [], []
    t = 0
    for seq, n, samples in zip(batch.seqs, batch.num_tokens, batch.samples()):
        start = seq.num_computed
        ids.extend(seq.token_ids[start:start + n])
        positions = range(start, start + n)
        pos.extend(positions)
        slots.extend(seq.block_table[p // block_size] * block_size + p % block_size for p in positions)
        qlens.append(n)
        clens.append(start + n)
        tables.append(seq.block_table)
        t += n
        if samples:
            sample_rows.append(t - 1)
    width = max(len(b) for b in tables)
    table = torch.zeros(len(tables), width, dtype=torch.long)
    for i, b in enumerate(tables):
        table[i, : len(b)] = torch.tensor(b, dtype=torch.long)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return StepPlan(as_long(ids), as_long(pos), as_long(slots), table, as_long(qlens), as_long(clens),
                    as_long(sample_rows))


class ModelRunner:
    def __init__(self, model, block_size: int, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.device = device

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> int:
        """Allocate every attention layer's K/V blocks; returns bytes allocated on this rank."""
        total = 0
        for attn in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            total += 2 * attn.k_cache.numel() * attn.k_cache.element_size()
        return total

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """Forward the step; returns fp32 logits [S, vocab] for the sampled rows."""
        plan = plan.to(self.device)
        query_start = torch.zeros(plan.query_lens.numel() + 1, dtype=torch.long, device=self.device)
        query_start[1:] = plan.query_lens.cumsum(0)
        ctx = StepContext(
            slot_mapping=plan.slot_mapping,
            block_tables=plan.block_tables,
            context_lens=plan.context_lens,
            query_lens=plan.query_lens,
            query_start=query_start,
            max_query_len=int(plan.query_lens.max()),
            max_context_len=int(plan.context_lens.max()),
            block_size=self.block_size,
        )
        with step_context(ctx):
            hidden = self.model(plan.input_ids, plan.positions)  # [T, hidden]
        return self.model.compute_logits(hidden[plan.sample_index])
