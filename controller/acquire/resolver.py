"""One resolver from "where the model is" to a local folder holding config.json, weights and tokenizer.

Accepted sources (ACCEPTED_FORMS):
  s3://bucket/prefix/             downloaded (verified, resumable) to CACHE/s3/<bucket>/<prefix>; with
                                   partition_on_nodes (the Ray executor) a partition's shared files only:
                                   each rank fetches its own rank file on its node (acquire/rank_fetch.py)
  /a/local/folder, file:///a/b     used in place
  nothing ("" or None)             /opt/ml/model, SageMaker's model folder, when it exists; with
                                   demo=True and no model there, the embedded demo model (built once)
  .../models--org--name[/snapshots/<rev>], or org/name
                                   a Hugging Face cache folder, or a hub id looked up in the local cache
                                   (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub); never the network
  .../serving.properties, or a folder holding one
                                   its option.s3url or option.model_id is resolved as above; without
                                   either, the properties file's own folder is the model

`model_name(src)` is the one naming rule: the name a model is served under when nobody gives one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from controller.acquire.download import DEFAULT_PATTERNS, download_s3
from controller.acquire.paths import unsafe_reason
from controller.acquire.s3 import parse_s3_url

logger = logging.getLogger(__name__)

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")
PROPERTIES_NAME = "serving.properties"
ACCEPTED_FORMS = (
    "s3://bucket/prefix/, a local model folder (or file:///path), a serving.properties file or a folder "
    "with one (option.s3url / option.model_id), a Hugging Face cache folder (models--org--name) or a hub "
    "id already in the local Hugging Face cache, or nothing for /opt/ml/model"
)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_HUB_ID = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")
_MAX_HOPS = 4  # serving.properties pointing at serving.properties...


@dataclass(frozen=True)
class ResolvedSource:
    path: Path  # absolute local folder with config.json (and weights, tokenizer)
    kind: str  # "local" | "s3" | "sagemaker" | "hf-cache" | "demo"
    origin: str  # what it was resolved from, after following serving.properties (e.g. the s3:// URL)
    download_seconds: float = 0.0  # 0 unless kind == "s3"
    downloaded_bytes: int = 0  # bytes fetched this time (0 when the cache was already complete)
    files_fetched: int = 0
    files_skipped: int = 0  # already in the cache and verified
    properties_file: Path | None = None  # the serving.properties that was followed, if any
    name: str = ""  # model_name(the source): the served name when the operator gives none
    ranks_fetch: bool = False  # an S3 partition of which only the shared files are here: ranks fetch their own


@dataclass(frozen=True)
class _Options:
    cache_dir: Path
    endpoint_url: str | None
    concurrency: int
    progress: object
    include: tuple[str, ...]
    sagemaker_dir: Path
    hf_cache: Path | None
    partition_on_nodes: bool = False


def resolve_model_source(
    src: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    *,
    endpoint_url: str | None = None,
    concurrency: int | None = None,
    progress=None,
    include: Sequence[str] = DEFAULT_PATTERNS,
    sagemaker_dir: str | os.PathLike = SAGEMAKER_MODEL_DIR,
    hf_cache: str | os.PathLike | None = None,
    demo: bool = False,
    partition_on_nodes: bool = False,
) -> ResolvedSource:
    """Turn `src` into a local model folder, downloading from S3 into `cache_dir` when needed.

    Raises ValueError for an unknown scheme or a folder that is not a model (message names the accepted
    forms), FileNotFoundError (with the path) for a local path or cached hub id that isn't there, and
    controller.acquire.paths.DownloadError when S3 fails. `progress`: None/True = bar on a terminal, log lines
    otherwise; False = silent; a callable gets (done_bytes, total_bytes). `demo`: no source and no model
    (config.json) in `sagemaker_dir` -> the embedded demo model, built into `cache_dir` on first use.
    `partition_on_nodes`: an S3 prefix holding a partition (manifest.json) is fetched without its rank
    files (ranks_fetch=True in the result); any other S3 model is fetched whole.
    """
    if demo and not (str(src).strip() if src is not None else "") and not (Path(sagemaker_dir) / "config.json").is_file():
        from controller.acquire.demo_model import demo_model_path

        return ResolvedSource(path=demo_model_path(Path(cache_dir)), kind="demo", origin="the embedded demo model",
                              name="demo")
    opts = _Options(
        cache_dir=Path(cache_dir),
        endpoint_url=endpoint_url,
        concurrency=concurrency or 16,
        progress=True if progress is None else progress,
        include=tuple(include),
        sagemaker_dir=Path(sagemaker_dir),
        hf_cache=Path(hf_cache) if hf_cache else None,
        partition_on_nodes=partition_on_nodes,
    )
    resolved = _resolve(None if src is None else str(src), opts, hops=0)
    return dataclasses.replace(resolved, name=model_name(src, sagemaker_dir))


def _resolve(src: str | None, opts: _Options, hops: int) -> ResolvedSource:
    if hops > _MAX_HOPS:
        raise ValueError(f"serving.properties files point at each other more than {_MAX_HOPS} times")
    src = (src or "").strip()
    if not src:
        if opts.sagemaker_dir.is_dir():
            return _from_folder(opts.sagemaker_dir, opts, hops)
        raise ValueError(
            f"no model source given and {opts.sagemaker_dir} does not exist; give one of: {ACCEPTED_FORMS}"
        )
    m = _SCHEME.match(src)
    if m:
        scheme = m.group(1).lower()
        if scheme == "s3":
            return _from_s3(src, opts)
        if scheme != "file":
            raise ValueError(
                f"unsupported source scheme '{scheme}://' in {src!r}; accepted: {ACCEPTED_FORMS}"
            )
        src = urllib.parse.unquote(urllib.parse.urlsplit(src).path)
    path = Path(src).expanduser()
    if path.is_file():
        return _from_properties_file(path, opts, hops)
    if path.is_dir():
        return _from_folder(path, opts, hops)
    if _HUB_ID.fullmatch(src) and not set(src.split("/")) & {".", ".."}:
        root = opts.hf_cache or hf_cache_root()
        folder = root / ("models--" + src.replace("/", "--"))
        if folder.is_dir():
            return _hf(folder, src)
        raise FileNotFoundError(
            f"model source {src!r}: no such local folder ({path.absolute()}), and not in the Hugging Face "
            f"cache ({folder} is missing); fetching from the Hub is not supported (offline)"
        )
    raise FileNotFoundError(f"model source {path.absolute()} does not exist")


def _from_s3(url: str, opts: _Options) -> ResolvedSource:
    from controller.acquire.rank_fetch import SHARED_PATTERNS
    from worker.manifest import is_partition

    dest = s3_cache_path(opts.cache_dir, url)
    kw = dict(endpoint_url=opts.endpoint_url, concurrency=opts.concurrency, progress=opts.progress)
    results = []
    if opts.partition_on_nodes:  # the shared files first: a partition's rank files are fetched on the nodes
        results.append(download_s3(url, dest, include=SHARED_PATTERNS, **kw))
    ranks_fetch = bool(results) and is_partition(dest)
    if not ranks_fetch:
        results.append(download_s3(url, dest, include=opts.include, **kw))
    _require_config(dest, url)
    return ResolvedSource(
        path=dest.absolute(),
        kind="s3",
        origin=results[-1].url,
        download_seconds=sum(r.seconds for r in results),
        downloaded_bytes=sum(r.bytes for r in results),
        files_fetched=sum(r.files_fetched for r in results),
        # the last pass also skips what an earlier pass of this call fetched: that is not "already cached"
        files_skipped=max(0, results[-1].files_skipped - sum(r.files_fetched for r in results[:-1])),
        ranks_fetch=ranks_fetch,
    )


def _from_properties_file(path: Path, opts: _Options, hops: int) -> ResolvedSource:
    if path.name != PROPERTIES_NAME and path.suffix != ".properties":
        raise ValueError(f"{path} is a file; give a model folder or a serving.properties ({ACCEPTED_FORMS})")
    target = properties_target(path)
    if target is None:  # DJLServing: the folder holding serving.properties is the model
        return _from_folder(path.parent, opts, hops, skip_properties=True)
    resolved = _resolve(target, opts, hops + 1)
    return dataclasses.replace(resolved, properties_file=path.absolute())


def _from_folder(path: Path, opts: _Options, hops: int, skip_properties: bool = False) -> ResolvedSource:
    props = path / PROPERTIES_NAME
    if not skip_properties and props.is_file():
        target = properties_target(props)
        if target is not None and not _same_folder(target, path):
            return _from_properties_file(props, opts, hops)
    if hf_snapshot(path, required=False) is not None:
        return _hf(path, str(path))
    _require_config(path, str(path))
    sagemaker = path.absolute() == opts.sagemaker_dir.absolute()
    return ResolvedSource(
        path=path.absolute(),
        kind="sagemaker" if sagemaker else "local",
        origin=str(path),
        properties_file=props.absolute() if props.is_file() else None,
    )


def _hf(folder: Path, origin: str) -> ResolvedSource:
    snapshot = hf_snapshot(folder, required=True)
    _require_config(snapshot, origin)
    return ResolvedSource(path=snapshot.absolute(), kind="hf-cache", origin=origin)


def _require_config(folder: Path, origin: str) -> None:
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{origin} is not a model folder: {folder / 'config.json'} is missing "
            f"(a model needs config.json, weights and tokenizer files; accepted sources: {ACCEPTED_FORMS})"
        )


def _same_folder(target: str, folder: Path) -> bool:
    if _SCHEME.match(target):
        return False
    p = Path(target).expanduser()
    p = p if p.is_absolute() else folder / p
    return p.exists() and p.resolve() == folder.resolve()


# ---- the served name -------------------------------------------------------------------------------


def model_name(src: str | os.PathLike | None, sagemaker_dir: str | os.PathLike = SAGEMAKER_MODEL_DIR,
               _hops: int = 0) -> str:
    """The name a model is served under when the operator gives none, from its source: the last part
    of an s3:// prefix or folder (s3://b/models/llama-7b/ -> llama-7b), the repo name of a Hugging Face
    id or cache folder (org/name, models--org--name -> name), the model a serving.properties points
    at, a local partition's source folder (cache folders are named by hash); no source: "model" for
    SageMaker's model folder, "demo" for the embedded model."""
    src = str(src).strip() if src is not None else ""
    if not src:
        return "model" if (Path(sagemaker_dir) / "config.json").is_file() else "demo"
    m = _SCHEME.match(src)
    if m and m.group(1).lower() != "file":
        return src.rstrip("/").rsplit("/", 1)[-1] or "model"
    if m:
        src = urllib.parse.unquote(urllib.parse.urlsplit(src).path)
    path = Path(src).expanduser()
    props = path if path.is_file() else path / PROPERTIES_NAME
    if _hops < _MAX_HOPS and props.is_file() and (path.is_dir() or path.suffix == ".properties"):
        target = properties_target(props)
        if target is not None and not _same_folder(target, props.parent):
            return model_name(target, sagemaker_dir, _hops + 1)
        path = props.parent
    repo = [p for p in path.parts if p.startswith("models--")]
    if repo:
        return repo[-1].split("--")[-1]
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            origin = json.loads(manifest.read_text()).get("source", {}).get("path")
        except (OSError, ValueError, AttributeError):
            origin = None
        if origin:
            return Path(origin).name or "model"
    if path.exists():
        return path.resolve().name or "model"
    return src.rstrip("/").rsplit("/", 1)[-1] or "model"  # a hub id: org/name -> name


