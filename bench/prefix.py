"""Prefix caching: requests sharing a long system prompt, TTFT and throughput with the cache on and off.

    python -m bench.prefix [--requests 32] [--system 970] [--question 30] [--new 16] [--out JSON]

All requests arrive at once through the in-process engine (greedy, exactly --new tokens each): one
~1,000-token system prompt shared by all, each followed by its own ~30-token question. The same engine
and weights run the workload with prefix caching off, then on (cold cache: the first request pays for
the system prompt, the others reuse its blocks). Reports TTFT p50 / p99 (arrival to first token),
generated tokens/s, prompt tokens prefilled and the cache's hit tokens; writes JSON (bench/results/).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from bench import models


def make_workload(n: int, system: int, question: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    head = [1] + [rng.randrange(3, vocab) for _ in range(system - 1)]
    return [head + [rng.randrange(3, vocab) for _ in range(question)] for _ in range(n)]


def run(engine, prompts: list[list[int]], new: int, caching: bool, tag: str) -> dict:
    from worker.engine.sequence import Sampling

    bm = engine.blocks
    bm.prefix_caching = caching
    if not caching:  # forget every hash, so nothing cached before is reused
        for b in range(bm.num_blocks):
            bm._forget(b)
        bm.free.extend(bm.cached)
        bm.cached.clear()
    q0, h0, p0 = bm.queries, bm.hits, engine.stats.steps_total
    first: dict[int, float] = {}
    done: list[int] = []
    generated = [0]

    def emit(toks, lps, fin, err, i):
        first.setdefault(i, time.perf_counter())
        generated[0] += len(toks)
        if fin is not None:
            done.append(i)

    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add(engine.new_sequence(f"{tag}-{i}", p, Sampling(max_new_tokens=new),
                                       emit=lambda t, lp, fin, err, i=i: emit(t, lp, fin, err, i)))
    while len(done) < len(prompts):
        engine.step()
    wall = time.perf_counter() - t0
    ttft = sorted(first[i] - t0 for i in first)
    queried, hits = bm.queries - q0, bm.hits - h0
    return {"prefix_caching": caching, "steps": engine.stats.steps_total - p0, "wall_s": wall,
            "generated_tokens": generated[0], "tokens_per_s": generated[0] / wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "prompt_tokens": queried, "cache_hit_tokens": hits, "prefilled_tokens": queried - hits}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--system", type=int, default=970, help="shared system-prompt tokens (with the question and the "
                   "new tokens within the model's 1,024 positions)")
    p.add_argument("--question", type=int, default=30, help="tokens of each request's own question")
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-mb", type=int, default=4096)
    p.add_argument("--model", default="llama-300m", choices=list(models.BY_NAME))
    p.add_argument("--cache-dir", default="")
    p.add_argument("--out", default="", help="JSON path ('' = none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir or Path.home() / ".cache" / "shardserve" / "bench")
    cache.mkdir(parents=True, exist_ok=True)
    model_dir = models.by_name(args.model, cache)
    cfg = json.loads((model_dir / "config.json").read_text())
    from worker.engine.build import build_engine
    from worker.engine.engine import EngineConfig

    length = args.system + args.question + args.new
    if length > cfg["max_position_embeddings"]:
        raise SystemExit(f"--system + --question + --new = {length} exceeds the model's "
                         f"{cfg['max_position_embeddings']} positions")
    engine = build_engine(EngineConfig(model_dir=model_dir, max_batch_size=args.requests,
                                       max_model_len=min(length + 8, cfg["max_position_embeddings"]),
                                       kv_cache_bytes=args.kv_cache_mb << 20))
    prompts = make_workload(args.requests, args.system, args.question, cfg["vocab_size"])
    run(engine, [q[-40:] for q in prompts[:2]], 2, False, "warm")  # warm-up, nothing shared
    print(f"{args.requests} requests, shared system prompt {args.system} + question {args.question} tokens, "
          f"{args.new} new tokens, {args.model} fp32, {args.threads} threads")
    print(f"{'caching':>8} {'steps':>6} {'wall s':>7} {'tok/s':>7} {'TTFT p50 s':>11} {'TTFT p99 s':>11}"
          f" {'prefilled':>10} {'hit tok':>8}")
    rows = []
    for caching in (False, True):
        r = run(engine, prompts, args.new, caching, "on" if caching else "off")
        rows.append(r)
        print(f"{'on' if caching else 'off':>8} {r['steps']:>6} {r['wall_s']:>7.1f} {r['tokens_per_s']:>7.2f}"
              f" {r['ttft_p50_s']:>11.2f} {r['ttft_p99_s']:>11.2f} {r['prefilled_tokens']:>10} "
              f"{r['cache_hit_tokens']:>8}", flush=True)
    off, on = rows
    ratio = {"ttft_p50_off_over_on": off["ttft_p50_s"] / on["ttft_p50_s"],
             "tokens_per_s_on_over_off": on["tokens_per_s"] / off["tokens_per_s"]}
    print(f"TTFT p50 {ratio['ttft_p50_off_over_on']:.1f}x lower with caching, "
          f"tokens/s {ratio['tokens_per_s_on_over_off']:.1f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "ratios": ratio}, indent=1) + "\n")


if __name__ == "__main__":
    main()
