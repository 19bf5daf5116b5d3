"""The one place that maps checkpoint tensors to our parameters and shards them.

Every parameter of the model must be filled exactly (all packed shards), every checkpoint
tensor must be used or deliberately ignored, and every shape must match: otherwise loading
fails with a list of what is wrong. Each rank reads only its slices (safetensors `get_slice`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

log = logging.getLogger(__name__)


class WeightLoadError(ValueError):
    pass


def checkpoint_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [safe_child(model_dir, n) for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise FileNotFoundError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weights")


def safe_child(root: Path, name: str) -> Path:
    """root/name, refusing names that escape root (from an index or manifest)."""
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise WeightLoadError(f"{name!r} points outside the model folder {root}")
    return path


def iter_checkpoint(files: list[Path], stack: ExitStack) -> Iterator[tuple[str, object]]:
    """(name, lazy tensor) for every tensor; safetensors are sliced lazily, .bin loaded safely."""
    for f in files:
        if f.suffix == ".safetensors":
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            for name in handle.keys():
                yield name, handle.get_slice(name)
        else:
            state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()


def map_name(model: nn.Module, name: str) -> tuple[str, object] | None:
    """Checkpoint name -> (our parameter name, shard id); None for deliberately ignored tensors."""
    custom = getattr(model, "map_checkpoint_name", None)
    if custom is not None:
        return custom(name)
    if any(name.endswith(s) for s in getattr(model, "ignored_checkpoint_suffixes", ())):
        return None
    for ckpt, (ours, shard) in getattr(model, "packed_modules", {}).items():
        if f".{ckpt}." in name:
            return name.replace(f".{ckpt}.", f".{ours}."), shard
    return name, None


def expected_shards(model: nn.Module, param_name: str, param) -> set:
    """Shard ids a parameter must receive to be complete (a parameter may state its own
    `required_shards`, e.g. an LM head filled from the embedding unless the checkpoint has one)."""
    required = getattr(param, "required_shards", None)
    if required is not None:
        return set(required)
    ids = {shard for _, (ours, shard) in getattr(model, "packed_modules", {}).items()
           if param_name.endswith(f".{ours}.weight") or param_name.endswith(f".{ours}.bias")}
    return ids or {None}


def load_weights(model: nn.Module, model_dir: Path, sink=None) -> int:
    """Fill `model` from the checkpoint in model_dir; returns this rank's parameter bytes.

    With `sink(name, tensor)`, the model may live on the meta device: each parameter is filled in
    a fresh buffer and handed to the sink as soon as it is complete (all shards), then dropped, so
    peak memory is about one parameter (ahead-of-time partitioning streams this way).
    """
    params = dict(model.named_parameters())
    received: dict[str, set] = {n: set() for n in params}
    buffers: dict[str, nn.Parameter] = {}
    unused, errors = [], []
    tied = bool(getattr(model, "tied", False))
    from worker.models.base import StageMissing

    # layers of other pipeline stages: their tensors are known and skipped unread
    elsewhere = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, StageMissing))
    with ExitStack() as stack:
        for name, tensor in iter_checkpoint(checkpoint_files(model_dir), stack):
            mapped = map_name(model, name)
            if mapped is None:
                continue
            # a mapping may fan one tensor out to several parameters: [(target, shard), ...]
            for target, shard in (mapped if isinstance(mapped, list) else [mapped]):
                if elsewhere and target.startswith(elsewhere):
                    continue
                if target not in params:
                    if tied and target == "lm_head.weight":
                        continue  # tied to the embedding; the duplicate is redundant
                    unused.append(name)
                    continue
                param = params[target]
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    errors.append(f"{target}: parameter has no weight_loader")
                    continue
                dest = param
                if sink is not None:
                    dest = buffers.get(target)
                    if dest is None:
                        dest = buffers[target] = nn.Parameter(torch.zeros(param.shape, dtype=param.dtype),
                                                              requires_grad=False)
                dest.ckpt_name = name
                try:
                    loader(dest, tensor, shard)
                except (ValueError, RuntimeError) as e:
                    errors.append(f"{name} -> {target}: {e}")
                    continue
                received[target].add(shard)
                if sink is not None and expected_shards(model, target, param) <= received[target]:
                    sink(target, buffers.pop(target).data)
    missing = [n for n, got in received.items() if not expected_shards(model, n, params[n]) <= got]
    if missing or unused or errors:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {', '.join(missing[:20])}")
        if unused:
            parts.append(f"not used by the model: {', '.join(unused[:20])}")
        if errors:
            parts.append("; ".join(errors[:20]))
        raise WeightLoadError(f"{model_dir}: " + " | ".join(parts))
    return sum(p.numel() * p.element_size() for p in params.values())


def load_partition(model: nn.Module, rank_file: Path, quantize: str | None = None) -> int:
    """Fill `model` from its own rank file of a partition (names and shapes exactly ours).

    `quantize`: the method the partition was made with (its manifest). A layer whose file holds
    `<layer>.qweight` first gets its quantized structure (QuantizableLinear.prepare_quantized, int4
    group size = 2 * qweight columns / scales columns), then its buffers are filled like parameters.

    On CPU, with the file's dtype equal to the tensor's, the parameter becomes a view of the
    memory-mapped file (copy-on-write, pages read on first touch): no copy and no second resident
    copy of the weights. Other devices or dtypes copy from the mapping. Returns the bytes held."""
    from worker.layers.linear import QUANT_BUFFERS, QuantizableLinear

    with safe_open(str(rank_file), framework="pt") as f:
        names = set(f.keys())
        buffers: dict[str, tuple[nn.Module, str]] = {}  # file name -> (layer, buffer name)
        for prefix, m in model.named_modules():
            if not (isinstance(m, QuantizableLinear) and f"{prefix}.qweight" in names):
                continue
            if not quantize:
                raise WeightLoadError(f"{rank_file}: {prefix} is stored quantized but the manifest says quantize=null")
            packed_width = 2 * int(f.get_slice(f"{prefix}.qweight").get_shape()[-1])  # int4: padded to the group
            group = packed_width // int(f.get_slice(f"{prefix}.scales").get_shape()[-1]) if quantize == "int4" else 0
            m.prepare_quantized(quantize, group, zeros=f"{prefix}.zeros" in names)
            buffers.update({f"{prefix}.{b}": (m, b) for b in QUANT_BUFFERS if getattr(m, b) is not None})
        params = dict(model.named_parameters())
        wanted = set(params) | set(buffers)
        missing = sorted(wanted - names)
        extra = sorted(names - wanted)
        if missing or extra:
            raise WeightLoadError(f"{rank_file}: does not fit this model/layout: missing {missing[:10]}, "
                                  f"unexpected {extra[:10]}")
        for name in names:
            t = f.get_tensor(name)
            if name in buffers:
                m, b = buffers[name]
                p = getattr(m, b)
            else:
                p = params[name]
            if tuple(t.shape) != tuple(p.shape):
                raise WeightLoadError(f"{rank_file}: {name} has shape {list(t.shape)}, expected {list(p.shape)}")
            if name in buffers and t.dtype != p.dtype:
                raise WeightLoadError(f"{rank_file}: {name} is {t.dtype}, expected {p.dtype}")
            if p.device.type == "cpu" and t.dtype == p.dtype:
                if name in buffers:
                    setattr(m, b, t)  # a registered buffer: stays one
                else:
                    p.data = t  # a tied parameter is one object: every module using it sees the mapping
            else:
                p.data.copy_(t)
    held = list(params.values()) + [getattr(m, b) for m, b in buffers.values()]
    return sum(p.numel() * p.element_size() for p in held)
