"""S3 access shared by download and upload: URLs, listed objects, credentials and endpoint for boto3
and s5cmd alike, and checking a local file against an object's ETag."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class S3Url:
    bucket: str
    prefix: str  # "" (whole bucket) or ends with "/": a prefix is always a folder

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_s3_url(url: str) -> S3Url:
    """`s3://bucket/prefix[/]` -> S3Url; `s3://bucket/a/b` means the folder a/b/, not keys starting a/b."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
        raise ValueError(f"bad bucket name {bucket!r} in {url!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return S3Url(bucket, prefix)


@dataclass(frozen=True)
class RemoteObject:
    key: str  # full S3 key
    rel: str  # key without the prefix: a safe relative POSIX path (see unsafe_reason)
    size: int  # bytes
    etag: str  # without quotes, lower case: "<md5>", "<md5>-<parts>", or something opaque


@dataclass(frozen=True)
class Access:
    """How both tools reach S3: boto3's credential chain, region and endpoint, handed on to s5cmd."""

    endpoint_url: str | None  # None = AWS
    region: str | None  # None = let each tool find the bucket's region
    handoff: tuple[str, str, str | None] | None  # frozen keys for s5cmd when its SDK can't find them itself
    unsigned: bool  # no credentials anywhere: anonymous requests (public buckets)
    pool: int  # HTTP connections boto3 keeps

    @classmethod
    def resolve(cls, endpoint_url: str | None, concurrency: int) -> Access:
        import boto3

        session = boto3.session.Session()
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        creds = session.get_credentials()
        handoff = None
        # s5cmd's Go SDK refreshes env, instance-role and container credentials itself; anything else
        # boto3 found (SSO, assume-role, process, config file) is handed over as fixed keys.
        if creds is not None and creds.method not in ("env", "iam-role", "container-role"):
            frozen = creds.get_frozen_credentials()
            handoff = (frozen.access_key, frozen.secret_key, frozen.token)
        return cls(endpoint or None, session.region_name, handoff, creds is None, max(10, 2 * concurrency))

    def client(self):
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "max_attempts": 10},  # backs off on SlowDown/throttling and 5xx
            max_pool_connections=self.pool,
            connect_timeout=10,
            read_timeout=120,
            **({"signature_version": UNSIGNED} if self.unsigned else {}),
        )
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region or "us-east-1", config=config
        )

    def s5cmd_flags(self) -> list[str]:
        flags = ["--retry-count", "10"]  # s5cmd backs off on throttling and 5xx by itself
        if self.endpoint_url:
            flags += ["--endpoint-url", self.endpoint_url]
        if self.unsigned:
            flags.append("--no-sign-request")
        return flags

    def s5cmd_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.region:
            env["AWS_REGION"] = self.region
        if self.handoff:
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], token = self.handoff
            if token:
                env["AWS_SESSION_TOKEN"] = token
            else:
                env.pop("AWS_SESSION_TOKEN", None)
        return env


_MD5 = re.compile(r"[0-9a-f]{32}")
_MULTIPART = re.compile(r"[0-9a-f]{32}-(\d+)")
_CHUNK = 8 * MiB


def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def multipart_etag(path: Path, part_size: int) -> str:
    """S3's ETag of a multipart upload: md5(concat(md5(part_i))) + "-<parts>"."""
    digests = []
    with open(path, "rb") as f:
        while part := f.read(part_size):
            digests.append(hashlib.md5(part, usedforsecurity=False).digest())
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


class Verifier:
    """Checks a local file against its object: size always; MD5 for single-part ETags; the multipart ETag
    when the part size can be learnt (HEAD ?partNumber=1); size alone for opaque ETags or SSE-KMS objects."""

    def __init__(self, client, bucket: str):
        self.client, self.bucket = client, bucket
        self._heads: dict[tuple[str, int | None], dict | None] = {}
        self._lock = threading.Lock()

    def _head(self, key: str, part: int | None = None) -> dict | None:
        with self._lock:
            if (key, part) in self._heads:
                return self._heads[(key, part)]
        try:
            kw = {"PartNumber": part} if part else {}
            head = self.client.head_object(Bucket=self.bucket, Key=key, **kw)
        except Exception as e:  # not supported by every S3-compatible store: fall back to weaker checks
            logger.debug("HEAD %s (part %s) failed: %s", key, part, e)
            head = None
        with self._lock:
            self._heads[(key, part)] = head
        return head

    def _part_size(self, obj: RemoteObject) -> int | None:
        m = _MULTIPART.fullmatch(obj.etag)
        head = self._head(obj.key, 1) if m else None
        part = int(head.get("ContentLength") or 0) if head else 0
        if part <= 0 or math.ceil(obj.size / part) != int(m.group(1)):
            return None
        return part

    def strong(self, obj: RemoteObject) -> bool:
        """Whether check() compares content hashes (so a file of the right size can't pass by luck)."""
        return bool(_MD5.fullmatch(obj.etag)) or self._part_size(obj) is not None

    def check(self, path: Path, obj: RemoteObject) -> str | None:
        """None if `path` holds `obj`; otherwise why not."""
        size = path.stat().st_size
        if size != obj.size:
            return f"size {size} bytes, S3 says {obj.size}"
        if _MD5.fullmatch(obj.etag):
            got = md5_file(path)
        elif (part := self._part_size(obj)) is not None:
            got = multipart_etag(path, part)
        else:
            return None  # the ETag is not an MD5 we can recompute: size only
        if got == obj.etag:
            return None
        head = self._head(obj.key)
        if head and (
            head.get("ServerSideEncryption", "").startswith("aws:kms") or head.get("SSECustomerAlgorithm")
        ):
            return None  # SSE-KMS / SSE-C ETags are not MD5s of the content: size only
        return f"content MD5 {got} does not match ETag {obj.etag}"
