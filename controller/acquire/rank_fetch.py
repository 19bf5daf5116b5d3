"""A rank's own files of an S3 partition, fetched on the rank's node (the Ray executor across hosts).

A partition (acquire/partition.py) is manifest.json, the config and tokenizer files, and one rank file
per rank; the manifest's `ranks[r].file` names rank r's. Across hosts no node needs the others' files:

  controller  plan(url, manifest)   lists the prefix once and gives each rank a RankFiles: the S3
                                    location, the rank's manifest entry (its file) and the ETag and size
                                    of every object that rank needs (the shared files and its own)
  rank's node fetch(files, cache)   downloads exactly those objects into CACHE/s3/<bucket>/<prefix>
                                    on its node with acquire/download.py (size and MD5/multipart ETag,
                                    staged then renamed, one writer per folder), then checks that each
                                    object is the one the controller listed (same ETag and size: the
                                    prefix did not change in between), that the manifest there gives
                                    this rank this file, and the rank file's safetensors header
                                    (acquire/verify.py); returns the folder the rank loads

Every name comes from the listing or the manifest and passes paths.contained: nothing lands outside the
cache folder. RankFiles crosses to the node as JSON (to_json / from_json), like the WorkerConfig.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

from controller.acquire.download import DEFAULT_PATTERNS, list_objects, load_state, select
from controller.acquire.partition import WEIGHT_SUFFIXES  # weight files: never shared between ranks
from controller.acquire.paths import STATE_FILE, DownloadError, contained, unsafe_reason
from controller.acquire.s3 import Access, parse_s3_url
from worker.manifest import MANIFEST, read_manifest

SHARED_PATTERNS = tuple(p for p in DEFAULT_PATTERNS if not p.endswith(WEIGHT_SUFFIXES))  # config, tokenizer...


@dataclass(frozen=True)
class RankFiles:
    url: str  # s3://bucket/prefix/ of the partition
    rank: int
    file: str  # the manifest's ranks[rank].file, relative to the prefix
    objects: tuple[tuple[str, str, int], ...]  # (relative name, ETag, bytes) of every object this rank needs
    endpoint_url: str | None = None  # None: the node's AWS settings (AWS_ENDPOINT_URL[_S3]) or AWS

    def to_json(self) -> str:
        return json.dumps({"url": self.url, "rank": self.rank, "file": self.file,
                           "objects": [list(o) for o in self.objects], "endpoint_url": self.endpoint_url})

    @classmethod
    def from_json(cls, text: str) -> RankFiles:
        raw = json.loads(text)
        return cls(url=raw["url"], rank=int(raw["rank"]), file=raw["file"], endpoint_url=raw["endpoint_url"],
                   objects=tuple((str(n), str(e), int(b)) for n, e, b in raw["objects"]))


def shared_names(rels) -> list[str]:
    """The names (relative to a partition's prefix) every rank needs: all but weight files."""
    return [r for r in rels if not r.endswith(WEIGHT_SUFFIXES)]


def plan(url: str, manifest: dict, endpoint_url: str | None = None) -> list[RankFiles]:
    """One RankFiles per rank of the partition at `url` whose manifest is `manifest` (the controller's
    copy). Raises DownloadError when a rank file the manifest names is not under the prefix."""
    src = parse_s3_url(url)
    access = Access.resolve(endpoint_url, 1)  # the endpoint as this host resolves it goes to every rank
    listed, _ = list_objects(access.client(), src)
    by_rel = {o.rel: o for o in select(listed, SHARED_PATTERNS + ("*.safetensors",), prefer_safetensors=False)}
    shared = [by_rel[r] for r in shared_names(sorted(by_rel))]
    out = []
    for entry in sorted(manifest["ranks"], key=lambda e: e["rank"]):
        name = entry["file"]
        why = unsafe_reason(name)
        if why or name not in by_rel:
            raise DownloadError(f"{src}{MANIFEST}: rank {entry['rank']}'s file {name!r} "
                                f"{'is not a safe name (' + why + ')' if why else 'is not under ' + str(src)}")
        objects = tuple((o.rel, o.etag, o.size) for o in [*shared, by_rel[name]])
        out.append(RankFiles(url=str(src), rank=int(entry["rank"]), file=name, objects=objects,
                             endpoint_url=access.endpoint_url))
    return out


def fetch(files: RankFiles, cache_dir: str | os.PathLike) -> Path:
    """Download this rank's objects into its node's CACHE/s3/<bucket>/<prefix>, verified (module
    docstring); the folder. Raises DownloadError naming the object and why."""
    from controller.acquire.download import download_s3
    from controller.acquire.resolver import s3_cache_path
    from controller.acquire.verify import CorruptWeightsError, check_safetensors

    dest = s3_cache_path(cache_dir, files.url).absolute()
    for rel, _, _ in files.objects:
        if unsafe_reason(rel):
            raise DownloadError(f"refusing {rel!r}: it would land outside {dest} ({unsafe_reason(rel)})")
    # exact names (glob-escaped), so no other rank's file and nothing the controller did not list is fetched
    download_s3(files.url, dest, endpoint_url=files.endpoint_url, include=[glob.escape(r) for r, _, _ in files.objects],
                progress=False, prefer_safetensors=False, concurrency=4)
    state = load_state(dest / STATE_FILE, files.url)
    for rel, etag, size in files.objects:
        got = state.get(rel)
        if got is None or not contained(dest, rel).is_file():
            raise DownloadError(f"{files.url}{rel}: not fetched into {dest}")
        if (got["etag"], got["size"]) != (etag, size):
            raise DownloadError(f"{files.url}{rel} changed after the controller listed it (ETag {got['etag']}, "
                                f"{got['size']} bytes; the controller saw {etag}, {size} bytes): deploy again")
    ranks = {int(e["rank"]): e["file"] for e in read_manifest(dest)["ranks"]}
    if ranks.get(files.rank) != files.file:
        raise DownloadError(f"{dest}/{MANIFEST} gives rank {files.rank} the file {ranks.get(files.rank)!r}, "
                            f"not {files.file!r}")
    try:
        check_safetensors(contained(dest, files.file))
    except CorruptWeightsError as e:
        raise DownloadError(str(e)) from None
    return dest
