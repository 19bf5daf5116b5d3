"""shardserve measured as users see it: `shardserve serve` as a subprocess, N concurrent gRPC
GenerateStream clients all sent at t=0; TTFT = first streamed token, latency = last token."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc

from bench.workload import Result, Workload, make_result

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, cache: Path, max_batch_size: int, log_path: Path, threads: int,
                 extra: list[str] = (), root: Path = ROOT):
        self.port, self.http_port = _free_port(), _free_port()
        self.log = open(log_path, "w")
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

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def run(model_dir: Path, model_name: str, work: Workload, prompts, cache: Path, threads: int) -> Result:
    from shardserve.v1 import generate_pb2 as gpb
    from shardserve.v1 import generate_pb2_grpc as gpb_grpc

    server = Server(model_dir, cache, max_batch_size=max(work.streams, 1), log_path=cache / "bench-server.log",
                    threads=threads)
    try:
        stub = gpb_grpc.GenerationStub(server.channel)
        params = gpb.GenerationParameters(max_new_tokens=work.new_tokens, ignore_eos=True)
        warm = gpb.GenerateStreamRequest(prompt=prompts[0][0], parameters=gpb.GenerationParameters(max_new_tokens=4))
        list(stub.GenerateStream(warm))
        ttft, lat, counts = [0.0] * len(prompts), [0.0] * len(prompts), [0] * len(prompts)
        start = threading.Barrier(len(prompts) + 1)
        t0 = [0.0]

        def client(i):
            start.wait()
            for _msg in stub.GenerateStream(gpb.GenerateStreamRequest(prompt=prompts[i][0], parameters=params)):
                now = time.perf_counter() - t0[0]
                if counts[i] == 0:
                    ttft[i] = now
                counts[i] += 1
            lat[i] = time.perf_counter() - t0[0]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        t0[0] = time.perf_counter()
        start.wait()
        for t in threads:
            t.join()
        wall = max(lat)
        assert all(c == work.new_tokens for c in counts), counts
        return make_result("shardserve", model_name, f"{len(prompts)} concurrent streams", wall, sum(counts),
                           ttft, lat)
    finally:
        server.stop()
