"""Ahead-of-time partitioning: one safetensors file per rank plus manifest.json.

The controller never slices tensors itself (nor imports torch or model code): it runs
`python -m worker.partition_rank` worker-plane processes, several at a time, each writing one or more
ranks in turn with the worker's own name mapping and sharding code, reading only its slices. Partitions are keyed by (source content hash, layout, dtype, quantize), so a second deploy of
the same model and layout reuses the work.

With `quantize` ("int8" | "int4" | "w8a8") the rank files hold each tensor-parallel linear layer quantized on
that rank's shard (worker/partition_rank.py) and the manifest says `"quantize": "int8"`; `null` (and
every manifest written before quantized partitions existed) means full precision in `dtype`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from worker.manifest import FORMAT, MANIFEST, RESOLVED_CONFIG, is_partition, tensor_layout

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")
SAMPLE = 1 << 20  # bytes read at each sampled offset of a large file


def source_hash(src: Path) -> str:
    """Content hash of a model folder. Small files are hashed whole; weight files over 64 MiB by
    their size, safetensors header and 1 MiB samples at 16 offsets (a full read of a 350 GB
    checkpoint would cost minutes for every start). Dotfiles (download state, locks) are not content."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(src).iterdir() if p.is_file() and not p.name.startswith(".")):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 64 << 20:
                h.update(fh.read())
                continue
            for i in range(16):
                fh.seek((size - SAMPLE) * i // 15)
                h.update(fh.read(SAMPLE))
    return h.hexdigest()


def partition(src: Path, out: Path, tp: int = 1, pp: int = 1, dtype: str = "fp32", processes: int = 0,
              src_hash: str | None = None, quantize: str | None = None) -> dict:
    """Write the partition of `src` into `out` (atomically: a temp folder renamed at the end)."""
    src, out = Path(src).resolve(), Path(out)
    world = tp * pp
    started = time.monotonic()
    src_hash = src_hash or source_hash(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partition-", dir=out.parent))
    try:
        procs = processes or max(1, min(world, os.cpu_count() or 1))
        groups = [list(range(world))[i::procs] for i in range(min(procs, world))]  # ranks per process

        # several processes: one thread each; one process: the threads it would have by default
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if len(groups) > 1 else None

        def run_group(group: list[int]) -> list[dict]:
            # one worker process writes several ranks: one interpreter start per process, not per rank
            cmd = [sys.executable, "-m", "worker.partition_rank", str(src), str(tmp), "--tp", str(tp),
                   "--pp", str(pp), "--dtype", dtype, *(("--quantize", quantize) if quantize else ()),
                   *(x for r in group for x in ("--rank", str(r)))]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode and ("No space left on device" in r.stderr or "[Errno 28]" in r.stderr):
                raise no_space(out, tmp, f"writing ranks {group}")
            if r.returncode:
                raise RuntimeError(f"partitioning ranks {group} failed:\n{r.stderr[-4000:]}")
            return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")][-len(group):]

        with ThreadPoolExecutor(len(groups)) as pool:
            ranks = sorted((e for g in pool.map(run_group, groups) for e in g), key=lambda e: e["rank"])
        config = json.loads((src / "config.json").read_text())
        resolved = [r.pop(RESOLVED_CONFIG, None) for r in ranks][0]  # the same from every rank
        manifest = {
            "format": FORMAT, "source": {"path": str(src), "hash": src_hash},
            "layout": {"tp": tp, "pp": pp}, "dtype": dtype, "quantize": quantize or None,
            "architecture": (config.get("architectures") or [config.get("model_type")])[0],
            "config": config, "tensor_layout": tensor_layout(config), "ranks": ranks,
            "partition_seconds": round(time.monotonic() - started, 3),
        }
        if resolved:
            manifest[RESOLVED_CONFIG] = resolved
        try:
            for f in src.iterdir():  # config, tokenizer and generation files travel with the partition
                if (f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith(".")
                        and f.name != "model.safetensors.index.json"):
                    shutil.copy2(f, tmp / f.name)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: a manifest means complete
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise no_space(out, tmp, "copying the config and tokenizer files") from None
            raise
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("partitioned %s for tp=%d pp=%d %s%s into %s in %.2fs (%s)", src, tp, pp, dtype,
             f" {quantize}" if quantize else "", out,
             manifest["partition_seconds"], ", ".join(f"rank {r['rank']}: {r['bytes'] / 1e6:.1f} MB" for r in ranks))
    return manifest


def no_space(out: Path, tmp: Path, doing: str) -> OSError:
    """The error of a partition that ran out of disk: the folder, what it was doing, how much is free."""
    free = shutil.disk_usage(out.parent).free if out.parent.exists() else 0
    written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
    return OSError(errno.ENOSPC, f"partitioning into {out}: no space left on device in {out.parent} while "
                                 f"{doing} ({written / 1e6:.1f} MB written, {free / 1e6:.1f} MB free); nothing was "
                                 f"kept: free some space or choose another --out / --cache-dir")


def partition_key(src_hash: str, tp: int, pp: int, dtype: str, quantize: str | None = None, layout: int = 1) -> str:
    """The cache folder name; unquantized keys (and tensor layout 1) are those of before either existed."""
    return (f"{src_hash[:16]}-tp{tp}-pp{pp}-{dtype}" + (f"-{quantize}" if quantize else "")
            + (f"-l{layout}" if layout != 1 else ""))


def ensure_partition(src: Path, cache_dir: Path, tp: int, pp: int, dtype: str,
                     processes: int = 0, quantize: str | None = None) -> tuple[Path, bool]:
    """(partition folder, reused?) for `src` in the cache, partitioning on a miss."""
    layout = tensor_layout(json.loads((Path(src) / "config.json").read_text()))
    key = partition_key(source_hash(src), tp, pp, dtype, quantize, layout)
    what = f"tp={tp} pp={pp} {dtype}" + (f" {quantize}" if quantize else "")
    out = Path(cache_dir) / "partitions" / key
    if is_partition(out):
        log.info("reusing cached partition %s", out)
        return out, True
    from controller.acquire.paths import exclusive_lock

    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out.parent / f".{key}.lock"):  # one partitioner per key; the others wait, then reuse
        if is_partition(out):
            log.info("reusing partition %s (made by another process meanwhile)", out)
            return out, True
        log.info("no cached partition for %s (%s): partitioning into %s", src, what, out)
        partition(src, out, tp, pp, dtype, processes, quantize=quantize)
    return out, False


def run(args) -> int:
    src = Path(args.src)
    if "://" in args.src or not src.is_dir():  # s3://, serving.properties, a Hugging Face id: fetch first
        from controller.acquire.resolver import resolve_model_source
        from controller.config.settings import default_cache_dir

        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        src = resolve_model_source(args.src, cache, endpoint_url=args.endpoint_url).path
    m = partition(src, Path(args.out), args.tp, args.pp, args.dtype, args.processes, quantize=args.quantize)
    for r in m["ranks"]:
        print(f"rank {r['rank']} (tp {r['tp_rank']}, pp {r['pp_rank']}): {r['file']}, {r['bytes'] / 1e6:.1f} MB, "
              f"layers {r['layers'][0]}-{r['layers'][1] - 1}"
              + (f", {r['quantized_layers']} linear layers {args.quantize}" if args.quantize else ""))
    print(f"manifest: {Path(args.out) / MANIFEST} ({m['partition_seconds']:.2f}s)")
    if args.upload:
        from controller.acquire.upload import upload_partition

        up = upload_partition(Path(args.out), args.upload, endpoint_url=args.endpoint_url)
        print(f"uploaded: {up.url} ({up.files} files, {up.bytes / 1e6:.1f} MB, {up.seconds:.2f}s); "
              f"serve it with --model {up.url} --tp {args.tp} --pp {args.pp} --dtype {args.dtype}"
              + (f" --quantize {args.quantize}" if args.quantize else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("partition", help="partition a model ahead of time: one file per rank + manifest.json")
    p.add_argument("src", help="a model source: local folder, s3://bucket/prefix/, serving.properties, HF cache id")
    p.add_argument("--out", required=True, help="the partition folder to write")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "w8a8"],
                   help="store the tensor-parallel linear layers quantized (int8 per output channel, int4 per "
                        "group), on each rank's shard: served like serve --quantize on the checkpoint")
    p.add_argument("--processes", type=int, default=0,
                   help="ranks partitioned at once in worker processes (0 = min(world, cores); 1 = one process, rank after rank)")
    p.add_argument("--upload", default=None, metavar="S3_URL",
                   help="then put the partition at s3://bucket/prefix/ (serving from there skips partitioning)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS / AWS_ENDPOINT_URL)")
    p.add_argument("--cache-dir", default=None, help="where a remote source is downloaded")
    p.set_defaults(func=lambda a: run(a))
