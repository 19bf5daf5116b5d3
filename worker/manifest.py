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
