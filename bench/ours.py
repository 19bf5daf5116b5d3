"""shardserve measured as users see it: `shardserve serve` as a subprocess, N concurrent gRPC
GenerateStream clients all sent at t=0; TTFT = first streamed token, latency = last token,
inter-token = the gap between consecutive streamed tokens of one stream (pooled over streams)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.workload import Result, Workload, make_result, median_round, percentile

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MAX_MODEL_LEN = 1024  # passed to the server: the KV cache must hold one sequence of it


def kv_cache_mb(model_dir: Path, work: Workload, block_size: int = 16) -> int:
    """MiB of KV cache that hold every stream's whole sequence (prompt + new tokens) at once, so the
    benchmark measures serving, not preemption."""
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim * 4
    blocks = work.streams * (-(-(work.prompt_tokens + work.new_tokens + 1) // block_size) + 1)
    blocks = max(blocks, -(-MAX_MODEL_LEN // block_size))  # the worker refuses a cache below one sequence
    return max(64, -(-blocks * block_size * per_token // (1 << 20)))


class Server:
    def __init__(self, model_dir: Path, cache: Path, max_batch_size: int, log_path: Path, threads: int,
                 extra: list[str] = (), root: Path = ROOT):
        self.port, self.http_port = _free_port(), _free_port()
        self.log = open(log_path, "w")
        self.log_path = log_path
        cmd = [sys.executable, "-m", "controller.cli", "serve", "--model", str(model_dir), "--name", "bench",
               "--port", str(self.port), "--http-port", str(self.http_port), "--cache-dir", str(cache),
               "--max-batch-size", str(max_batch_size), "--max-queued-requests", "1024", "--threads", str(threads),
               *extra]
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(root)})
        deadline = time.monotonic() + 600
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"shardserve did not start; see {log_path}")
            time.sleep(0.3)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def worker_pids(self) -> list[int]:
        """The controller's child processes (the worker ranks)."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(d.name))
        return sorted(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds (/proc/PID/stat fields 14 and 15)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Streams:
    """What N concurrent streams saw: seconds from t=0 of every streamed token, per stream."""

    times: list[list[float]]

    @property
    def wall_s(self) -> float:
        return max(t[-1] for t in self.times if t)

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.times)

    @property
    def ttfts(self) -> list[float]:
        return [t[0] for t in self.times if t]

    @property
    def gaps(self) -> list[float]:
        return [b - a for t in self.times for a, b in zip(t, t[1:])]

    def summary(self) -> dict:
        gaps = self.gaps
        return {"streams": len(self.times), "tokens": self.tokens, "wall_s": self.wall_s,
                "tokens_per_s": self.tokens / self.wall_s,
                "ttft_p50_s": percentile(self.ttfts, 50), "ttft_p99_s": percentile(self.ttfts, 99),
                "inter_token_p50_s": percentile(gaps, 50) if gaps else 0.0,
                "inter_token_p90_s": percentile(gaps, 90) if gaps else 0.0,
                "inter_token_p99_s": percentile(gaps, 99) if gaps else 0.0}


def drive(channel, prompts, new_tokens: int) -> Streams:
    """One GenerateStream per prompt, all released at t=0 (a barrier); exactly `new_tokens` each."""
    from shardserve.v1 import generate_pb2 as gpb
    from shardserve.v1 import generate_pb2_grpc as gpb_grpc

    # the client's own 32 blocked iterators would otherwise wake 10x a second each (see controller/serve.py)
    grpc._common.MAXIMUM_WAIT_TIMEOUT = max(grpc._common.MAXIMUM_WAIT_TIMEOUT, 2.0)
    stub = gpb_grpc.GenerationStub(channel)
    params = gpb.GenerationParameters(max_new_tokens=new_tokens, ignore_eos=True)
    times: list[list[float]] = [[] for _ in prompts]
    start = threading.Barrier(len(prompts) + 1)
    t0 = [0.0]

    def client(i):
        start.wait()
        for _msg in stub.GenerateStream(gpb.GenerateStreamRequest(prompt=prompts[i][0], parameters=params)):
            times[i].append(time.perf_counter() - t0[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    t0[0] = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    counts = [len(t) for t in times]
    if counts != [new_tokens] * len(prompts):
        raise RuntimeError(f"expected {new_tokens} tokens per stream, got {counts}")
    return Streams(times)


def warm(channel, prompt: str) -> None:
    from shardserve.v1 import generate_pb2 as gpb
    from shardserve.v1 import generate_pb2_grpc as gpb_grpc

    stub = gpb_grpc.GenerationStub(channel)
    list(stub.GenerateStream(gpb.GenerateStreamRequest(prompt=prompt, parameters=gpb.GenerationParameters(
        max_new_tokens=4))))


# a busy shared machine can take minutes over the first prefill steps; the default watchdog (120 s) would
# call that a hung worker
WATCHDOG = ["--step-watchdog", "1800"]


def run(model_dir: Path, model_name: str, work: Workload, rounds, cache: Path, threads: int,
        quantize: str | None = None) -> Result:
    """`rounds`: prompt sets, one timed drive each (bench.workload.round_prompts); the median round."""
    extra = ["--kv-cache-mb", str(kv_cache_mb(model_dir, work)), "--max-model-len", str(MAX_MODEL_LEN), *WATCHDOG]
    if quantize:
        extra += ["--quantize", quantize]
    server = Server(model_dir, cache, max_batch_size=max(work.streams, 1), log_path=cache / "bench-server.log",
                    threads=threads, extra=extra)
    try:
        warm(server.channel, rounds[0][0][0])
        pids = {"controller": server.proc.pid, "worker": server.worker_pids()[0]}
        results = []
        for prompts in rounds:
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            s = drive(server.channel, prompts, work.new_tokens)
            cpu = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
            lat = [t[-1] for t in s.times]
            scenario = f"{len(prompts)} concurrent streams" + (f" {quantize}" if quantize else "")
            r = make_result("shardserve", model_name, scenario, s.wall_s, s.tokens, s.ttfts, lat,
                            note=f"controller CPU {1e3 * cpu['controller'] / s.tokens:.2f} ms/token, worker CPU "
                                 f"{1e3 * cpu['worker'] / s.tokens:.1f} ms/token")
            summ = s.summary()
            r.ttft_p99_s, r.inter_token_p50_s = summ["ttft_p99_s"], summ["inter_token_p50_s"]
            results.append(r)
        return median_round(results)
    finally:
        server.stop()
