"""Where the server's time goes at N concurrent streams: the real `shardserve serve` (controller and
worker processes) on the 300M bench Llama, sampled with py-spy while N GenerateStream clients run.

    python -m bench.profile [--threads 2] [--streams 32] [--prompt 128] [--new-tokens 128] [--quantize int8]
                            [--rate 40] [--no-spy] [--no-decode] [--out bench/results/profile-32streams.json]

Measured in one run:
  * py-spy (`record --nonblocking --format raw --full-filenames`) on the controller and on the worker
    for the whole timed phase; each sample goes to the category of its innermost frame that matches a
    rule below (Python frames only: a torch op's time belongs to the line that called it);
  * CPU seconds (utime + stime from /proc/PID/stat and /proc/PID/task/*/stat, before/after the timed
    phase) of the controller, of its threads grouped by OS name (gRPC's C threads are named by gRPC,
    Python threads are "python"), of the worker and of this client process;
  * TTFT p50/p99, inter-token gap p50 (gaps between a stream's consecutive tokens, pooled), tokens/s;
  * the same engine in-process (`python -m bench.decode`, same threads, batch 1 and batch N, prompt
    set so the mean context matches the server run's) for the server-overhead ratio
    = server inter-token p50 / in-process batch-N step.
py-spy costs a little CPU of its own (sampling at --rate Hz); --no-spy gives the clean timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench import models, ours
from bench.workload import Workload, prompts

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")

# (category, file suffix, function names or None for any) - first match from the innermost frame wins
WORKER_RULES = [
    ("stop checks", "worker/engine/engine.py", {"_stop_reason"}),
    ("plan building", "worker/engine/runner.py", {"build_plan"}),
    ("attention metadata", "worker/engine/runner.py", {"_context", "cross_states"}),
    ("attention metadata", "worker/context.py", None),
    ("attention metadata", "worker/layers/attention.py", {"attend", "gather_slots"}),
    ("attention (torch SDPA path: masks, gathers, SDPA)", "worker/layers/attention.py", {"_attend_rows"}),
    ("sampling and logits processing", "worker/engine/sampler.py", None),
    ("sampling and logits processing", "worker/engine/beam.py", None),
    ("scheduling and KV blocks", "worker/engine/scheduler.py", None),
    ("scheduling and KV blocks", "worker/engine/block_manager.py", None),
    ("worker->controller messages", "worker/service.py", None),
    ("worker->controller messages", "/grpc/", None),
    ("model forward: linear layers", "worker/layers/linear.py", None),
    ("model forward: paged-attention decode kernel", "native/ops.py", {"paged_attention_decode"}),
    ("model forward: LM head", "worker/layers/embedding.py", None),
    ("model forward: other (norms, rotary + cache write, activations, glue)", "worker/models/", None),
    ("model forward: other (norms, rotary + cache write, activations, glue)", "worker/layers/", None),
    ("model forward: other (norms, rotary + cache write, activations, glue)", "native/", None),
    ("model forward: other (norms, rotary + cache write, activations, glue)", "worker/engine/runner.py",
     {"_forward", "run", "_forward_stage"}),
    ("engine update (outside sampling)", "worker/engine/engine.py", {"_update", "_finish"}),
    ("engine step glue and inbox", "worker/engine/", None),
]
CONTROLLER_RULES = [
    ("detokenization (incremental decode)", "controller/tokenizer.py", {"push", "flush", "_emit", "decode"}),
    ("stop strings", "controller/tokenizer.py", {"feed"}),
    ("detokenization (incremental decode)", "/transformers/", None),
    ("detokenization (incremental decode)", "/tokenizers/", None),
    ("servicer: events -> GenerateStreamResponse", "controller/api/service.py", None),
    ("worker session: receive and route step events", "controller/fleet/session.py", None),
    ("stats poll and metrics", "controller/server.py", {"poll_stats", "_stats_route"}),
    ("stats poll and metrics", "controller/metrics/", None),
    ("stats poll and metrics", "controller/fleet/replica.py", {"refresh_status"}),
    ("gRPC Python layer (receive from worker, send to client)", "/grpc/", None),
    ("protobuf", "/google/protobuf/", None),
]


# innermost frames that mean "blocked": a Python wait, or a line whose C call sleeps/polls (py-spy's
# --nonblocking mode cannot tell an idle thread from a busy one by itself)
IDLE_FUNCS = {"Condition.wait", "Event.wait", "_wait_once", "wait", "select", "_PollLikeSelector.select",
              "_serve", "_run_channel_spin_thread.<locals>.channel_spin", "Replica._watch",
              "die_with_parent.<locals>.watch", "_worker", "SimpleQueue.get", "Queue.get", "Thread.join",
              "BaseServer.serve_forever", "Server.wait_for_termination", "main",
              # blocked in C: a controller request thread in SimpleQueue.get (no Python frame of its own),
              # the session reader in gRPC's wait for the worker's next message
              "SessionCall.__next__", "_MultiThreadedRendezvous._next"}
IDLE = "(idle: threads blocked waiting)"


def classify(stack: list[str], rules) -> str:
    if stack and stack[-1].partition(" (")[0] in IDLE_FUNCS:
        return IDLE
    for frame in reversed(stack):
        # "func (path:line)"
        name, _, where = frame.partition(" (")
        path = where.rsplit(":", 1)[0]
        for cat, suffix, funcs in rules:
            if suffix in path and (funcs is None or name.split(".")[-1] in funcs):
                return cat
    return "other Python (threading, queues, idle loops)"


def read_raw(path: Path, rules) -> dict:
    """Samples per category and per thread name from a py-spy raw (collapsed stacks) file."""
    cats: Counter = Counter()
    threads: Counter = Counter()
    total = 0
    if not path.is_file():
        return {"samples": 0, "categories": {}, "threads": {}}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0]
        frames = frames[1:]
        n = int(n)
        total += n
        cats[classify(frames, rules)] += n
        threads[thread.split(": ", 1)[-1] if ": " in thread else thread] += n
    return {"samples": total, "categories": dict(cats.most_common()), "threads": dict(threads.most_common(12))}


def cpu_of(pid: int) -> dict:
    """utime+stime seconds of a process and of its threads grouped by OS thread name."""
    def ticks(stat_path: Path) -> int:
        f = stat_path.read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])  # utime, stime (fields 14, 15 of stat)

    out = {"total": ticks(Path(f"/proc/{pid}/stat")) / TICK, "threads": defaultdict(float), "nthreads": 0}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (t / "comm").read_text().strip()
            out["threads"][name] += ticks(t / "stat") / TICK
            out["nthreads"] += 1
        except OSError:
            continue
    return out


def cpu_delta(a: dict, b: dict) -> dict:
    names = set(a["threads"]) | set(b["threads"])
    th = {n: round(b["threads"].get(n, 0.0) - a["threads"].get(n, 0.0), 3) for n in names}
    return {"total_s": round(b["total"] - a["total"], 3),
            "threads_s": dict(sorted(((n, s) for n, s in th.items() if s > 0), key=lambda kv: -kv[1])),
            "nthreads": b["nthreads"]}


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def start_spy(pid: int, out: Path, rate: int) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("py-spy not found: `python -m pip install py-spy`; running without it", file=sys.stderr)
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                             "--nonblocking", "--threads", "--full-filenames", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_spy(p: subprocess.Popen | None) -> str:
    if p is None:
        return ""
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return err.decode(errors="replace")[-500:]


def in_process(args, work: Workload) -> list[dict]:
    """bench.decode's fp32 (or quantized) rows at batch 1 and batch N, in a fresh process, same threads;
    the prompt length makes its mean decode context equal the server run's."""
    mean_ctx = work.prompt_tokens + work.new_tokens // 2
    tokens = 32
    prompt = max(1, mean_ctx - tokens // 2)
    out = Path(args.cache or Path.home() / ".cache" / "shardserve" / "bench") / "profile-decode.json"
    cmd = [sys.executable, "-m", "bench.decode", "--threads", str(args.threads), "--tokens", str(tokens),
           "--prompt", str(prompt), "--batches", ",".join(sorted({"1", str(work.streams)})), "--variants", args.quantize or "fp32",
           "--reps", "1", "--profile-steps", "0", "--model", args.model, "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
                   stdout=sys.stderr)
    rows = json.loads(out.read_text())["results"]
    return [{"batch": r["batch"], "ms_per_step": r["ms_per_step"], "ms_per_step_median": r["ms_per_step_median"],
             "prompt": prompt, "tokens": tokens} for r in rows]


def shares(prof: dict, cpu_s: float) -> dict:
    """Category -> (share of the busy samples, CPU seconds by that share); idle samples left out."""
    busy = sum(n for c, n in prof["categories"].items() if c != IDLE)
    return {c: (n / max(1, busy), n / max(1, busy) * cpu_s) for c, n in prof["categories"].items() if c != IDLE}


def add_breakdown(doc: dict) -> None:
    """doc["breakdown"]: CPU seconds and ms per generated token by category, worker and controller."""
    tokens = doc["server"]["tokens"]
    doc["breakdown"] = {
        role: {cat: {"share_of_busy": round(share, 4), "cpu_s": round(sec, 2),
                     "cpu_ms_per_token": round(1e3 * sec / tokens, 3)}
               for cat, (share, sec) in shares(prof, doc["cpu_seconds"][role]["total_s"]).items()}
        for role, prof in doc["profiles"].items()}


def table(name: str, prof: dict, cpu_s: float) -> list[str]:
    idle = prof["categories"].get(IDLE, 0)
    lines = [f"{name}: {prof['samples']} samples ({idle} idle, left out); CPU {cpu_s:.1f} s over the run, "
             f"shared by the busy samples"]
    for cat, (share, sec) in shares(prof, cpu_s).items():
        lines.append(f"  {100 * share:5.1f}%  ~{sec:6.1f} CPU s  {cat}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="worker torch threads (and bench.decode's)")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quantize", default="", choices=["", "int8", "int4", "w8a8"])
    ap.add_argument("--model", default="llama-300m", choices=list(models.BY_NAME))
    ap.add_argument("--rate", type=int, default=40, help="py-spy samples per second")
    ap.add_argument("--no-spy", action="store_true", help="timings and CPU only")
    ap.add_argument("--no-decode", action="store_true", help="skip the in-process bench.decode rows")
    ap.add_argument("--cache-dir", default="", help="default ~/.cache/shardserve/bench")
    ap.add_argument("--out", default="bench/results/profile-32streams.json")
    ap.add_argument("--reparse", default="", metavar="JSON",
                    help="only re-read the py-spy files of the last run into this JSON (after changing the rules)")
    args = ap.parse_args(argv)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else Path.home() / ".cache" / "shardserve" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    if args.reparse:
        doc = json.loads(Path(args.reparse).read_text())
        doc["profiles"] = {"controller": read_raw(cache / "profile-controller.txt", CONTROLLER_RULES),
                           "worker": read_raw(cache / "profile-worker.txt", WORKER_RULES)}
        doc["method"] = __doc__
        add_breakdown(doc)
        Path(args.reparse).write_text(json.dumps(doc, indent=1) + "\n")
        for role, prof in doc["profiles"].items():
            print("\n".join(table(role, prof, doc["cpu_seconds"][role]["total_s"])))
        return 0
    args.cache = cache
    work = Workload(streams=args.streams, prompt_tokens=args.prompt, new_tokens=args.new_tokens)
    model_dir = models.by_name(args.model, cache)
    ps = prompts(model_dir, work)
    load_before = os.getloadavg()
    kv = ours.kv_cache_mb(model_dir, work)
    extra = ["--kv-cache-mb", str(kv), *ours.WATCHDOG] + (["--quantize", args.quantize] if args.quantize else [])
    t_start = time.monotonic()
    server = ours.Server(model_dir, cache, max_batch_size=args.streams, log_path=cache / "profile-server.log",
                         threads=args.threads, extra=extra)
    ready_s = time.monotonic() - t_start
    spies, files = [], {}
    try:
        workers = server.worker_pids()
        ours.warm(server.channel, ps[0][0])
        pids = {"controller": server.proc.pid, "worker": workers[0]}
        if not args.no_spy:
            for role, pid in pids.items():
                files[role] = cache / f"profile-{role}.txt"
                files[role].unlink(missing_ok=True)
                spies.append(start_spy(pid, files[role], args.rate))
            time.sleep(1.0)  # py-spy attached
        before = {role: cpu_of(pid) for role, pid in pids.items()}
        me0 = self_cpu()
        streams = ours.drive(server.channel, ps, work.new_tokens)
        after = {role: cpu_of(pid) for role, pid in pids.items()}
        me1 = self_cpu()
        spy_log = [stop_spy(p) for p in spies]
    finally:
        server.stop()
    summary = streams.summary()
    cpu = {role: cpu_delta(before[role], after[role]) for role in pids}
    cpu["client (this process)"] = {"total_s": round(me1 - me0, 3)}
    profiles = {}
    if not args.no_spy:
        profiles["controller"] = read_raw(files["controller"], CONTROLLER_RULES)
        profiles["worker"] = read_raw(files["worker"], WORKER_RULES)
    decode_rows = [] if args.no_decode else in_process(args, work)
    step = {r["batch"]: r["ms_per_step"] for r in decode_rows}
    itl_ms = 1e3 * summary["inter_token_p50_s"]
    doc = {
        "bench": "profile", "model": model_dir.name, "workload": vars(work) if hasattr(work, "__dict__") else {},
        "threads": args.threads, "quantize": args.quantize or None, "kv_cache_mb": kv, "ready_s": round(ready_s, 2),
        "server": summary, "cpu_seconds": cpu,
        "controller_cpu_ms_per_token": 1e3 * cpu["controller"]["total_s"] / summary["tokens"],
        "worker_cpu_ms_per_token": 1e3 * cpu["worker"]["total_s"] / summary["tokens"],
        "profiles": profiles, "in_process": decode_rows,
        "overhead_ratio": {f"batch{b}": itl_ms / ms for b, ms in step.items()},
        "py_spy": {"rate_hz": args.rate, "log": spy_log} if not args.no_spy else None,
        "host": {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "method": __doc__,
    }
    doc["workload"] = {"streams": work.streams, "prompt_tokens": work.prompt_tokens, "new_tokens": work.new_tokens}
    lines = [f"{model_dir.name} {'fp32' if not args.quantize else args.quantize}, {args.streams} streams x "
             f"{args.new_tokens} new tokens (prompt ~{args.prompt}), {args.threads} worker threads, "
             f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before",
             f"tokens/s {summary['tokens_per_s']:.1f}; TTFT p50 {summary['ttft_p50_s']:.2f} s, p99 "
             f"{summary['ttft_p99_s']:.2f} s; inter-token p50 {itl_ms:.0f} ms (p90 "
             f"{1e3 * summary['inter_token_p90_s']:.0f}, p99 {1e3 * summary['inter_token_p99_s']:.0f})",
             f"CPU s: controller {cpu['controller']['total_s']:.1f} "
             f"({doc['controller_cpu_ms_per_token']:.2f} ms per generated token), worker "
             f"{cpu['worker']['total_s']:.1f}, client {cpu['client (this process)']['total_s']:.1f}; wall "
             f"{summary['wall_s']:.1f} s",
             "controller threads (CPU s): " + ", ".join(f"{n} {s:.1f}" for n, s in
                                                      list(cpu["controller"]["threads_s"].items())[:6])]
    for b, ms in step.items():
        lines.append(f"in-process batch {b} step {ms:.0f} ms: server inter-token p50 / step = {itl_ms / ms:.2f}x")
    for role in profiles:
        lines += table(role, profiles[role], cpu[role]["total_s"])
    if profiles:
        add_breakdown(doc)
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
