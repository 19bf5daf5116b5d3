"""Put a partition folder back in S3, so any later `serve --model s3://...` skips partitioning.

Rank files go up first (boto3 managed transfers: multipart above 64 MiB, several at once); manifest.json
goes last, so a reader that sees the manifest under the prefix also sees every rank file it names.
The multipart part size is fixed, so the download side can learn it (HEAD ?partNumber=1) and verify
the multipart ETag of every file it fetches.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from controller.acquire.paths import unsafe_reason
from controller.acquire.s3 import Access, parse_s3_url
from worker.manifest import MANIFEST, read_manifest

log = logging.getLogger(__name__)

MiB = 1 << 20
PART_BYTES = 64 * MiB  # multipart threshold and part size


@dataclass(frozen=True)
class UploadResult:
    url: str  # s3://bucket/prefix/ the partition now lives at
    files: int
    bytes: int
    seconds: float


def upload_partition(folder: Path, url: str, *, endpoint_url: str | None = None,
                     concurrency: int = 8) -> UploadResult:
    """Upload every file of the partition in `folder` to `url` (a prefix); manifest.json last."""
    from boto3.s3.transfer import TransferConfig

    folder = Path(folder)
    read_manifest(folder)  # refuse to upload something that is not a finished partition
    dest = parse_s3_url(url)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    bad = [p.name for p in files if unsafe_reason(p.name)]
    if bad:
        raise ValueError(f"{folder}: refusing to upload files with unsafe names: {bad}")
    client = Access.resolve(endpoint_url, concurrency).client()
    config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                            max_concurrency=max(1, concurrency // 2))
    t0 = time.monotonic()

    def put(path: Path) -> int:
        client.upload_file(str(path), dest.bucket, dest.prefix + path.name, Config=config)
        return path.stat().st_size

    body = [p for p in files if p.name != MANIFEST]
    with ThreadPoolExecutor(max(1, min(len(body), 4))) as pool:
        total = sum(pool.map(put, body))
    total += put(folder / MANIFEST)
    result = UploadResult(str(dest), len(files), total, time.monotonic() - t0)
    log.info("uploaded partition %s to %s: %d files, %.1f MB in %.2fs", folder, result.url, result.files,
             result.bytes / 1e6, result.seconds)
    return result
