"""Write one rank's partition file with the worker's own mapping and sharding code.

`python -m worker.partition_rank SRC OUT --tp N --pp M --rank R [--rank R2 ...] --dtype D` builds the
model for rank R on the meta device (no memory), streams the checkpoint through the same weight
loaders that serve runtime loading (each reads only this rank's slices), and writes each
parameter into a safetensors file as soon as it is complete: peak memory is a few parameters, never
the model (303M-parameter Llama, 1.21 GB: +138 MB over the imports; bench/startup.py).

`--quantize int8|int4|w8a8`: each tensor-parallel linear layer's weight is quantized the moment its shards
are complete, with the function load-time quantization uses, on this rank's own shard, and stored as
`<layer>.qweight`, `<layer>.scales` (and `<layer>.zeros` for int4 when the method has zero points)
instead of `<layer>.weight`; the int4 group size is 2 * qweight.shape[1] / scales.shape[1] (a layer
whose in_features no group size divides has its last group padded with zero weights). Served, the tokens
are those of `serve --quantize` on the checkpoint at the same layout.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

from worker.distributed import ParallelState, set_parallel_state
from worker.engine.engine import DTYPES
from worker.engine.pipeline import prune_for_stage
from worker.layers.linear import QUANTIZE_METHODS, QuantizableLinear, quantize_weight
from worker.loader import load_weights
from worker.manifest import RESOLVED_CONFIG
from worker.model_config import load_config, resolved_config_values
from worker.models.registry import model_class

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
             torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}


class StreamingSafetensorsWriter:
    """A safetensors file whose header is planned from shapes up front; tensors written in any order."""

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict):
        self.path = path
        header, offset = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, 0
        self.offsets = {}
        elem = {n: torch.empty((), dtype=d).element_size() for n, (_, d) in specs.items()}
        # widest elements first: every tensor starts at a multiple of its element size (safetensors
        # allows no padding, and a quantized file mixes int8/uint8 with fp32), so mapped views are aligned
        for name in sorted(specs, key=lambda n: (-elem[n], n)):
            shape, dtype = specs[name]
            size = torch.Size(shape).numel() * elem[name]
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.offsets[name] = (offset, size, tuple(shape), dtype)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.written: set[str] = set()
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.f.truncate(self.data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, size, shape, dtype = self.offsets[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {list(tensor.shape)} {tensor.dtype}, planned {list(shape)} {dtype}")
        self.f.seek(self.data_start + offset)
        self.f.write(tensor.contiguous().view(torch.uint8).numpy().data)  # from the buffer, no copy
        self.written.add(name)

    def close(self) -> None:
        self.f.close()
        missing = set(self.offsets) - self.written
        if missing:
            self.path.unlink(missing_ok=True)
            raise ValueError(f"partition file incomplete, never written: {sorted(missing)[:10]}")


def quantized_specs(model: torch.nn.Module, method: str) -> dict[str, tuple[str, dict]]:
    """`<layer>.weight` -> (`<layer>`, {buffer name: meta tensor}) for every layer `method` applies to."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizableLinear) and isinstance(getattr(m, "weight", None), torch.Tensor):
            tensors, _ = quantize_weight(m.weight, method)  # meta in, meta out: shapes and dtypes only
            out[f"{name}.weight"] = (name, {k: t for k, t in tensors.items() if t is not None})
    return out


def partition_rank(src: Path, out_file: Path, tp: int, pp: int, rank: int, dtype: str,
                   quantize: str | None = None) -> dict:
    """Returns this rank's manifest entry: file, bytes, layer range, tensor shapes."""
    tp_rank, pp_rank = rank % tp, rank // tp
    set_parallel_state(ParallelState(tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank, pp_size=pp))
    config = load_config(src)
    torch_dtype = DTYPES[dtype]
    torch.set_default_dtype(torch_dtype)
    with torch.device("meta"):
        model = model_class(config)(config)
    torch.set_default_dtype(torch.float32)
    prune_for_stage(model)  # as the serving rank does: no embedding / LM head off their stages
    params = dict(model.named_parameters())
    quant = quantized_specs(model, quantize) if quantize else {}
    specs = {}
    for n, p in params.items():
        if n in quant:
            layer, tensors = quant[n]
            specs.update({f"{layer}.{k}": (tuple(t.shape), t.dtype) for k, t in tensors.items()})
        else:
            specs[n] = (tuple(p.shape), p.dtype)
    tmp = out_file.with_suffix(".partial")
    meta = {"tp": tp, "pp": pp, "rank": rank, "dtype": dtype, "quantize": quantize or ""}
    writer = StreamingSafetensorsWriter(tmp, specs, meta)

    def sink(name: str, tensor: torch.Tensor) -> None:  # a complete parameter; dropped after this
        if name not in quant:
            writer.write(name, tensor)
            return
        layer, _ = quant[name]
        for k, t in quantize_weight(tensor, quantize)[0].items():
            if t is not None:
                writer.write(f"{layer}.{k}", t)

    try:
        load_weights(model, src, sink=sink)
    finally:
        writer.close()
    tmp.rename(out_file)
    from worker.models.base import stage_range

    layers = stage_range(int(getattr(config, "num_hidden_layers", getattr(config, "num_layers", 0)) or 0))
    return {"rank": rank, "tp_rank": tp_rank, "pp_rank": pp_rank, "file": out_file.name,
            "bytes": sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in specs.values()),
            "layers": list(layers), "tensors": {n: list(s) for n, (s, _) in sorted(specs.items())},
            "quantized_layers": len(quant), RESOLVED_CONFIG: resolved_config_values(config)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="shardserve-partition-rank")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path, help="the rank file (*.safetensors), or a folder for rank-<r>.safetensors")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--rank", type=int, action="append", help="repeat to write several ranks in this process")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--quantize", default=None, choices=QUANTIZE_METHODS,
                   help="store the tensor-parallel linear layers quantized (as serve --quantize does at load)")
    a = p.parse_args(argv)
    ranks = a.rank or [0]
    if a.out.suffix == ".safetensors" and len(ranks) > 1:
        p.error("several --rank need a folder as out")
    from worker.distributed import reset_parallel_state

    for rank in ranks:  # one interpreter start for all of them; one JSON line (manifest entry) each
        out = a.out if a.out.suffix == ".safetensors" else a.out / f"rank-{rank}.safetensors"
        try:
            print(json.dumps(partition_rank(a.src, out, a.tp, a.pp, rank, a.dtype, a.quantize)), flush=True)
        finally:
            reset_parallel_state()
    return 0

if __name__ == "__main__":
    sys.exit(main())
