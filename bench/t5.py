"""The seed's own metric on a Flan-T5-like model (bench/models.py: 6+6 layers, d_model 512, random
weights): one request of 4 prompts of different tasks and lengths, 32 new tokens (greedy, eos
ignored), latency p50/p90/p99 over --rounds, side by side in one run:

  ours tp=1     `shardserve serve` (a subprocess on free loopback ports), one gRPC Generate of the 4
  ours tp=2     the same server at --tp 2 (the cores split between the two ranks)
  ctranslate2   Translator.translate_batch of the same 4 token sequences on the same weights
                (converted with bench/ct2.convert), float32, the same thread count

Rounds are interleaved (one of each system per round), so load from elsewhere on the machine falls
on all of them alike. Also times the in-process engine (no server): the CPU time of one decode step
of the 4 (`engine_step_cpu_ms`, robust to other load) and its wall time.

    python -m bench.t5 [--rounds 100] [--threads 2] [--no-tp2] [--out bench/results/cpu-t5.json]

Goals (issue 16): ours tp=1 p50 <= 1.0x CTranslate2's p50; p99 <= 1.2x our p50; tp=2 the same
against our tp=1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench import ct2, models
from bench.ours import Server

PROMPTS = [
    "translate English to German: The house is wonderful and the garden is full of flowers in spring.",
    "summarize: The licence grants every recipient the right to copy, modify and distribute the program, "
    "provided that the notice stays with every copy and the source is offered to whoever receives it.",
    "question: who may distribute the program? context: anyone who keeps the notice with it.",
    "cola sentence: the books is on the table.",
]
NEW_TOKENS = 32


def percentiles(xs: list[float]) -> dict:
    s = sorted(xs)
    at = lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))]  # noqa: E731
    return {"p50_ms": 1e3 * at(0.5), "p90_ms": 1e3 * at(0.9), "p99_ms": 1e3 * at(0.99),
            "mean_ms": 1e3 * statistics.fmean(s), "rounds": len(s)}


class OurServer:
    """One Generate of every prompt per round through the real server."""

    def __init__(self, model_dir: Path, cache: Path, tp: int, threads: int, tree: Path | None = None):
        self.name = f"shardserve tp={tp}" + (f" ({tree})" if tree else "")
        kw = {"root": tree} if tree else {}
        self.server = Server(model_dir.resolve(), cache, max_batch_size=8,
                             log_path=cache / f"bench-t5-tp{tp}{'-other' if tree else ''}.log", threads=threads,
                             extra=["--tp", str(tp)] if tp > 1 else [], **kw)
        from shardserve.v1 import generate_pb2 as gpb
        from shardserve.v1 import generate_pb2_grpc as gpb_grpc

        self.stub = gpb_grpc.GenerationStub(self.server.channel)
        self.request = gpb.GenerateRequest(prompts=PROMPTS, parameters=gpb.GenerationParameters(
            max_new_tokens=NEW_TOKENS, ignore_eos=True))

    def round(self) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        resp = self.stub.Generate(self.request, timeout=600)
        wall = time.perf_counter() - t0
        return wall, [list(o.token_ids) for o in resp.outputs]

    def stop(self) -> None:
        self.server.stop()


class CT2Translator:
    name = "ctranslate2 translate_batch fp32"

    def __init__(self, ct2_dir: Path, tokens: list[list[str]], threads: int):
        import ctranslate2

        self.tr = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=threads,
                                         inter_threads=1)
        self.tokens = tokens

    def round(self) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        res = self.tr.translate_batch(self.tokens, beam_size=1, max_decoding_length=NEW_TOKENS,
                                      min_decoding_length=NEW_TOKENS, max_batch_size=len(self.tokens),
                                      return_scores=False)
        wall = time.perf_counter() - t0
        return wall, [list(r.hypotheses[0]) for r in res]

    def stop(self) -> None:
        del self.tr


def engine_steps(model_dir: Path, ids: list[list[int]], threads: int, rounds: int) -> dict:
    """In-process engine: CPU and wall ms of one decode step of the 4 (median over the steps of `rounds`
    after one warm-up round)."""
    import torch

    from worker.engine.build import build_engine
    from worker.engine.engine import EngineConfig
    from worker.engine.sequence import Sampling

    torch.set_num_threads(threads)
    engine = build_engine(EngineConfig(model_dir=model_dir, max_batch_size=8))
    cpu, wall = [], []
    for r in range(rounds + 1):
        done = []
        for i, p in enumerate(ids):
            engine.add(engine.new_sequence(f"e{r}-{i}", p, Sampling(max_new_tokens=NEW_TOKENS),
                                           emit=lambda t, lp, fin, err, done=done: done.append(err) if fin else None))
        first = True
        while len(done) < len(ids):
            c0, w0 = time.process_time(), time.perf_counter()
            engine.step()
            if r and not first:  # round 0 warms up; a request's first step runs its encoder
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
            first = False
    return {"engine_step_cpu_ms": 1e3 * statistics.median(cpu), "engine_step_wall_ms": 1e3 * statistics.median(wall),
            "threads": threads}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for every system (0 = all cores)")
    p.add_argument("--no-tp2", action="store_true", help="skip the tp=2 server")
    p.add_argument("--engine-rounds", type=int, default=2, help="in-process engine rounds timed (0: skip)")
    p.add_argument("--engine-threads", type=int, default=1,
                   help="threads of the in-process engine timing (1: its CPU time is not inflated by thread spin)")
    p.add_argument("--also-tree", default=None,
                   help="also serve from this checkout (e.g. the main branch), tp=1, for before/after in one run")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="bench/results/cpu-t5.json")
    args = p.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    cache = (Path(args.cache_dir).expanduser() if args.cache_dir else Path.home() / ".cache" / "shardserve" / "bench").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    model_dir = models.flan_t5_like(cache)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = [tok(t)["input_ids"] for t in PROMPTS]
    load_before = os.getloadavg()[0]
    t_start = time.monotonic()
    engine = engine_steps(model_dir, ids, args.engine_threads, args.engine_rounds) if args.engine_rounds else {}
    systems = [CT2Translator(ct2.convert(model_dir, cache), [tok.convert_ids_to_tokens(i) for i in ids], threads),
               OurServer(model_dir, cache, 1, threads)]
    if not args.no_tp2:
        systems.append(OurServer(model_dir, cache, 2, threads))
    if args.also_tree:
        systems.append(OurServer(model_dir, cache, 1, threads, Path(args.also_tree)))
    try:
        outputs = {}
        for s in systems:  # warm-up, and each system's tokens
            for _ in range(2):
                _, outputs[s.name] = s.round()
        times = {s.name: [] for s in systems}
        for _ in range(args.rounds):
            for s in systems:
                times[s.name].append(s.round()[0])
    finally:
        for s in systems:
            s.stop()
    ct2_tokens = [tok.convert_tokens_to_ids(t) for t in outputs[systems[0].name]]
    rows = []
    for s in systems:
        r = {"system": s.name, **percentiles(times[s.name])}
        r["p99_over_p50"] = r["p99_ms"] / r["p50_ms"]
        r["same_tokens_as_ct2"] = sum(a == b for a, b in zip(
            outputs[s.name] if s is not systems[0] else ct2_tokens, ct2_tokens))
        rows.append(r)
    by = {r["system"]: r for r in rows}
    ours1, theirs = by["shardserve tp=1"], by[systems[0].name]
    ratios = {"tp1_p50_over_ct2_p50": ours1["p50_ms"] / theirs["p50_ms"], "tp1_p99_over_p50": ours1["p99_over_p50"]}
    if "shardserve tp=2" in by:
        ratios["tp2_p50_over_tp1_p50"] = by["shardserve tp=2"]["p50_ms"] / ours1["p50_ms"]
        ratios["tp2_p99_over_p50"] = by["shardserve tp=2"]["p99_over_p50"]
    lines = [f"{'system':44} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'p99/p50':>8} {'= ct2 tokens':>12}"]
    for r in rows:
        lines.append(f"{r['system']:44} {r['p50_ms']:9.1f} {r['p90_ms']:9.1f} {r['p99_ms']:9.1f} "
                     f"{r['p99_over_p50']:8.2f} {r['same_tokens_as_ct2']:>10}/4")
    lines.append("  ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if engine:
        lines.append(f"in-process engine, one decode step of the 4 ({engine['threads']} thread): "
                     f"{engine['engine_step_cpu_ms']:.1f} ms CPU, {engine['engine_step_wall_ms']:.1f} ms wall")
    lines.append(f"[{args.rounds} rounds, prompts of {[len(i) for i in ids]} tokens, {NEW_TOKENS} new; "
                 f"{os.cpu_count()} cores, {threads} threads per system; load average {load_before:.1f} before, "
                 f"{os.getloadavg()[0]:.1f} after; {time.monotonic() - t_start:.0f}s]")
    print("\n".join(lines))
    doc = {"results": rows, "ratios": ratios, "engine": engine, "prompt_tokens": [len(i) for i in ids],
           "new_tokens": NEW_TOKENS, "threads": threads, "cores": os.cpu_count(),
           "load_average": [load_before, os.getloadavg()[0]]}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
