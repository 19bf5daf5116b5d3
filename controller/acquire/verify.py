"""Refuse a truncated or corrupted safetensors file before any rank starts (torch-free).

A safetensors file is 8 bytes of little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data;
every tensor's offsets lie in the data, its size is prod(shape) x the dtype's size, and the data
ends where the last tensor ends. Reading the headers costs a few KB per file."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER = 100 << 20  # the safetensors library's own limit


class CorruptWeightsError(ValueError):
    """A weights file that cannot be served; the message names the file and the reason (one line)."""


def check_safetensors(path: Path) -> None:
    """Raises CorruptWeightsError naming `path` when its header or size is wrong."""
    def bad(reason: str) -> CorruptWeightsError:
        return CorruptWeightsError(f"corrupt weights file {path}: {reason}")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length (truncated)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise bad(f"header length {n} is implausible (over {MAX_HEADER} bytes)")
        if 8 + n > size:
            raise bad(f"header of {n} bytes runs past the end of the {size}-byte file (truncated)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data = size - 8 - n
    end_max = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in t["data_offsets"])
            shape, dtype = [int(d) for d in t["shape"]], t["dtype"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r}: malformed entry {str(t)[:100]}") from None
        if dtype not in ITEMSIZE:
            raise bad(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not 0 <= begin <= end or end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise bad(f"tensor {name!r}: offsets [{begin}, {end}] do not match shape {shape} of {dtype}")
        if end > data:
            raise bad(f"tensor {name!r} ends at byte {end} of the data, which has {data} bytes (truncated)")
        end_max = max(end_max, end)
    if end_max != data:
        raise bad(f"the data has {data} bytes but its tensors end at byte {end_max} (trailing or missing bytes)")


def check_weights(model_dir: Path) -> int:
    """Check every *.safetensors file under `model_dir` (partitions included); returns the count.
    Raises CorruptWeightsError naming the first bad file."""
    files = sorted(Path(model_dir).rglob("*.safetensors"))
    for f in files:
        check_safetensors(f)
    return len(files)
