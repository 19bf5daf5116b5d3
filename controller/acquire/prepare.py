"""From "where the model is" to the folder the workers load, with partitioning decided once here.

prepare_model(src, cache_dir, tp=, pp=, dtype=) resolves the source (S3 download, local folder, Hugging
Face cache, serving.properties, /opt/ml/model; controller.acquire.resolver), then picks what workers load:

  the source is a partition (manifest.json)  -> served as is ("prepartitioned"); its layout and dtype
                                                must equal the requested ones, and a quantized one's
                                                method the requested quantize (when one is requested),
                                                else ValueError naming both
  world size tp*pp > 1                       -> a partition in CACHE/partitions/<hash>-tp-pp-dtype[-quantize],
                                                made on the first start ("created"), reused after ("reused");
                                                with quantize, its rank files are stored quantized
  world size 1                               -> the plain model folder ("none"): one rank reads the
                                                checkpoint directly, a partition would be a full copy
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from controller.acquire.partition import ensure_partition
from controller.acquire.resolver import SAGEMAKER_MODEL_DIR, ResolvedSource, model_name, resolve_model_source
from worker.manifest import check_layout, is_partition

log = logging.getLogger(__name__)

PARTITION_STATES = ("none", "reused", "created", "prepartitioned")


@dataclass(frozen=True)
class PreparedModel:
    path: Path  # absolute folder the workers get as --model: a partition folder or the plain model folder
    name: str  # served name when the operator gives none
    phases: dict[str, float] = field(default_factory=dict)  # "download" / "partition" -> seconds, this start
    downloaded_bytes: int = 0  # fetched from S3 this start (0 when the cache was complete)
    partition: str = "none"  # one of PARTITION_STATES
    source: ResolvedSource | None = None  # how it was resolved (kind "demo" for the embedded demo model)
    log_line: str = ""  # one sentence: where from, what was downloaded, which partition happened


def prepare_model(src: str | os.PathLike | None, cache_dir: Path, *, tp: int = 1, pp: int = 1,
                  dtype: str = "fp32", endpoint_url: str | None = None, progress=None,
                  processes: int = 0, sagemaker_dir: Path = SAGEMAKER_MODEL_DIR,
                  quantize: str | None = None) -> PreparedModel:
    """Download/resolve `src` and partition it if needed; see the module docstring.

    No source and no model in /opt/ml/model: the embedded demo model (built once into the cache).
    Raises what resolve_model_source raises, and ValueError for a partition of another layout or dtype.
    """
    cache_dir = Path(cache_dir)
    resolved = resolve_model_source(src or None, cache_dir, endpoint_url=endpoint_url, progress=progress,
                                    sagemaker_dir=sagemaker_dir, demo=True)
    return prepare_resolved(resolved, cache_dir, tp=tp, pp=pp, dtype=dtype, processes=processes, quantize=quantize)


def prepare_resolved(resolved: ResolvedSource, cache_dir: Path, *, tp: int = 1, pp: int = 1, dtype: str = "fp32",
                     processes: int = 0, partition_ahead: bool = True, quantize: str | None = None) -> PreparedModel:
    """The partitioning half of prepare_model, for a source the caller already resolved
    (e.g. controller.server.resolve_model, which also knows the SageMaker environment).

    partition_ahead=False (a custom pipeline stage split, which cached partitions do not key on):
    ranks slice the checkpoint themselves at load."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={tp} pp={pp}")
    cache_dir = Path(cache_dir)
    phases: dict[str, float] = {}
    if resolved.kind == "s3":
        phases["download"] = resolved.download_seconds
    got = (f"downloaded {resolved.downloaded_bytes / 1e6:.1f} MB from {resolved.origin} in "
           f"{resolved.download_seconds:.2f}s" if resolved.kind == "s3" else f"from {resolved.origin}")
    name = resolved.name or model_name(resolved.origin)
    if is_partition(resolved.path):
        manifest = check_layout(resolved.path, tp, pp, dtype, quantize)
        return _done(PreparedModel(
            path=resolved.path, name=name, phases=phases, downloaded_bytes=resolved.downloaded_bytes,
            partition="prepartitioned", source=resolved,
            log_line=f"model {name}: {got}; already partitioned for tp={tp} pp={pp} {dtype}"
                     f"{' ' + manifest['quantize'] if manifest.get('quantize') else ''}, served without "
                     f"partitioning from {resolved.path}"))
    if tp * pp == 1 or not partition_ahead:
        why = "world size 1" if tp * pp == 1 else "a custom stage split"
        return _done(PreparedModel(
            path=resolved.path, name=name, phases=phases, downloaded_bytes=resolved.downloaded_bytes,
            partition="none", source=resolved,
            log_line=f"model {name}: {got}; {why}: every rank reads its slices of the checkpoint in "
                     f"{resolved.path}"))
    t0 = time.monotonic()
    path, reused = ensure_partition(resolved.path, cache_dir, tp, pp, dtype, processes, quantize=quantize)
    phases["partition"] = time.monotonic() - t0
    what = "reused the cached partition" if reused else f"partitioned in {phases['partition']:.2f}s into"
    return _done(PreparedModel(
        path=path, name=name, phases=phases, downloaded_bytes=resolved.downloaded_bytes,
        partition="reused" if reused else "created", source=resolved,
        log_line=f"model {name}: {got}; tp={tp} pp={pp} {dtype}{' ' + quantize if quantize else ''}: {what} {path}"))


def _done(p: PreparedModel) -> PreparedModel:
    log.info("%s", p.log_line)
    return p
