"""Download throughput: s5cmd (parallel) vs single-stream boto3, from a local S3 server (moto) on loopback.

    python -m bench.download [--size-mb 1024] [--shards 4] [--repeat 2] [--out bench-results/download.json]

Builds a ~size-mb safetensors checkpoint (random tensors, uploaded multipart like `aws s3 cp` does), then
downloads it with each configuration into a fresh folder via controller.acquire.download.download_s3 — the same
path serving uses: listing, transfer, verification (multipart ETag), rename into place. Prints a table and
writes JSON. Loopback numbers measure the tools plus the local server, not a network; moto (Python) is
usually the bottleneck, so the ratio matters more than the absolute MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from controller.acquire.download import DEFAULT_PATTERNS, download_s3
from controller.acquire.s5cmd import find_s5cmd
from tests.integration.s3_fixtures import TEST_ENV, MotoServer

BUCKET, PREFIX = "bench", "checkpoint/"
MiB = 1 << 20
# name -> download_s3 keyword arguments. moto reads a whole object from its store for every ranged GET, so
# ranged parts (the default 50 MiB, right for real S3) cost it more than whole-object GETs; both are shown.
CONFIGS = {
    "s5cmd-c16": {"tool": "s5cmd", "concurrency": 16, "part_size_mib": 50},
    "s5cmd-c16-whole": {"tool": "s5cmd", "concurrency": 16, "part_size_mib": 4096},
    "boto3-single-stream": {"tool": "boto3", "concurrency": 1, "part_size_mib": 4096},
    "boto3-c16": {"tool": "boto3", "concurrency": 16, "part_size_mib": 50},
}


def make_checkpoint(folder: Path, size_mb: int, shards: int) -> int:
    """`shards` safetensors files of random fp16 data totalling ~size_mb MiB, plus config/tokenizer. -> bytes."""
    rng = np.random.default_rng(0)
    per_shard = size_mb * MiB // shards // 2  # fp16 values per shard
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        data = np.frombuffer(rng.bytes(per_shard * 2), dtype=np.float16).reshape(-1, 1024)
        save_file({f"layers.{i}.weight": data}, str(folder / name))
        weight_map[f"layers.{i}.weight"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": shards}))
    (folder / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": {f"t{i}": i for i in range(32000)}}})
    )
    return sum(p.stat().st_size for p in folder.iterdir())


def upload(client, folder: Path) -> float:
    from boto3.s3.transfer import TransferConfig

    t0 = time.monotonic()
    config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4)
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), BUCKET, PREFIX + path.name, Config=config)
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="checkpoint size in MiB (default 1024)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument(
        "--repeat", type=int, default=2, help="runs per configuration; the table shows the median"
    )
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    ap.add_argument("--out", default="bench-results/download.json")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed after)")
    args = ap.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}")
    if find_s5cmd() is None:
        names = [n for n in names if CONFIGS[n]["tool"] != "s5cmd"]
        print("s5cmd not found: skipping its rows", file=sys.stderr)
    os.environ.update(TEST_ENV)
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(var, None)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-download-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        with MotoServer(work / "moto.log") as s3:
            client = s3.client()
            client.create_bucket(Bucket=BUCKET)
            src = work / "src"
            src.mkdir(exist_ok=True)
            total = make_checkpoint(src, args.size_mb, args.shards)
            up_s = upload(client, src)
            print(
                f"checkpoint: {total / 1e6:.0f} MB in {args.shards} shards, uploaded in {up_s:.1f} s",
                file=sys.stderr,
            )
            shutil.rmtree(src)
            for name in names:
                runs = []
                for i in range(args.repeat):
                    dest = work / f"dest-{name}-{i}"
                    r = download_s3(
                        f"s3://{BUCKET}/{PREFIX}",
                        dest,
                        endpoint_url=s3.url,
                        include=DEFAULT_PATTERNS,
                        progress=False,
                        **CONFIGS[name],
                    )
                    assert r.bytes == total and r.files_fetched == args.shards + 3, r
                    runs.append(r)
                    shutil.rmtree(dest)
                rows.append(_row(name, CONFIGS[name], runs))
                print(f"  {name}: {rows[-1]['mb_per_s']:.1f} MB/s", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    _print_table(rows, total)
    print(f"load average after: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    report = {
        "bench": "download",
        "checkpoint_bytes": total,
        "shards": args.shards,
        "repeat": args.repeat,
        "server": "moto (python -m moto.server) on 127.0.0.1",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_1_5_15_after": [
                round(x, 2) for x in os.getloadavg()
            ],  # other work on the box skews MB/s
        },
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _row(name: str, config: dict, runs) -> dict:
    secs = [r.seconds for r in runs]
    verify = [r.verify_seconds for r in runs]
    med = statistics.median(secs)
    return {
        "config": name,
        **config,
        "bytes": runs[0].bytes,
        "seconds_median": round(med, 3),
        "seconds_runs": [round(s, 3) for s in secs],
        "verify_seconds_median": round(statistics.median(verify), 3),  # summed over threads: CPU, not wall
        "mb_per_s": round(runs[0].bytes / 1e6 / med, 1),
    }


def _print_table(rows: list[dict], total: int) -> None:
    print(f"\nS3 download of a {total / 1e6:.0f} MB checkpoint from a local S3 server (median of runs)")
    head = f"{'config':<22}{'tool':<7}{'streams':>8}{'part MiB':>9}{'seconds':>9}{'MB/s':>8}{'hashing CPU s':>15}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['config']:<22}{r['tool']:<7}{r['concurrency']:>8}{r['part_size_mib']:>9}{r['seconds_median']:>9.2f}{r['mb_per_s']:>8.1f}"
            f"{r['verify_seconds_median']:>15.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
