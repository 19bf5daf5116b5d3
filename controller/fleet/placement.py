"""Placement of one replica's ranks: layout check, devices, CPU cores, rendezvous port.

`check_layout` runs before any process starts, so a model that cannot be split says why (with the
numbers) instead of failing inside a worker. It reads the model's config.json alone (no torch, no
model code): attention and key/value heads, intermediate size and vocabulary against the
tensor-parallel degree, layers against the pipeline stages. Anything finer the worker's own parallel
layers still refuse when the rank loads, and that error reaches the caller with the rank's stderr.

Rank r = pp_rank * tp + tp_rank. GPU: rank r gets device r (of those visible). CPU: the cores this
process may use are divided into disjoint, equal sets, one per rank, and each rank runs that many
torch threads, so ranks never oversubscribe the cores (more ranks than cores: 1 thread each).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """How one replica is laid out; devices per replica = tensor_parallel x pipeline_parallel."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    dtype: str | None = None  # None: fp16 on cuda, fp32 on cpu
    quantize: str | None = None
    device: str = "cpu"

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or ("fp16" if self.device.startswith("cuda") else "fp32")


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


class ModelConfig:
    """config.json's values as attributes (what check_config reads from a transformers config)."""

    def __init__(self, values: dict):
        self.__dict__.update(values)


def read_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
    values = json.loads(path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"{path}: not a JSON object")
    return ModelConfig(values)


def check_layout(model_dir: Path, tp: int, pp: int, stage_layers: tuple[int, ...] = ()) -> None:
    check_config(read_config(model_dir), tp, pp, stage_layers)


def visible_gpus(env=os.environ) -> int:
    """CUDA devices this process may use, without CUDA or torch: CUDA_VISIBLE_DEVICES when set, else
    the GPUs `nvidia-smi -L` lists (0 without the tool)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        return len(ids[:ids.index("-1")] if "-1" in ids else ids)  # CUDA stops at the first invalid id
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


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
            gpu_count = visible_gpus()
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
