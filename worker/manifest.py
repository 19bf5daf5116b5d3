"""A partition's manifest.json (written by controller/acquire/partition.py): reading it and checking that it
can serve a layout. Torch-free: the controller checks before launching, each worker again before
loading its rank file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "shardserve-partition-v1"
# The transformers config with every default filled (worker/model_config.py), so that a
# worker loading a partition needs no transformers import. Absent or of another transformers version:
# the worker resolves config.json itself.
RESOLVED_CONFIG = "resolved_config"
# Version of a family's rank-file tensors (names, packing, sharding), by config.json model_type; absent =
# 1. Bump it when a family's mapping changes what a rank file holds: cached partitions then get a new
# cache key (re-made, never loaded stale) and a partition named by hand fails check_layout with why.
# t5 2: wi_0 and wi_1 packed into one wi_01 (gated feed-forward, one GEMM).
TENSOR_LAYOUT = {"t5": 2}


def tensor_layout(config: dict) -> int:
    """The tensor layout this shardserve writes and reads for a model of `config` (config.json)."""
    return TENSOR_LAYOUT.get(str(config.get("model_type", "")), 1)


def is_partition(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: Path) -> dict:
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}/{MANIFEST}: unknown format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def check_layout(path: Path, tp: int, pp: int, dtype: str | None = None, quantize: str | None = None) -> dict:
    """The manifest, if the partition at `path` can serve this layout, dtype and quantization.

    A quantized partition asked for another method is refused; asked for none, it serves its own
    (the workers say so). A full-precision partition asked for `quantize` is quantized at load."""
    m = read_manifest(path)
    want, have = tensor_layout(m.get("config") or {}), m.get("tensor_layout", 1)
    if have != want:
        raise ValueError(f"{path}: partitioned by an older shardserve (tensor layout {have} of "
                         f"{m.get('config', {}).get('model_type')!r}; this one reads {want}): partition it again")
    if (m["layout"]["tp"], m["layout"]["pp"]) != (tp, pp):
        raise ValueError(f"{path}: partitioned for tp={m['layout']['tp']} pp={m['layout']['pp']}, "
                         f"but serving asks for tp={tp} pp={pp}")
    if dtype and m["dtype"] != dtype:
        raise ValueError(f"{path}: partitioned as {m['dtype']}, but serving asks for {dtype}")
    stored = m.get("quantize")
    if quantize and stored and quantize != stored:
        raise ValueError(f"{path}: partitioned with quantize={stored}, but serving asks for quantize={quantize}; "
                         f"serve it with --quantize {stored} (or none), or partition again with --quantize {quantize}")
    if stored and not quantize:
        log.info("%s: the partition is quantized (%s): served as %s", path, stored, stored)
    return m
