"""Many streams through the in-process engine: time to first token and throughput per prefill budget.

    python -m bench.streams [--streams 32] [--prompt 128] [--new 128] [--budgets 4096,512,256,128]

All streams arrive at once (greedy, no EOS, exactly --new tokens each), as in the 32-stream server
bench. For each prefill budget (worker.engine.scheduler: prompt tokens per step after the decodes;
a budget >= streams x prompt prefills everything before any decode, the old behaviour) it reports
TTFT p50 / p99 (from the arrival to the first token), inter-token p50 (between a stream's tokens),
total tokens/s and steps. Same engine, same weights, one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench import models
from bench.decode import make_prompts


def run(engine, prompts: list[list[int]], new: int, budget: int) -> dict:
    from worker.engine.sequence import Sampling

    engine.scheduler.prefill_budget = budget
    first: dict[int, float] = {}
    gaps: list[float] = []
    last: dict[int, float] = {}
    done: list[int] = []

    def emit(toks, lps, fin, err, i):
        now = time.perf_counter()
        if i in last:
            gaps.append(now - last[i])
        else:
            first[i] = now
        last[i] = now
        if fin is not None:
            done.append(i)

    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add(engine.new_sequence(f"s{budget}-{i}", p, Sampling(max_new_tokens=new),
                                       emit=lambda t, lp, fin, err, i=i: emit(t, lp, fin, err, i)))
    steps = 0
    while len(done) < len(prompts):
        engine.step()
        steps += 1
    wall = time.perf_counter() - t0
    ttft = sorted(first[i] - t0 for i in first)
    return {"budget": budget, "steps": steps, "wall_s": wall, "tokens_per_s": len(prompts) * new / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "itl_p50_ms": 1e3 * statistics.median(gaps) if gaps else 0.0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--budgets", default="4096,512,256,128")
    p.add_argument("--threads", type=int, default=2)
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

    engine = build_engine(EngineConfig(model_dir=model_dir, max_batch_size=args.streams,
                                       max_batch_tokens=max(2048, args.streams * args.prompt),
                                       max_model_len=args.prompt + args.new + 16,
                                       kv_cache_bytes=4 << 30))
    budgets = [int(x) for x in args.budgets.split(",")]
    # distinct prompts for the warm-up and for every budget's run: the prefix cache must not serve a
    # later run the prompts of an earlier one
    n = args.streams
    blocks = make_prompts(n * (len(budgets) + 1), args.prompt, cfg["vocab_size"])
    run(engine, blocks[:2], 2, 256)  # warm-up
    rows = []
    print(f"{args.streams} streams, prompt {args.prompt}, {args.new} new tokens, {args.model} fp32")
    print(f"{'budget':>7} {'steps':>6} {'tok/s':>7} {'TTFT p50 s':>11} {'TTFT p99 s':>11} {'ITL p50 ms':>11}")
    for k, b in enumerate(budgets, start=1):
        r = run(engine, blocks[k * n:(k + 1) * n], args.new, b)
        rows.append(r)
        print(f"{b:>7} {r['steps']:>6} {r['tokens_per_s']:>7.1f} {r['ttft_p50_s']:>11.2f} {r['ttft_p99_s']:>11.2f}"
              f" {r['itl_p50_ms']:>11.1f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
