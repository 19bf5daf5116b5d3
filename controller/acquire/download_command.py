"""`shardserve download SRC DEST` (also `python -m controller.acquire.download_command`): fetch a model
from S3 ahead of time with acquire/download.py's job."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from controller.acquire.download import DEFAULT_PATTERNS, download_s3
from controller.acquire.paths import DownloadError
from controller.acquire.s3 import MiB


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
    """`python -m controller.acquire.download_command SRC DEST ...`: the same as `shardserve download`."""
    sub = argparse.ArgumentParser(prog="python -m controller").add_subparsers()
    parser = register(sub)
    parser.prog = "python -m controller.acquire.download_command"
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
