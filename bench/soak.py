"""A soak: many clients for a set time, resources sampled as it runs, then every request accounted for
and every count back to 0.

    python -m bench.soak --minutes 30 --clients 48 --out bench/results/soak.json
    python -m bench.soak --minutes 5 --clients 8 --pause 0.5          # a short run at a low rate

It starts a demo-model server (tests/integration/server.py). Each client loops over a random mix:
unary Generate (1-3 prompts, n 1-2), GenerateStream, greedy / sampled / beams, a stream cancelled after
a few tokens, a deadline short enough to expire in prefill or decode; `--pause` seconds between a
client's requests lower the rate. Every `--sample-every` seconds one row: requests and errors so far,
the rate, controller and worker RSS, open file descriptors and threads, requests in flight. Afterwards:
outcomes per kind (and the server's shardserve_requests_total by status beside them: the server
counts one per prompt x sample, the clients one per call), the server's in_flight, every replica's
outstanding and KV blocks used back to 0, the worker pid and restarts unchanged, and RSS / fd / thread
growth (RSS in MB per 10k requests, from the start and from the first quarter on, after warm-up).
Exit status 1 on any error outcome, a count not back to 0, a restart or a new worker process."""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
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
COLUMNS = ("t_s", "requests", "errors", "rps", "ctl_rss_mb", "wrk_rss_mb", "ctl_fds", "wrk_fds", "ctl_threads",
           "wrk_threads", "in_flight")


