"""HTTP's overhead against gRPC on the same server, side by side in one run (`python -m bench.http_overhead`).

One `shardserve serve` on the demo model (batch 32); N concurrent clients (threads, default 32), each
with its own connection, all started together, in alternating rounds so load drifts hit both doors:
- per request: unary requests of one new token each (gRPC Generate vs OpenAI /v1/completions vs SageMaker
  /invocations); overhead = the door's mean latency minus gRPC's;
- per streamed token: one stream of T new tokens per client (gRPC GenerateStream vs OpenAI SSE
  /v1/completions vs SageMaker jsonlines); per-token time = wall / tokens delivered, overhead = minus gRPC's.
Greedy, eos ignored, the same prompt everywhere. Clients run on the same CPUs as the server, so the
client side's own cost is inside every figure (equally for each door's Python client).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.ours import Server
from controller.acquire.demo_model import demo_model_path
from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc

PROMPT = "Licensed under the Apache License"


def _together(n: int, fn) -> tuple[float, list]:
    """Run fn(i) in n threads released at once; (wall seconds, results)."""
    barrier = threading.Barrier(n + 1)
    out: list = [None] * n

    def run(i):
        barrier.wait()
        out[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


class Doors:
    def __init__(self, server: Server, n: int):
        self.stub = gpb_grpc.GenerationStub(server.channel)
        self.port = server.http_port
        self.conns = [http.client.HTTPConnection("127.0.0.1", self.port, timeout=600) for _ in range(n)]

    def _post(self, i: int, path: str, body: dict, headers=None):
        for attempt in (0, 1):  # uvicorn closes a keep-alive connection idle for 5 s: reconnect once
            conn = self.conns[i]
            try:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
                return conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionError):
                conn.close()
                if attempt:
                    raise

    # one request, one new token: seconds
    def grpc_unary(self, i: int) -> float:
        t = time.perf_counter()
        self.stub.Generate(gpb.GenerateRequest(prompts=[PROMPT], parameters=gpb.GenerationParameters(
            max_new_tokens=1, ignore_eos=True)))
        return time.perf_counter() - t

    def openai_unary(self, i: int) -> float:
        t = time.perf_counter()
        r = self._post(i, "/v1/completions", {"model": "bench", "prompt": PROMPT, "max_tokens": 1, "temperature": 0,
                                              "ignore_eos": True})
        assert r.status == 200, r.read()
        r.read()
        return time.perf_counter() - t

    def sagemaker_unary(self, i: int) -> float:
        t = time.perf_counter()
        r = self._post(i, "/invocations", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1, "ignore_eos": True}})
        assert r.status == 200, r.read()
        r.read()
        return time.perf_counter() - t

    # one stream of `tokens` new tokens: tokens received
    def grpc_stream(self, tokens: int):
        def go(i: int) -> int:
            req = gpb.GenerateStreamRequest(prompt=PROMPT, parameters=gpb.GenerationParameters(
                max_new_tokens=tokens, ignore_eos=True))
            return sum(1 for _ in self.stub.GenerateStream(req))
        return go

    def openai_stream(self, tokens: int):
        def go(i: int) -> int:
            r = self._post(i, "/v1/completions", {"model": "bench", "prompt": PROMPT, "max_tokens": tokens,
                                                  "temperature": 0, "ignore_eos": True, "stream": True,
                                                  "stream_options": {"include_usage": True}})
            usage = 0
            for line in r:
                if line.startswith(b"data: {") and b'"usage": {' in line:
                    usage = json.loads(line[6:])["usage"]["completion_tokens"]
            return usage
        return go

    def sagemaker_stream(self, tokens: int):
        def go(i: int) -> int:
            r = self._post(i, "/invocations", {"inputs": PROMPT, "parameters": {"max_new_tokens": tokens,
                                                                                "ignore_eos": True}},
                           {"Accept": "application/jsonlines"})
            return sum(1 for line in r if line.strip())
        return go


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per stream")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per door (medians reported)")
    ap.add_argument("--unary", type=int, default=4, help="unary requests per client per round")
    ap.add_argument("--threads", type=int, default=2, help="engine threads of the worker")
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    model = demo_model_path(work / "cache")
    server = Server(model, work / "cache", max_batch_size=args.streams, log_path=work / "server.log",
                    threads=args.threads)
    n = args.streams
    try:
        doors = Doors(server, n)
        for fn in (doors.grpc_unary, doors.openai_unary, doors.sagemaker_unary):  # warm every path and connection
            _together(n, fn)
        unary: dict[str, list[float]] = {"grpc": [], "openai": [], "sagemaker": []}
        stream: dict[str, list[float]] = {"grpc": [], "openai": [], "sagemaker": []}
        for _ in range(args.rounds):
            for name in unary:
                fn = getattr(doors, f"{name}_unary")
                _, lat = _together(n, lambda i, fn=fn: [fn(i) for _ in range(args.unary)])
                unary[name].append(statistics.mean(x for per in lat for x in per))
            for name in stream:
                wall, got = _together(n, getattr(doors, f"{name}_stream")(args.tokens))
                assert all(g == args.tokens for g in got), (name, got)
                stream[name].append(wall / (n * args.tokens))
    finally:
        server.stop()

    rows = []
    g_req, g_tok = statistics.median(unary["grpc"]), statistics.median(stream["grpc"])
    for name in ("grpc", "openai", "sagemaker"):
        req, tok = statistics.median(unary[name]), statistics.median(stream[name])
        rows.append({"door": name, "unary_latency_ms": req * 1e3, "unary_overhead_ms": (req - g_req) * 1e3,
                     "unary_ratio": req / g_req, "stream_us_per_token": tok * 1e6,
                     "stream_overhead_us_per_token": (tok - g_tok) * 1e6, "stream_ratio": tok / g_tok,
                     "unary_rounds_ms": [x * 1e3 for x in unary[name]],
                     "stream_rounds_us_per_token": [x * 1e6 for x in stream[name]]})
    print(f"{n} concurrent clients; unary = 1 new token per request ({args.unary} per client per round); "
          f"streams = {args.tokens} tokens each; medians of {args.rounds} alternating rounds")
    print("| door | unary latency ms | vs gRPC | stream us/token (wall / tokens) | vs gRPC |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['door']} | {r['unary_latency_ms']:.1f} | {r['unary_overhead_ms']:+.1f} ms "
              f"({r['unary_ratio']:.2f}x) | {r['stream_us_per_token']:.0f} | "
              f"{r['stream_overhead_us_per_token']:+.0f} us ({r['stream_ratio']:.2f}x) |")
    if args.out:
        Path(args.out).write_text(json.dumps({"streams": n, "tokens": args.tokens, "rounds": args.rounds,
                                              "unary_per_client": args.unary, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
