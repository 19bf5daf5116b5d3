"""A soak: many clients for a set time, then every request accounted for and every count back to 0.

    python bench/soak.py --duration 1800 --clients 48 [--address HOST:PORT --http-port P] [--json out.json]

Without --address it starts a demo server. Each client loops over a random mix: unary Generate (1-3
prompts, n 1-2), GenerateStream, greedy / sampled / beams, a stream cancelled after a few tokens, a
deadline short enough to expire in prefill or decode. Afterwards: outcomes per kind, the server's
in_flight, every replica's outstanding and KV blocks used back to 0, the worker pid and restarts
unchanged, and controller / worker RSS growth (MB per 10k requests)."""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardserve.v1 import generate_pb2 as gpb  # noqa: E402
from shardserve.v1 import generate_pb2_grpc as gpb_grpc  # noqa: E402

OUTCOMES = {grpc.StatusCode.CANCELLED: "cancelled", grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
            grpc.StatusCode.RESOURCE_EXHAUSTED: "refused"}


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _one(stub, rng: random.Random) -> str:
    params = gpb.GenerationParameters(max_new_tokens=rng.choice([1, 4, 16, 48]))
    kind = rng.random()
    if kind < 0.2:
        params.do_sample, params.temperature, params.seed = True, 0.8, rng.randrange(1 << 32)
    elif kind < 0.3:
        params.num_beams = 2
    timeout = rng.choice([60.0, 60.0, 60.0, 0.05, 0.3])
    try:
        if rng.random() < 0.5:
            stub.Generate(gpb.GenerateRequest(prompts=[f"soak {rng.random()}"] * rng.randint(1, 3),
                                              n=rng.randint(1, 2) if params.num_beams < 2 else 1,
                                              parameters=params), timeout=timeout)
        else:
            call = stub.GenerateStream(gpb.GenerateStreamRequest(prompt=f"stream {rng.random()}",
                                                                 parameters=params), timeout=timeout)
            cut = rng.choice([None, None, 1, 3])
            for i, _ in enumerate(call):
                if cut is not None and i + 1 >= cut:
                    call.cancel()
                    return "cancelled"
        return "ok"
    except grpc.RpcError as e:
        return OUTCOMES.get(e.code(), f"ERROR {e.code().name}: {e.details()}")


def soak(channel, stats, duration: float, clients: int, seed: int = 0) -> dict:
    """Run the clients; returns {"outcomes": {...}, "requests": N, "after": stats()}."""
    stub = gpb_grpc.GenerationStub(channel)
    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()
    end = time.monotonic() + duration

    def client(i):
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < end:
            out = _one(stub, rng)
            with lock:
                counts[out] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 120)
    deadline = time.monotonic() + 60
    while True:  # runs end asynchronously after a cancel: wait for every count to come back
        after = stats()
        busy = [(m, r) for m, s in after.items() for r, rep in s["replicas"].items()
                if s["in_flight"] or rep["outstanding"] or (rep["stats"] or {}).get("kvBlocksUsed")]
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return {"outcomes": dict(counts), "requests": sum(counts.values()), "after": after, "busy": busy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds")
    ap.add_argument("--clients", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args()
    from tests.integration.server import ServerProcess

    with tempfile.TemporaryDirectory() as cache, ServerProcess(cache_dir=Path(cache)) as s:
        before = {n: r for n, r in s.stats()["demo"]["replicas"].items()}
        worker = int(Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split()[0])
        rss0 = (_rss_mb(s.proc.pid), _rss_mb(worker))
        t0 = time.monotonic()
        res = soak(s.channel, s.stats, a.duration, a.clients, a.seed)
        wall = time.monotonic() - t0
        rss1 = (_rss_mb(s.proc.pid), _rss_mb(worker))
        per10k = 1e4 / max(1, res["requests"])
        res.update(wall_s=wall, clients=a.clients, rps=res["requests"] / wall,
                   controller_rss_mb=rss1[0], worker_rss_mb=rss1[1],
                   controller_mb_per_10k=(rss1[0] - rss0[0]) * per10k, worker_mb_per_10k=(rss1[1] - rss0[1]) * per10k,
                   restarts_before={n: r["restarts"] for n, r in before.items()},
                   restarts_after={n: r["restarts"] for n, r in res["after"]["demo"]["replicas"].items()})
    print(f"{'outcome':<40} {'count':>8}")
    for k, v in sorted(res["outcomes"].items()):
        print(f"{k:<40} {v:>8}")
    print(f"requests {res['requests']} in {wall:.0f} s ({res['rps']:.1f}/s), {a.clients} clients; "
          f"RSS growth per 10k requests: controller {res['controller_mb_per_10k']:.1f} MB, "
          f"worker {res['worker_mb_per_10k']:.1f} MB; not back to 0: {res['busy'] or 'none'}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    errors = [k for k in res["outcomes"] if k.startswith("ERROR")]
    return 1 if errors or res["busy"] or res["restarts_before"] != res["restarts_after"] else 0


if __name__ == "__main__":
    sys.exit(main())