# ---- serving.properties ---------------------------------------------------------------------------


def read_properties(path: str | os.PathLike) -> dict[str, str]:
    """key -> value of a serving.properties, read by controller.config.properties (the one parser)."""
    from controller.config.properties import read_properties_file

    return {key: value for key, value, _ in read_properties_file(Path(path))}


def properties_target(path: str | os.PathLike) -> str | None:
    """The model a serving.properties points at (option.s3url, else option.model_id), or None.

    A relative local model_id is taken relative to the properties file's folder when that exists.
    """
    path = Path(path)
    props = read_properties(path)
    target = props.get("option.s3url") or props.get("option.model_id")
    if not target:
        return None
    if not _SCHEME.match(target) and not Path(target).expanduser().is_absolute():
        candidate = path.parent / target
        if candidate.exists():
            return str(candidate)
    return target


def s3_url_from_properties(src: str | os.PathLike) -> str:
    """The s3:// URL named by a serving.properties (or a folder holding one): for `shardserve download`."""
    path = Path(src)
    file = path / PROPERTIES_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{src}: not an s3:// URL, and no serving.properties at {file}")
    target = properties_target(file)
    if not target or not target.startswith("s3://"):
        raise ValueError(f"{file} names no s3:// model (option.s3url / option.model_id): {target!r}")
    return target


