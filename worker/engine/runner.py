"""Turns a scheduled batch into flat tensors (the step plan) and runs the model on them.

The step plan is a handful of flat tensors so that, with tensor parallelism, the leader can
broadcast it to the other ranks without pickling anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # encoder-decoder models only (empty otherwise):
    enc_ids: torch.Tensor = field(default_factory=lambda: _empty())  # [E]: encoder inputs run this step
    enc_lens: torch.Tensor = field(default_factory=lambda: _empty())  # [B]: of them per sequence (0 = none)
    cross_slots: torch.Tensor = field(default_factory=lambda: _empty())  # [B]: cross-state slot per sequence
    cross_free: torch.Tensor = field(default_factory=lambda: _empty())  # [F]: slots to drop before the step

    def to(self, device) -> StepPlan:
        return StepPlan(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def _empty() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


def build_plan(batch: ScheduledBatch, block_size: int, cross_free: list[int] = ()) -> StepPlan:
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
    plan = StepPlan(as_long(ids), as_long(pos), as_long(slots), table, as_long(qlens), as_long(clens),
                    as_long(sample_rows))
    if any(seq.encoder_ids is not None for seq in batch.seqs):
        run = [seq.encoder_ids if not seq.encoded else [] for seq in batch.seqs]
        plan.enc_ids = as_long([t for r in run for t in r])
        plan.enc_lens = as_long([len(r) for r in run])
        plan.cross_slots = as_long([seq.cross_slot for seq in batch.seqs])
    plan.cross_free = as_long(list(cross_free))
    return plan


class ModelRunner:
    def __init__(self, model, block_size: int, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.device = device
        # encoder-decoder models: cross-attention state per slot (per decoder layer (k, v)),
        # computed when the request first runs and kept until the engine frees the slot
        self.cross: dict[int, list] = {}

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
        ctx.cross_states = self.cross_states(plan)
        with step_context(ctx):
            hidden = self.model(plan.input_ids, plan.positions)  # [T, hidden]
        return self.model.compute_logits(hidden[plan.sample_index])

    def cross_states(self, plan: StepPlan) -> list | None:
        """Run the encoder for sequences new to it, free finished slots; per-sequence states."""
        for slot in plan.cross_free.tolist():
            self.cross.pop(slot, None)
        if not plan.cross_slots.numel():
            return None
        start = 0
        for slot, n in zip(plan.cross_slots.tolist(), plan.enc_lens.tolist()):
            if n:
                self.cross[slot] = self.model.encode(plan.enc_ids[start:start + n])
                start += n
        return [self.cross[slot] for slot in plan.cross_slots.tolist()]
