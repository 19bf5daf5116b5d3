"""Process-global parallel state: which tensor/pipeline rank this process is.

Set once per process by the worker entry point (a second set is refused). With nothing set,
the process is world size 1 and every collective below is the identity, so world size 1 runs
the same code path as world size 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None  # torch.distributed.ProcessGroup of this rank's tensor-parallel peers
    tp_ranks: tuple[int, ...] = (0,)  # global ranks of the tp group, tp_ranks[0] is its leader

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


_STATE: ParallelState | None = None


def set_parallel_state(state: ParallelState) -> None:
    global _STATE
    if _STATE is not None:
        raise RuntimeError("parallel state is already set for this process")
    _STATE = state


def reset_parallel_state() -> None:
    """For tests that build several single-process models in one interpreter."""
    global _STATE
    _STATE = None


def get_parallel_state() -> ParallelState:
    return _STATE if _STATE is not None else ParallelState()


def tp_rank() -> int:
    return get_parallel_state().tp_rank


def tp_size() -> int:
    return get_parallel_state().tp_size


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tensor_parallel={denominator}")
    return numerator // denominator


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    state = get_parallel_state()
    if state.tp_size == 1:
        return x
    dist.all_reduce(x, group=state.tp_group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each rank -> [..., n * tp] on every rank (rank order)."""
    state = get_parallel_state()
    if state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=state.tp_group)
    return torch.cat(parts, dim=-1)