# ---- S3 cache and Hugging Face cache ----------------------------------------------------------------


def s3_cache_path(cache_dir: str | os.PathLike, url: str) -> Path:
    """CACHE/s3/<bucket>/<prefix parts>: where an S3 model is kept between runs."""
    u = parse_s3_url(url)
    parts = [p for p in u.prefix.split("/") if p]
    bad = [p for p in parts if unsafe_reason(p)]
    if bad:
        raise ValueError(
            f"refusing {url!r} as a cache folder: prefix part {bad[0]!r} is not a safe folder name"
        )
    return Path(cache_dir).joinpath("s3", u.bucket, *parts)


def hf_cache_root() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hf_snapshot(folder: Path, required: bool) -> Path | None:
    """The snapshot folder for a Hugging Face cache entry (`models--org--name`) or a snapshot inside one.

    The revision refs/main points at wins; else the only snapshot; else the newest. None (or
    FileNotFoundError when `required`) when `folder` is not such a cache folder.
    """
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder
    snapshots = folder / "snapshots"
    if not folder.name.startswith("models--") or not snapshots.is_dir():
        if required:
            raise FileNotFoundError(f"{folder} is not a Hugging Face cache folder (no snapshots/)")
        return None
    ref = folder / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text().strip()
        if revision and (snapshots / revision).is_dir() and not unsafe_reason(revision):
            return snapshots / revision
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{folder} has no snapshot in {snapshots}")
    if len(found) > 1:
        logger.warning(
            "%s: refs/main missing; using the newest of %d snapshots, %s", folder, len(found), found[-1].name
        )
    return found[-1]
