"""TP=2 on one node (the local executor) against TP=2 across two Ray nodes (one rank per node):
time to ready and per-step latency, side by side in one run.

    python -m bench.ray_startup [--model demo|llama-300m] [--tokens 64] [--streams 3] [--out FILE.json]

Runs itself inside a private network namespace (`unshare -n`, loopback up; root), so Ray binds to
127.0.0.1 and nothing leaves the machine; RAY_USAGE_STATS_ENABLED=0. The Ray cluster is
`ray.cluster_utils.Cluster` on this machine: a head with no CPUs and two nodes of one CPU each, every
node its own raylet; its start is timed apart. The model's TP=2 partition is made before either
server starts, so both read the same cached rank files. Time to ready = spawn of `shardserve serve`
until /health/ready answers 200 (ranks loaded and warmed up). Per step = the median gap between
streamed tokens of one greedy stream (batch 1, eos ignored), over `--streams` streams of `--tokens`.
Both run `--threads 1` per rank; on one machine the ranks' gloo traffic is loopback either way, so the
difference is Ray's placement and actor start, not the network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NETNS_ENV = "SHARDSERVE_BENCH_NETNS"


def in_netns(argv: list[str]) -> int:
    env = {**os.environ, NETNS_ENV: "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = " ".join([sys.executable, "-m", "bench.ray_startup", *map(_quote, argv)])
    return subprocess.call(["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {cmd}"], cwd=ROOT, env=env)


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def step_ms(server, tokens: int, streams: int) -> dict:
    from shardserve.v1 import generate_pb2 as gpb
    from shardserve.v1 import generate_pb2_grpc as gpb_grpc

    stub = gpb_grpc.GenerationStub(server.channel)
    gaps, firsts = [], []
    for i in range(streams):
        t0 = time.monotonic()
        last, first = None, None
        for _ in stub.GenerateStream(gpb.GenerateStreamRequest(
                prompt=f"bench stream {i}", parameters=gpb.GenerationParameters(max_new_tokens=tokens,
                                                                               ignore_eos=True)), timeout=600):
            now = time.monotonic()
            if last is None:
                first = now - t0
            else:
                gaps.append(now - last)
            last = now
        firsts.append(first)
    return {"step_ms_p50": 1e3 * statistics.median(gaps), "step_ms_mean": 1e3 * statistics.fmean(gaps),
            "first_token_ms_p50": 1e3 * statistics.median(firsts), "gaps": len(gaps)}


def serve(args, name: str, model: Path, cache: Path, extra: list[str]) -> dict:
    from tests.integration.server import ServerProcess

    t0 = time.monotonic()
    s = ServerProcess("--model", str(model), "--tp", "2", "--threads", "1", "--max-model-len", "512",
                      "--max-batch-size", "4", *extra, cache_dir=cache, timeout=600)
    ready = time.monotonic() - t0
    try:
        row = {"system": name, "ready_s": ready, **step_ms(s, args.tokens, args.streams)}
    finally:
        s.stop()
    print(f"{name:<28} ready {row['ready_s']:6.2f} s   step p50 {row['step_ms_p50']:7.2f} ms   "
          f"mean {row['step_ms_mean']:7.2f} ms   first token p50 {row['first_token_ms_p50']:7.1f} ms", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.ray_startup")
    p.add_argument("--model", default="demo", choices=["demo", "llama-300m"])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--cache", default=None, help="model and partition cache (default: a temporary folder)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if os.environ.get(NETNS_ENV) != "1":
        return in_netns(list(argv if argv is not None else sys.argv[1:]))
    sys.path.insert(0, str(ROOT))
    from ray.cluster_utils import Cluster

    from bench.models import by_name
    from controller.acquire.prepare import prepare_model

    cache = Path(args.cache or tempfile.mkdtemp(prefix="ray-bench-"))
    model = by_name(args.model, cache)
    prepare_model(str(model), cache, tp=2, pp=1, dtype="fp32")  # the partition both servers reuse
    rows = [serve(args, "local executor, 1 node", model, cache, [])]
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    cluster_s = time.monotonic() - t0
    print(f"ray cluster (head + 2 nodes) up in {cluster_s:.2f} s", flush=True)
    try:
        rows.append(serve(args, "ray executor, 2 nodes", model, cache,
                          ["--executor", "ray", "--ray-address", cluster.address, "--placement-strategy",
                           "strict-spread"]))
    finally:
        cluster.shutdown()
    local, ray_row = rows
    ratios = {"ready": ray_row["ready_s"] / local["ready_s"], "step": ray_row["step_ms_p50"] / local["step_ms_p50"]}
    print(f"ray / local: time to ready {ratios['ready']:.2f}x, step p50 {ratios['step']:.2f}x")
    out = {"model": args.model, "tokens": args.tokens, "streams": args.streams, "cluster_start_s": cluster_s,
           "rows": rows, "ray_over_local": ratios, "nproc": os.cpu_count(),
           "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