def proc_facts(pid: int) -> tuple[float, int, int]:
    """(RSS MB, open file descriptors, threads) of a process; zeros once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rss = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1)) / 1024
        threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
        return rss, len(os.listdir(f"/proc/{pid}/fd")), threads
    except (OSError, AttributeError):
        return 0.0, 0, 0


def worker_pids(controller_pid: int) -> list[int]:
    """The controller's worker children (their command lines carry --config, worker/config.py)."""
    pids = []
    for task in Path(f"/proc/{controller_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"--config" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    pids.append(int(pid))
            except OSError:
                pass
    return sorted(pids)


def requests_total(metrics_text: str) -> dict[str, float]:
    """shardserve_requests_total summed by status, from a Prometheus exposition."""
    out: dict[str, float] = collections.Counter()
    for m in re.finditer(r'^shardserve_requests_total\{([^}]*)\}\s+(\S+)$', metrics_text, re.M):
        status = re.search(r'status="([^"]*)"', m.group(1))
        out[status.group(1) if status else "?"] += float(m.group(2))
    return dict(out)


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


def soak(channel, stats, duration: float, clients: int, seed: int = 0, pause: float = 0.0,
         sample_every: float = 10.0, sample=None) -> dict:
    """Run the clients; `sample(elapsed, counts)` is called every `sample_every` seconds meanwhile.
    Returns {"outcomes": {...}, "requests": N, "after": stats(), "busy": [...]}."""
    stub = gpb_grpc.GenerationStub(channel)
    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()
    t0 = time.monotonic()
    end = t0 + duration
    stop = threading.Event()

    def client(i):
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < end:
            out = _one(stub, rng)
            with lock:
                counts[out] += 1
            if pause and stop.wait(rng.uniform(0.5, 1.5) * pause):
                return

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    next_sample = t0
    while time.monotonic() < end:
        if sample is not None and time.monotonic() >= next_sample:
            with lock:
                snapshot = collections.Counter(counts)
            sample(time.monotonic() - t0, snapshot)
            next_sample += sample_every
        time.sleep(max(0.05, min(1.0, next_sample - time.monotonic(), end - time.monotonic())))
    stop.set()
    for t in threads:
        t.join(120)
    deadline = time.monotonic() + 60
    while True:  # runs end asynchronously after a cancel: wait for every count to come back
        after = stats()
        busy = [(m, r) for m, s in after.items() for r, rep in s["replicas"].items()
                if s["in_flight"] or rep["outstanding"] or (rep["stats"] or {}).get("kvBlocksUsed")]
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if sample is not None:
        sample(time.monotonic() - t0, collections.Counter(counts))
    return {"outcomes": dict(counts), "requests": sum(counts.values()), "after": after, "busy": busy}


def _growth(samples: list[dict], key: str, first: dict, per_10k: bool) -> float:
    last = samples[-1]
    delta = last[key] - first[key]
    if not per_10k:
        return delta
    return delta * 1e4 / max(1, last["requests"] - first["requests"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=None, help="how long the clients run (or --duration)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds (when --minutes is not given)")
    ap.add_argument("--clients", type=int, default=48)
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between one client's requests (about)")
    ap.add_argument("--sample-every", type=float, default=None, help="seconds between rows (default: 20 rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", "--json", dest="out", default=None, help="write the result (JSON) here")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag (repeat)")
    a = ap.parse_args(argv)
    duration = a.minutes * 60 if a.minutes is not None else a.duration
    every = a.sample_every or max(1.0, duration / 20)
    from tests.integration.server import ServerProcess

    samples: list[dict] = []
    with tempfile.TemporaryDirectory() as cache, ServerProcess(*a.server_arg, cache_dir=Path(cache)) as s:
        before = dict(s.stats()["demo"]["replicas"])
        workers0 = worker_pids(s.proc.pid)
        metrics0 = requests_total(s.http("/metrics")[1].decode())
        print("  ".join(f"{c:>11}" for c in COLUMNS), flush=True)

        def sample(elapsed: float, counts: collections.Counter) -> None:
            ctl = proc_facts(s.proc.pid)
            wrk = [proc_facts(p) for p in workers0]
            done = sum(counts.values())
            prev = samples[-1] if samples else {"t_s": 0.0, "requests": 0}
            try:
                in_flight = sum(m["in_flight"] for m in s.stats().values())
            except Exception:  # noqa: BLE001 - a busy controller answers late; the row goes on
                in_flight = -1
            row = {"t_s": round(elapsed, 1), "requests": done, "errors": sum(v for k, v in counts.items()
                                                                             if k.startswith("ERROR")),
                   "rps": round((done - prev["requests"]) / max(1e-6, elapsed - prev["t_s"]), 2),
                   "ctl_rss_mb": round(ctl[0], 1), "wrk_rss_mb": round(sum(w[0] for w in wrk), 1),
                   "ctl_fds": ctl[1], "wrk_fds": sum(w[1] for w in wrk), "ctl_threads": ctl[2],
                   "wrk_threads": sum(w[2] for w in wrk), "in_flight": in_flight}
            samples.append(row)
            print("  ".join(f"{row[c]:>11}" for c in COLUMNS), flush=True)

        t0 = time.monotonic()
        res = soak(s.channel, s.stats, duration, a.clients, a.seed, a.pause, every, sample)
        wall = time.monotonic() - t0
        metrics1 = requests_total(s.http("/metrics")[1].decode())
        workers1 = worker_pids(s.proc.pid)
    steady = next((x for x in samples if x["t_s"] >= duration / 4), samples[0])
    res.update(
        wall_s=round(wall, 1), duration_s=duration, clients=a.clients, pause_s=a.pause,
        rps=round(res["requests"] / wall, 2), samples=samples,
        server_requests_total={k: metrics1.get(k, 0) - metrics0.get(k, 0) for k in sorted(set(metrics0) | set(metrics1))},
        growth={
            "controller_rss_mb_per_10k": round(_growth(samples, "ctl_rss_mb", samples[0], True), 2),
            "worker_rss_mb_per_10k": round(_growth(samples, "wrk_rss_mb", samples[0], True), 2),
            "controller_rss_mb_per_10k_after_warmup": round(_growth(samples, "ctl_rss_mb", steady, True), 2),
            "worker_rss_mb_per_10k_after_warmup": round(_growth(samples, "wrk_rss_mb", steady, True), 2),
            "controller_fds": _growth(samples, "ctl_fds", steady, False),
            "worker_fds": _growth(samples, "wrk_fds", steady, False),
            "controller_threads": _growth(samples, "ctl_threads", steady, False),
            "worker_threads": _growth(samples, "wrk_threads", steady, False),
        },
        workers_before=workers0, workers_after=workers1,
        restarts_before={n: r["restarts"] for n, r in before.items()},
        restarts_after={n: r["restarts"] for n, r in res["after"]["demo"]["replicas"].items()})
    print(f"\n{'outcome (client calls)':<48} {'count':>8}")
    for k, v in sorted(res["outcomes"].items()):
        print(f"{k[:48]:<48} {v:>8}")
    print(f"\n{'shardserve_requests_total (prompt x sample)':<48} {'delta':>8}")
    for k, v in res["server_requests_total"].items():
        print(f"{k:<48} {v:>8.0f}")
    g = res["growth"]
    print(f"\nrequests {res['requests']} in {wall:.0f} s ({res['rps']:.1f}/s), {a.clients} clients; RSS growth per 10k "
          f"requests: controller {g['controller_rss_mb_per_10k']:.1f} MB ({g['controller_rss_mb_per_10k_after_warmup']:.1f} "
          f"after the first quarter), worker {g['worker_rss_mb_per_10k']:.1f} MB "
          f"({g['worker_rss_mb_per_10k_after_warmup']:.1f}); after the first quarter fds {g['controller_fds']:+d} / "
          f"{g['worker_fds']:+d}, threads {g['controller_threads']:+d} / {g['worker_threads']:+d} (controller / worker); "
          f"not back to 0: {res['busy'] or 'none'}; restarts {res['restarts_before']} -> {res['restarts_after']}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    errors = [k for k in res["outcomes"] if k.startswith("ERROR")]
    return 1 if errors or res["busy"] or res["restarts_before"] != res["restarts_after"] or workers0 != workers1 else 0


if __name__ == "__main__":
    sys.exit(main())
