"""How the ranks of one replica move together: the leader's step plan broadcast, the other ranks'
loop, the pipeline stage boundaries, and the start-up agreements between ranks.

Wire format of one step (all int64, broadcast from global rank 0 over the world group; no pickle):
  header [32]: (command, F, W, len_0 .. len_F-1, 0 ...)  command: STEP / NOOP (heartbeat) / STOP /
               FACTS (then an all-gather of per-rank sizes); F = StepPlan fields, W = block table width
  body [sum len_i]: every StepPlan field flattened, in declaration order (input_ids[T] positions[T]
               slot_mapping[T] block_tables[B*W] query_lens[B] context_lens[B] sample_index[S] ...)
Sampling parameters never travel: only rank 0 samples.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
from torch import nn

from worker.distributed import get_parallel_state

log = logging.getLogger(__name__)

STEP, NOOP, STOP, FACTS = 1, 2, 3, 4
HEADER = 32


def encode_plan(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """StepPlan -> (header [HEADER], body [N]) int64 tensors. Every field of the plan travels, in
    declaration order (so fields added to StepPlan, e.g. encoder inputs, travel too)."""
    fields = list(plan.__dataclass_fields__)
    if len(fields) > HEADER - 3:
        raise ValueError(f"StepPlan has {len(fields)} fields; the header holds {HEADER - 3}")
    parts = [getattr(plan, f).reshape(-1).long() for f in fields]
    header = torch.zeros(HEADER, dtype=torch.long, device="cpu")
    header[0], header[1], header[2] = STEP, len(fields), plan.block_tables.shape[1]
    header[3:3 + len(fields)] = torch.tensor([p.numel() for p in parts], dtype=torch.long, device="cpu")
    return header, torch.cat(parts)


def decode_plan(header: torch.Tensor, body: torch.Tensor):
    from worker.engine.runner import StepPlan

    fields = list(StepPlan.__dataclass_fields__)
    n, width = int(header[1]), int(header[2])
    if n != len(fields):
        raise ValueError(f"step plan with {n} fields, this rank's StepPlan has {len(fields)}")
    parts = body.split([int(v) for v in header[3:3 + n].tolist()])
    values = {f: (p.view(-1, width) if f == "block_tables" else p) for f, p in zip(fields, parts)}
    return StepPlan(**values)


def body_length(header: torch.Tensor) -> int:
    return int(header[3:3 + int(header[1])].sum())


def broadcast_command(command: int, plan=None) -> None:
    """Leader side: send one command (and for STEP its plan) to every rank."""
    dev = get_parallel_state().comm_device
    if command == STEP:
        header, body = encode_plan(plan)
        dist.broadcast(header.to(dev), src=0)
        dist.broadcast(body.to(dev), src=0)
    else:
        dist.broadcast(torch.tensor([command] + [0] * (HEADER - 1), dtype=torch.long, device=dev), src=0)


def receive_command():
    """Follower side: (command, plan or None); blocks until the leader sends."""
    dev = get_parallel_state().comm_device
    header = torch.empty(HEADER, dtype=torch.long, device=dev)
    dist.broadcast(header, src=0)
    command = int(header[0])
    if command != STEP:
        return command, None
    header = header.cpu()
    body = torch.empty(body_length(header), dtype=torch.long, device=dev)
    dist.broadcast(body, src=0)
    return command, decode_plan(header, body.cpu())


def follower_loop(runner, facts: tuple[int, int]) -> int:
    """Every rank but 0: run each step the leader broadcasts until it says STOP (returns 0).
    `facts`: this rank's (parameter bytes, KV cache bytes), sent when the leader asks."""
    while True:
        try:
            command, plan = receive_command()
        except Exception as e:  # noqa: BLE001 - a lost leader or a timeout ends this rank
            runner.fatal("waiting for the leader's next step", e)
        if command == STOP:
            log.info("leader said stop")
            return 0
        if command == STEP:
            runner.forward_step(plan)
        elif command == FACTS:
            gather_rank_facts(*facts)


def leader_loop(engine, stop, heartbeat_s: float) -> None:
    """Rank 0's engine loop (Engine.run_forever plus heartbeats): when idle, a NOOP reaches the
    other ranks at least every `heartbeat_s`, so their wait never hits the collective timeout."""
    state = get_parallel_state()
    last = time.monotonic()
    while not stop.is_set():
        if engine.step():
            last = time.monotonic()
            continue
        if state.distributed and state.world_size > 1 and time.monotonic() - last >= heartbeat_s:
            try:
                broadcast_command(NOOP)
            except Exception as e:  # noqa: BLE001
                engine.runner.fatal("heartbeat to the other ranks", e)
            last = time.monotonic()
        engine.wakeup.wait(timeout=0.05)
        engine.wakeup.clear()


def stop_followers() -> None:
    state = get_parallel_state()
    if state.distributed and state.world_size > 1:
        try:
            broadcast_command(STOP)
        except Exception as e:  # noqa: BLE001 - they may be gone already
            log.warning("could not tell the other ranks to stop: %s", e)


# ---- stage placement of the model ----------------------------------------------------------------

def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def prune_for_stage(model: nn.Module) -> list[str]:
    """Drop (replace with StageMissing) what this pipeline stage never runs, before weights load:
    the input embedding off the first stage, the LM head off the last. A head tied to the embedding
    keeps the embedding on the last stage (it is the head's weight); encoder-decoder models keep it
    everywhere (the encoder runs on every stage). Models may name more modules
    in `first_stage_modules` / `last_stage_modules` (e.g. position embeddings, the final norm).
    Returns the names dropped."""
    from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from worker.models.base import StageMissing

    st = get_parallel_state()
    if st.pp_size == 1:
        return []
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, ParallelLMHead)]
    head_weights = {id(m.weight) for _, m in heads}
    first = []
    if not getattr(model, "is_encoder_decoder", False):  # an encoder on every stage needs its embedding
        first = [n for n, m in model.named_modules()
                 if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
                 and not (st.is_last_stage and id(m.weight) in head_weights)]
    first += list(getattr(model, "first_stage_modules", ()))
    last = [n for n, _ in heads] + list(getattr(model, "last_stage_modules", ()))
    drop = ([] if st.is_first_stage else first) + ([] if st.is_last_stage else last)
    for name in drop:
        _replace(model, name, StageMissing())
    return drop


def agree_num_blocks(num_blocks: int) -> int:
    """The KV block count every rank can hold (stages hold different layer counts): the minimum."""
    st = get_parallel_state()
    if not (st.distributed and st.world_size > 1):
        return num_blocks
    t = torch.tensor([num_blocks], dtype=torch.long, device=st.comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def exchange_rank_facts(param_bytes: int, kv_bytes: int) -> list[tuple[int, int]]:
    """Leader side: ask the other ranks (in their loop) for their sizes."""
    st = get_parallel_state()
    if st.distributed and st.world_size > 1:
        broadcast_command(FACTS)
    return gather_rank_facts(param_bytes, kv_bytes)


def gather_rank_facts(param_bytes: int, kv_bytes: int) -> list[tuple[int, int]]:
    """(parameter bytes, KV cache bytes) of every rank, in global rank order, on every rank."""
    st = get_parallel_state()
    mine = torch.tensor([param_bytes, kv_bytes], dtype=torch.long, device=st.comm_device)
    if not (st.distributed and st.world_size > 1):
        return [(param_bytes, kv_bytes)]
    parts = [torch.empty_like(mine) for _ in range(st.world_size)]
    dist.all_gather(parts, mine)
    return [(int(p[0]), int(p[1])) for p in parts]
