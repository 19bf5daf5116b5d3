"""File safety for fetching into a folder: which names may become paths, containment (symlinks
followed), the bookkeeping names a destination reserves, and one writer per destination (flock).

Every object key, manifest entry or upload name passes `unsafe_reason` before it touches the disk:
on its own, s5cmd writes a key such as `prefix/../../x.json` outside its destination folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

STAGING_DIR = ".shardserve-partial"
STATE_FILE = ".shardserve-download.json"
LOCK_FILE = ".shardserve-download.lock"


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
