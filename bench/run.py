"""`shardserve bench`: shardserve against transformers and CTranslate2, side by side, one run,
same weights and token ids. Prints a table (stderr with --json), writes JSON (--out).

Full: 32 concurrent streams, prompt 128, 128 new tokens, on the demo model and a ~300M Llama.
--quick: the demo model only, 8 streams, prompt 64, 32 new tokens, 5 rounds per system, each on prompts
of its own, the median round reported (a round takes ~0.2 s: one alone is noise); under 3 minutes on 2 cores.
--rounds N sets the rounds of either mode.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

from bench import ct2, hf, models, ours
from bench.workload import Result, Workload, format_table, round_prompts

log = logging.getLogger("shardserve.bench")


def headline(results: list[Result]) -> list[str]:
    lines = []
    for model in dict.fromkeys(r.model for r in results):
        mine = [r for r in results if r.model == model and r.system == "shardserve"]
        for me in mine:
            for ref in (r for r in results if r.model == model and r.system != "shardserve"):
                lines.append(f"{model}: shardserve {me.scenario} / {ref.system} {ref.scenario}: "
                             f"{me.tokens_per_s / ref.tokens_per_s:.2f}x tokens/s")
    return lines


def bench_model(name: str, model_dir: Path, work: Workload, cache: Path, seq_limit: int | None,
                systems: set[str], threads: int, quantize: tuple[str, ...] = (), out=None,
                saved=lambda: None) -> list[Result]:
    """Every system on one model; `out` (a list) gets each result as it comes and `saved()` is called
    after each (a long run cut short keeps what it measured)."""
    rounds = round_prompts(model_dir, work)
    ps = rounds[0]
    out = [] if out is None else out

    def add(r: Result) -> None:
        out.append(r)
        log.info("%s", r)
        saved()

    log.info("%s: %d prompts of %.0f tokens, %d new tokens each", name, len(ps),
             sum(len(p[1]) for p in ps) / len(ps), work.new_tokens)
    # pairs first (CTranslate2 float32 / shardserve fp32, then int8 / int8): a run cut short keeps comparisons
    ct2_dir = ct2.convert(model_dir, cache) if "ctranslate2" in systems else None
    for compute, q in (("float32", None), ("int8", "int8")):
        if ct2_dir is not None:
            add(ct2.run(ct2_dir, model_dir, name, work, rounds, compute, threads=threads))
        if "shardserve" in systems and (q is None or q in quantize):
            add(ours.run(model_dir, name, work, rounds, cache, threads, quantize=q))
    if "shardserve" in systems:
        for q in (q for q in quantize if q != "int8"):
            add(ours.run(model_dir, name, work, rounds, cache, threads, quantize=q))
    if "transformers" in systems:
        import torch

        torch.set_num_threads(threads)
        model = hf.load(model_dir)
        if seq_limit is None or seq_limit >= 0:  # negative: no one-at-a-time row
            add(hf.run(model, name, work, rounds, batch_size=1, limit=seq_limit or None))
        add(hf.run(model, name, work, rounds, batch_size=8))
        del model
        gc.collect()
    return out


def in_process_steps(name: str, work: Workload, threads: int, quantize: tuple[str, ...]) -> list[dict]:
    """The same engine in-process (bench.decode, fresh process, same threads) at batch 1 and batch
    `work.streams`, at the server run's mean context: the floor for the server's inter-token gap."""
    from types import SimpleNamespace

    from bench.profile import in_process

    rows = []
    for q in [None, *quantize]:
        args = SimpleNamespace(threads=threads, quantize=q or "", model=name, cache=None)
        rows += [{"model": name, "weights": q or "fp32", **r} for r in in_process(args, work)]
    return rows


def overhead_lines(results: list[Result], steps: list[dict], streams: int) -> list[str]:
    lines = []
    for r in results:
        if r.system != "shardserve" or not r.inter_token_p50_s:
            continue
        weights = r.scenario.rsplit(" ", 1)[-1] if r.scenario.endswith(("int8", "int4", "w8a8")) else "fp32"
        for s in steps:
            if s["model"] == r.model and s["weights"] == weights and s["batch"] == streams:
                lines.append(f"{r.model} {weights}: server inter-token p50 {1e3 * r.inter_token_p50_s:.0f} ms / "
                             f"in-process batch-{streams} step {s['ms_per_step']:.0f} ms = "
                             f"{1e3 * r.inter_token_p50_s / s['ms_per_step']:.2f}x")
    return lines


def main(args) -> int:
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else Path.home() / ".cache" / "shardserve" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    systems = set(args.systems.split(","))
    if args.quick:
        work, names, seq_limit = Workload(streams=8, prompt_tokens=64, new_tokens=32, rounds=5), ["demo"], None
    else:
        work, names, seq_limit = Workload(), ["demo", "llama-300m"], None
    if args.models:
        names = args.models.split(",")
    if getattr(args, "streams", 0):
        work = dataclasses.replace(work, streams=args.streams)
    if getattr(args, "rounds", 0):
        work = dataclasses.replace(work, rounds=args.rounds)
    threads = args.threads or os.cpu_count() or 1
    quantize = tuple(q for q in (getattr(args, "quantize", "") or "").split(",") if q)
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    results: list[Result] = []

    def save() -> None:  # what is measured so far
        if args.out:
            Path(args.out).write_text(json.dumps({"results": [r.public() for r in results], "partial": True},
                                                 indent=1) + "\n")
    for name in names:
        model_dir = models.demo(cache) if name == "demo" else models.llama_300m(cache)
        limit = seq_limit if name == "demo" else (args.sequential_limit or None)
        bench_model(name, model_dir, work, cache, limit, systems, threads, quantize, out=results, saved=save)
    steps = []
    if getattr(args, "in_process", False):
        for name in names:
            steps += in_process_steps(name, work, threads, quantize)
    table = format_table(results) + "\n" + "\n".join(headline(results) + overhead_lines(results, steps, work.streams))
    table += (f"\n[{'quick' if args.quick else 'full'}: {work.streams} streams, prompt ~{work.prompt_tokens}, "
              f"{work.new_tokens} new tokens, median of {work.rounds} round(s); {os.cpu_count()} CPU cores, "
              f"{threads} threads per system; "
              f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; {time.monotonic() - t0:.0f}s]")
    doc = {"results": [r.public() for r in results], "in_process_steps": steps, "threads": threads,
           "load_average": [load_before, os.getloadavg()[0]],
           "workload": {"streams": work.streams, "prompt_tokens": work.prompt_tokens, "new_tokens": work.new_tokens,
                        "rounds": work.rounds, "quick": bool(args.quick)}}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps({"results": doc["results"]}))
    else:
        print(table)
    return 0
