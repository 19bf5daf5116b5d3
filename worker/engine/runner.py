"""Turns a scheduled batch into flat tensors (the step plan) and runs the model on them.

The step plan is a handful of flat tensors so that, with tensor parallelism, the leader can
broadcast it to the other ranks without pickling anything.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from worker.context import StepContext, step_context
from worker.distributed import CollectiveError, describe_failure, get_parallel_state
from worker.engine.pipeline import STEP, broadcast_command
from worker.engine.scheduler import ScheduledBatch
from worker.layers.encdec import CrossCache


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

    def to(self, device, staging: torch.Tensor | None = None) -> StepPlan:
        """The plan on `device` with one host-to-device copy: every field packed into one int64
        buffer (`staging`, pinned, when given and large enough), copied, and split into views."""
        device = torch.device(device)
        if device.type == "cpu" and self.input_ids.device.type == "cpu":
            return self
        fields = list(self.__dataclass_fields__)
        parts = [getattr(self, f) for f in fields]
        flat = torch.cat([p.reshape(-1) for p in parts])
        if staging is not None and staging.numel() >= flat.numel():
            flat = staging[:flat.numel()].copy_(flat)
        moved = flat.to(device, non_blocking=staging is not None).split([p.numel() for p in parts])
        return StepPlan(*(m.view(p.shape) for m, p in zip(moved, parts)))


_EMPTY = torch.zeros(0, dtype=torch.long, device="cpu")  # shared by every plan's empty fields (never written)


def _empty() -> torch.Tensor:
    return _EMPTY


def _long(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device="cpu")


SMALL_STEP_TOKENS = 256  # steps of at most this many tokens compute their plan in plain Python (see build_plan)


def build_plan(batch: ScheduledBatch, block_size: int, cross_free: list[int] = ()) -> StepPlan:
    """The step's flat tensors, on the host. Lengths stay Python ints. A step of at most
    SMALL_STEP_TOKENS tokens (decodes, short chunks) computes positions and KV slots in plain Python
    and makes every field from one list with one torch.tensor call: cheaper than a dozen tiny tensor
    ops (~0.1 ms against ~0.5 ms per 8-row decode step). Larger steps compute them with a few
    vectorised ops over the whole step (no per-token Python). Both give the same plan
    (tests/unit/test_plan.py)."""
    ids, qlens, starts, tables, sample_rows = [], [], [], [], []
    t = 0
    for seq, n, samples, drafts in zip(batch.seqs, batch.num_tokens, batch.samples(), batch.draft_lists()):
        start = seq.num_computed
        ids.extend(seq.token_ids[start:start + n - len(drafts)])
        ids.extend(drafts)  # speculative tokens: their K/V is written, kept only if accepted
        qlens.append(n)
        starts.append(start)
        tables.append(seq.block_table)
        t += n
        if samples:  # one row; with drafts, one per draft more (the target's verdict on each)
            sample_rows.extend(range(t - 1 - len(drafts), t))
    width = max(len(b) for b in tables)
    if t <= SMALL_STEP_TOKENS:
        plan = _small_plan(ids, qlens, starts, tables, sample_rows, width, block_size)
    else:
        table = _long([b + [0] * (width - len(b)) for b in tables])  # [B, width]
        q = _long(qlens)
        start_t = _long(starts)
        row = torch.repeat_interleave(torch.arange(len(qlens), device="cpu"), q)  # [T] sequence of each token
        first = torch.cumsum(q, 0) - q  # [B] offset of each sequence's first token
        pos = start_t[row] + torch.arange(t, device="cpu") - first[row]  # [T]
        slots = table[row, pos // block_size] * block_size + pos % block_size
        plan = StepPlan(_long(ids), pos, slots, table, q, start_t + q, _long(sample_rows))
    if any(seq.encoder_ids is not None for seq in batch.seqs):
        run = [seq.encoder_ids if not seq.encoded else [] for seq in batch.seqs]
        plan.enc_ids = _long([t for r in run for t in r])
        plan.enc_lens = _long([len(r) for r in run])
        plan.cross_slots = _long([seq.cross_slot for seq in batch.seqs])
    if cross_free:
        plan.cross_free = _long(list(cross_free))
    return plan


def _small_plan(ids: list[int], qlens: list[int], starts: list[int], tables: list[list[int]],
                sample_rows: list[int], width: int, block_size: int) -> StepPlan:
    """build_plan's fields for a small step: positions and slots per token in Python, then every
    field in one int64 tensor, split into views."""
    pos, slots, flat_table = [], [], []
    for start, n, blocks in zip(starts, qlens, tables):
        for p in range(start, start + n):
            pos.append(p)
            slots.append(blocks[p // block_size] * block_size + p % block_size)
        flat_table.extend(blocks)
        flat_table.extend([0] * (width - len(blocks)))
    ctx = [s + n for s, n in zip(starts, qlens)]
    parts = (ids, pos, slots, flat_table, qlens, ctx, sample_rows)
    views = torch.split_with_sizes(_long([v for part in parts for v in part]), [len(part) for part in parts])
    B = len(qlens)
    return StepPlan(views[0], views[1], views[2], views[3].view(B, width), views[4], views[5], views[6])


def cache_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros for a KV cache. On CPU from an anonymous mapping: the kernel's zero pages, each faulted in
    when first written, so a cache sized to the machine costs nothing at start (torch.zeros writes every
    byte: ~1 s per GB on 2 cores) and only the blocks a workload reaches ever become resident."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    buf = mmap.mmap(-1, max(1, count * dtype.itemsize))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)  # 2 MiB pages where THP allows: fewer faults and TLB misses
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)  # the tensor keeps `buf` alive


class ModelRunner:
    """Runs step plans on this rank's part of the model.

    Rank 0 calls `run(plan)`: it broadcasts the plan (when a process group exists), runs its own
    part, and returns the logits of the sampled rows. The other ranks call `forward_step(plan)`
    from `pipeline.follower_loop`. With pipeline stages, activations [T, hidden] go from each
    rank to the same tp rank of the next stage, and the last stage's tp-leader sends the logits
    [S, vocab] (fp32) to rank 0, which samples. Any failure of a multi-rank step is fatal to the
    rank (`fatal`): its peers are left mid-collective, so the group must restart.
    """

    def __init__(self, model, block_size: int, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.state = get_parallel_state()
        self.dtype = torch.float32  # activation dtype between stages; set with the KV cache
        config = getattr(model, "config", None)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or 0)
        self.hidden_size = int(getattr(config, "hidden_size", 0) or 0)
        # called with a message when a multi-rank step fails; the worker entry sets it to exit
        self.on_fatal = None
        # pinned host buffer the step plan is staged in before its one copy to a CUDA device
        self.staging = (torch.empty(1 << 16, dtype=torch.long, device="cpu").pin_memory()
                        if device.type == "cuda" else None)
        # encoder-decoder models: cross-attention K/V per slot, laid out once when the request's
        # encoder runs (its first step) and kept until the engine frees the slot
        self.cross = CrossCache()

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> int:
        """Allocate every attention layer's K/V blocks; returns bytes allocated on this rank."""
        self.dtype = dtype
        total = 0
        for attn in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = cache_zeros(shape, dtype, self.device)
            attn.v_cache = cache_zeros(shape, dtype, self.device)
            total += 2 * attn.k_cache.numel() * attn.k_cache.element_size()
        return total

    def fatal(self, what: str, err: BaseException):
        msg = describe_failure(what, err)
        if self.on_fatal is not None:
            self.on_fatal(msg)
        raise CollectiveError(msg) from err

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """Rank 0: forward the step on every rank; returns fp32 logits [S, vocab] for the sampled rows."""
        st = self.state
        if not st.distributed:
            return self._forward(plan)
        try:
            broadcast_command(STEP, plan)
            return self._forward(plan)
        except Exception as e:  # noqa: BLE001
            if st.world_size == 1:
                raise  # nobody waits on us: a failed step fails its requests only
            self.fatal("engine step", e)

    @torch.inference_mode()
    def forward_step(self, plan: StepPlan) -> None:
        """Ranks other than 0: this rank's part of the step the leader broadcast."""
        try:
            self._forward(plan)
        except Exception as e:  # noqa: BLE001
            self.fatal("engine step", e)

    def _context(self, host: StepPlan, plan: StepPlan) -> StepContext:
        """The step's attention metadata: lengths read from the host plan, tensors from the device one."""
        qlens, clens = host.query_lens.tolist(), host.context_lens.tolist()
        query_start = torch.zeros(len(qlens) + 1, dtype=torch.long, device=self.device)
        query_start[1:] = plan.query_lens.cumsum(0)
        return StepContext(
            slot_mapping=plan.slot_mapping,
            block_tables=plan.block_tables,
            context_lens=plan.context_lens,
            query_lens=plan.query_lens,
            query_start=query_start,
            max_query_len=max(qlens),
            max_context_len=max(clens),
            block_size=self.block_size,
            query_lens_host=qlens,
            context_lens_host=clens,
        )

    def _forward(self, host: StepPlan) -> torch.Tensor | None:
        """host: the plan on the host (as built, or as received by a follower)."""
        need = sum(getattr(host, f).numel() for f in host.__dataclass_fields__)
        if self.staging is not None and self.staging.numel() < need:
            self.staging = torch.empty(max(need, 2 * self.staging.numel()), dtype=torch.long,
                                       device="cpu").pin_memory()
        plan = host.to(self.device, self.staging)
        ctx = self._context(host, plan)
        ctx.cross_states = self.cross_states(host, plan, ctx)
        with step_context(ctx):
            if self.state.pp_size == 1:
                hidden = self.model(plan.input_ids, plan.positions)  # [T, hidden]
                if plan.sample_index.numel() == 0:
                    return torch.empty(0, self.vocab_size, device=self.device)
                return self.model.compute_logits(hidden[plan.sample_index])
            return self._forward_stage(plan)

    def _forward_stage(self, plan: StepPlan) -> torch.Tensor | None:
        """One pipeline stage: receive (or embed), run own layers, send on (or make logits)."""
        st, model = self.state, self.model
        T, S = plan.input_ids.numel(), plan.sample_index.numel()
        comm = st.comm_device
        if st.is_first_stage:
            x = model.embed(plan.input_ids, plan.positions)
        else:
            x = torch.empty(T, self.hidden_size, dtype=self.dtype, device=comm)
            dist.recv(x, src=st.global_rank(st.pp_rank - 1, st.tp_rank))
            x = x.to(self.device)
        start, end = st.layer_range(len(model.layers))
        for layer in model.layers[start:end]:
            x = layer(plan.positions, x)  # [T, hidden]
        if not st.is_last_stage:
            dist.send(x.to(comm).contiguous(), dst=st.global_rank(st.pp_rank + 1, st.tp_rank))
            if st.rank == 0:
                logits = torch.empty(S, self.vocab_size, dtype=torch.float32, device=comm)
                if S:
                    dist.recv(logits, src=st.global_rank(st.pp_size - 1, 0))
                return logits.to(self.device)
            return None
        if S == 0:
            return None
        logits = model.compute_logits(model.final_norm(x[plan.sample_index]))  # [S, vocab] fp32
        if st.tp_rank == 0:
            dist.send(logits.float().to(comm).contiguous(), dst=0)
        return None

    def cross_states(self, host: StepPlan, plan: StepPlan, ctx: StepContext):
        """Run the encoder for sequences new to it, free finished slots; the step's cross state
        (encdec.StepCross) or None. Every rank runs it (the plan carries the encoder inputs): TP
        ranks their encoder shard, every pipeline stage the whole encoder for its own layers'
        cross-attention. Slots and lengths are read from the host plan (no device sync); only the
        encoder ids come from the device copy."""
        for slot in host.cross_free.tolist():
            self.cross.drop(slot)
        if not host.cross_slots.numel():
            return None
        slots = host.cross_slots.tolist()
        new = [(slot, n) for slot, n in zip(slots, host.enc_lens.tolist()) if n]
        if new:  # one encoder pass for every request new this step
            states = self.model.encode(plan.enc_ids, [n for _, n in new])
            for (slot, _), s in zip(new, states):
                self.cross.put(slot, s)
        return self.cross.step(slots, ctx) if len(self.cross) else None
