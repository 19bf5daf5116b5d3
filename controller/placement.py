"""Placement of one replica's ranks: layout check, devices, CPU cores, rendezvous port.

`check_layout` runs before any process starts, so a model that cannot be split says why (with the
numbers) instead of failing inside a worker. It reads the model's config and then builds the model
on the `meta` device with each tensor-parallel rank's state, so the worker's own sharding code
(the parallel layers) is the judge: the controller never needs to know how a family is sharded.

Rank r = pp_rank * tp + tp_rank. GPU: rank r gets device r (of those visible). CPU: the cores this
process may use are divided into disjoint, equal sets, one per rank, and each rank runs that many
torch threads, so ranks never oversubscribe the cores (more ranks than cores: 1 thread each).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path


class LayoutError(ValueError):
    """The requested tensor/pipeline layout cannot split this model; the message names the numbers."""


@dataclass(frozen=True)
class RankPlacement:
    rank: int
    tp_rank: int
    pp_rank: int
    device: str  # "cpu" or "cuda:N"
    threads: int  # torch intra-op threads
    cpus: tuple[int, ...] = ()  # cores this rank is pinned to; () = not pinned


@dataclass(frozen=True)
class Placement:
    tp: int
    pp: int
    master_port: int  # rendezvous on 127.0.0.1
    ranks: tuple[RankPlacement, ...]

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


def free_port() -> int:
    """A free TCP port on loopback (the kernel's choice; bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_int(config, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_config(config, tp: int, pp: int, stage_layers: tuple[int, ...] = ()) -> None:
    """The numbers of a transformers config against a layout; raises LayoutError naming them."""
    if tp < 1 or pp < 1:
        raise LayoutError(f"tensor_parallel_degree={tp} and pipeline_parallel_degree={pp} must be >= 1")
    problems = []
    heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
    if heads and heads % tp:
        problems.append(f"attention heads={heads} is not divisible by tensor_parallel_degree={tp} "
                        f"(degrees that divide it: {_divisors(heads)})")
    kv = _config_int(config, "num_key_value_heads")
    if kv and heads and kv != heads and kv % tp and tp % kv:
        problems.append(f"key/value heads={kv} is neither divisible by nor a divisor of "
                        f"tensor_parallel_degree={tp}")
    vocab = _config_int(config, "vocab_size")
    if vocab and vocab < tp:
        problems.append(f"vocabulary={vocab} is smaller than tensor_parallel_degree={tp}")
    inter = _config_int(config, "intermediate_size", "d_ff", "ffn_dim", "n_inner")
    if inter and inter % tp:
        problems.append(f"intermediate size={inter} is not divisible by tensor_parallel_degree={tp}")
    layers = _config_int(config, "num_hidden_layers", "num_layers", "n_layer")
    if getattr(config, "is_encoder_decoder", False):
        dec = _config_int(config, "num_decoder_layers") or layers
        layers = min(layers or dec, dec or layers)
    if layers and layers < pp:
        problems.append(f"layers={layers} cannot fill pipeline_parallel_degree={pp} stages "
                        f"(each stage needs at least one layer)")
    if stage_layers and (len(stage_layers) != pp or min(stage_layers) < 1
                         or (layers and sum(stage_layers) != layers)):
        problems.append(f"stage layers {list(stage_layers)} must be {pp} positive counts summing to "
                        f"the model's {layers} layers")
    if problems:
        raise LayoutError(f"cannot split the model over tp={tp} x pp={pp}: " + "; ".join(problems))


def dry_build(config, tp: int) -> None:
    """Construct the model on the meta device as every tensor-parallel rank would (no memory,
    no weights): any split the layers refuse raises here, before a process starts."""
    import torch

    from worker.distributed import ParallelState, parallel_state
    from worker.models.registry import model_class

    cls = model_class(config)
    for r in range(tp):
        with parallel_state(ParallelState(tp_rank=r, tp_size=tp)), torch.device("meta"):
            try:
                cls(config)
            except ValueError as e:
                raise LayoutError(f"cannot split the model over tensor_parallel_degree={tp}: {e}") from None


def check_layout(model_dir: Path, tp: int, pp: int, stage_layers: tuple[int, ...] = ()) -> None:
    if (tp, pp) == (1, 1) and not stage_layers:
        # one rank splits nothing; the worker builds the model itself and names any problem. Skipping
        # the meta-device build keeps torch, transformers and the native library (with its self-check)
        # out of the controller: they cost seconds before the first worker could start.
        return
    from worker.loader import load_config

    config = load_config(Path(model_dir))
    check_config(config, tp, pp, stage_layers)
    dry_build(config, tp)


def usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def place(tp: int, pp: int, device: str = "cpu", threads: int = 0, cpus: list[int] | None = None,
          gpu_count: int | None = None, port: int | None = None) -> Placement:
    """Ranks -> devices, cores and threads, plus a rendezvous port. `threads` > 0 caps the
    threads per rank; `cpus` / `gpu_count` default to what this machine offers."""
    world = tp * pp
    cpus = usable_cpus() if cpus is None else list(cpus)
    per = len(cpus) // world
    ranks = []
    if device.startswith("cuda"):
        if gpu_count is None:
            import torch

            gpu_count = torch.cuda.device_count()
        fixed = device.partition(":")[2]
        if world == 1 and fixed:
            devices = [device]
        elif gpu_count < world:
            raise LayoutError(f"tp={tp} x pp={pp} needs {world} GPUs, {gpu_count} visible")
        else:
            devices = [f"cuda:{r}" for r in range(world)]
    elif device == "cpu":
        devices = ["cpu"] * world
    else:
        raise LayoutError(f"device {device!r}: expected cpu, cuda or cuda:N")
    for r in range(world):
        mine = tuple(cpus[r * per:(r + 1) * per]) if per >= 1 and world > 1 else ()
        n = max(1, per)
        ranks.append(RankPlacement(rank=r, tp_rank=r % tp, pp_rank=r // tp, device=devices[r],
                                   threads=min(threads, n) if threads else n, cpus=mine))
    return Placement(tp=tp, pp=pp, master_port=port or free_port(), ranks=tuple(ranks))
