"""Process-global parallel state: which tensor/pipeline rank this process is.

Set once per process by the worker entry point (a second set is refused). With nothing set,
the process is world size 1 and every collective below is the identity, so world size 1 runs
the same code path as world size 8.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from worker import shm_collective


@dataclass(frozen=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None  # torch.distributed.ProcessGroup of this rank's tensor-parallel peers
    tp_ranks: tuple[int, ...] = (0,)  # global ranks of the tp group, tp_ranks[0] is its leader
    # layers per pipeline stage (len pp_size, sums to the model's layers); () = balanced
    stage_layers: tuple[int, ...] = ()
    collective_timeout_s: float = 0.0  # 0 = no process group (world size 1 without torch.distributed)
    comm_device: str = "cpu"  # where tensors handed to collectives live (cuda with NCCL)
    shm: Any = None  # worker.shm_collective.ShmCollective of the tp group when all its ranks share this host

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

    @property
    def distributed(self) -> bool:
        """A process group exists (a worker makes one only for a world of 2 or more ranks)."""
        return self.collective_timeout_s > 0

    def global_rank(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of the layers owned by this rank's stage: `stage_layers` if given,
        else balanced with earlier stages taking the remainder."""
        if self.stage_layers:
            counts = list(self.stage_layers)
            if len(counts) != self.pp_size or sum(counts) != num_layers or min(counts) < 1:
                raise ValueError(f"stage_layers={counts} must be {self.pp_size} positive counts "
                                 f"summing to the model's {num_layers} layers")
        else:
            counts = stage_layer_counts(num_layers, self.pp_size)
        start = sum(counts[: self.pp_rank])
        return start, start + counts[self.pp_rank]


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


@contextmanager
def parallel_state(state: ParallelState):
    """Temporarily act as another rank in this process (layout checks build models on `meta`)."""
    global _STATE
    prev, _STATE = _STATE, state
    try:
        yield state
    finally:
        _STATE = prev


def get_parallel_state() -> ParallelState:
    return _STATE if _STATE is not None else ParallelState()


def stage_layer_counts(num_layers: int, pp: int) -> list[int]:
    """Balanced split of layers over pp stages; earlier stages take the remainder."""
    if num_layers < pp:
        raise ValueError(f"num_layers={num_layers} cannot be split into pipeline_parallel={pp} stages "
                         f"(each stage needs at least one layer)")
    base, extra = divmod(num_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


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
    if state.shm is not None and state.shm.fits(x):
        return state.shm.all_reduce(x)
    dist.all_reduce(x, group=state.tp_group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each rank -> [..., n * tp] on every rank (rank order)."""
    state = get_parallel_state()
    if state.tp_size == 1:
        return x
    if state.shm is not None and state.shm.fits(x):
        return state.shm.all_gather_last_dim(x)
    parts = [torch.empty_like(x) for _ in range(state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=state.tp_group)
    return torch.cat(parts, dim=-1)


class CollectiveError(RuntimeError):
    """A collective or point-to-point operation failed or timed out; the group is unusable."""


def init_distributed(rank: int, tp: int, pp: int, port: int, *, backend: str = "gloo",
                     timeout_s: float = 60.0, stage_layers: tuple[int, ...] = (),
                     device: str = "cpu", master_addr: str = "127.0.0.1") -> ParallelState:
    """Join the replica's process group (rendezvous on master_addr:port, rank 0's node), build the tensor-parallel
    group of this rank's stage, and set the process-global ParallelState.

    Global rank = pp_rank * tp + tp_rank; rank 0 is the leader. Every rank creates every tp group
    in the same order (a torch.distributed requirement)."""
    world = tp * pp
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    pick_interface(master_addr)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{port}", rank=rank, world_size=world,
                            timeout=timeout)
    pp_rank, my_tp_rank = divmod(rank, tp)
    tp_group, tp_ranks = None, ()
    for stage in range(pp):
        ranks = tuple(range(stage * tp, (stage + 1) * tp))
        group = dist.new_group(list(ranks), timeout=timeout, backend=backend) if world > 1 else dist.group.WORLD
        if stage == pp_rank:
            tp_group, tp_ranks = group, ranks
    shm = None
    if backend == "gloo" and tp > 1 and shm_collective.supported(master_addr):
        shm = _open_shm(f"/dev/shm/shardserve-tp-{port}-{pp_rank}", my_tp_rank, tp, timeout_s, tp_group)
    state = ParallelState(tp_rank=my_tp_rank, tp_size=tp, pp_rank=pp_rank, pp_size=pp, tp_group=tp_group,
                          tp_ranks=tp_ranks, stage_layers=tuple(stage_layers), collective_timeout_s=timeout_s,
                          comm_device=device if backend == "nccl" else "cpu", shm=shm)
    set_parallel_state(state)
    logging.getLogger(__name__).info("rank %d/%d joined (%s%s): tp_rank %d/%d, pp_rank %d/%d, timeout %.0fs",
                                     rank, world, backend, ", tp collectives in shared memory" if shm else "",
                                     my_tp_rank, tp, pp_rank, pp, timeout_s)
    return state


def _open_shm(path: str, tp_rank: int, tp: int, timeout_s: float, group) -> shm_collective.ShmCollective | None:
    """The tp group's segment: its first rank makes it, the others map it, then it is unlinked (the
    mappings stay), so no file outlives the group whatever ends it. All ranks agree (a MIN over the
    group): if any could not map it (a full /dev/shm, say), every rank stays on gloo."""
    mine, err = None, ""
    if tp_rank == 0:
        try:
            mine = shm_collective.ShmCollective(path, 0, tp, timeout_s, create=True)
        except (OSError, RuntimeError) as e:
            err = str(e)
    dist.barrier(group=group)
    if tp_rank != 0 and os.path.exists(path):
        try:
            mine = shm_collective.ShmCollective(path, tp_rank, tp, timeout_s, create=False)
        except (OSError, RuntimeError) as e:
            err = str(e)
    ok = torch.tensor([int(mine is not None)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)  # also the barrier before the unlink
    if tp_rank == 0 and os.path.exists(path):
        os.unlink(path)
    if not ok.item():
        logging.getLogger(__name__).warning("tensor-parallel collectives stay on gloo: the shared-memory segment %s "
                                            "could not be set up (%s)", path, err or "on another rank")
        return None
    return mine


def interface_of(address: str) -> str | None:
    """The name of this host's network interface that holds IPv4 `address` (Linux), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None


def pick_interface(master_addr: str) -> None:
    """Across hosts, gloo and NCCL must talk over the interface that reaches rank 0, not the one this
    host's name resolves to (often 127.0.1.1): unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set,
    they get the interface of the local address on the route to master_addr. Nothing is sent (a UDP
    socket's connect only chooses the route). Loopback rendezvous (one machine): left as is."""
    try:
        addr = socket.gethostbyname(master_addr)
        if ipaddress.ip_address(addr).is_loopback:
            return
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            local = s.getsockname()[0]
    except OSError:
        return
    name = interface_of(local)
    if name:
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(var, name)
        logging.getLogger(__name__).info("collectives over %s (%s, the route to rank 0 at %s)",
                                         os.environ["GLOO_SOCKET_IFNAME"], local, master_addr)


def destroy_distributed() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit, the peers may be gone
            pass


def describe_failure(what: str, err: BaseException) -> str:
    """A message that names the collective timeout, for logs and the controller."""
    st = get_parallel_state()
    return (f"rank {st.rank}: {what} failed: {err} (collective timeout {st.collective_timeout_s:g}s, "
            f"set with --collective-timeout); the process group is unusable, exiting so the controller "
            f"restarts the replica")
