"""Speculative decoding: batch-1 decode tokens/s without it, with n-gram (prompt lookup) proposals and
with a draft model, on a repetitive workload and on the plain bench workload, in one run.

    python -m bench.spec [--prompts 2] [--new 64] [--k 4] [--threads 2] [--out bench/results/spec.json]

One in-process engine on the 300M Llama (bench/models.py, random weights, fp32) with the demo model
(same tokenizer, 4 layers, hidden 256) as its draft; between runs only the proposer changes (off /
n-gram / draft; the same weights, KV cache and kernels). Workloads: "quote" = summarise-and-quote
prompts (a licence passage of ~--passage tokens, then an instruction to summarise it quoting its
sentences: an output that repeats its prompt is what prompt lookup is for); "plain" = the bench
workload's prompts (~128 tokens of licence text). Greedy, exactly --new tokens (eos ignored), one
request at a time; each prompt runs under every mode in turn (rotated), so load from elsewhere falls
on all alike ("off" first: "oracle" proposes the tokens it produced, the ceiling a proposer that is
always right reaches on this machine: every step verifies K and keeps K + 1). Decode tokens/s = (tokens - 1) / (last token - first token), the prefill excluded;
acceptance = accepted / proposed drafts; tokens per step = decode tokens / target steps. Random
weights: the target's output quotes nothing on purpose, so acceptance says what this model does, not
what a trained model would (see README "Speculative decoding").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench import models

MODES = ("off", "ngram", "draft", "oracle")
INSTRUCTION = "\n\nSummarise the text above in three sentences, quoting its key sentences word for word:\n"


def quote_prompts(model_dir: Path, n: int, passage: int) -> list[list[int]]:
    from controller.acquire.demo_model import corpus_lines
    from controller.tokenizer import Codec

    codec = Codec(model_dir)
    text = " ".join(corpus_lines())
    out, pos = [], 40_000  # away from the plain workload's passages (which start at 0)
    for _ in range(n):
        ids = codec.encode_plain(text[pos:pos + 8 * passage])[:passage]
        out.append(codec.encode(codec.decode(ids) + INSTRUCTION))
        pos += 8 * passage
    return out


def plain_prompts(model_dir: Path, n: int) -> list[list[int]]:
    from bench.workload import Workload, prompts

    return [ids for _, ids in prompts(model_dir, Workload(streams=n, prompt_tokens=128))]


class Oracle:
    """Proposes the continuation the target will produce (from the run without speculation)."""

    truth: list[int] = []

    def propose(self, seqs, ks):
        return [self.truth[s.num_generated:s.num_generated + k] for s, k in zip(seqs, ks)], [None] * len(seqs)


def run_one(engine, prompt: list[int], new: int, tag: str) -> dict:
    from worker.engine.sequence import Sampling

    times: list[float] = []
    done = []
    out: list[int] = []

    def emit(toks, lps, fin, err):
        times.extend([time.perf_counter()] * len(toks))
        out.extend(toks)
        if fin is not None:
            done.append(err)

    st0 = engine.snapshot_stats()
    steps0, prop0, acc0 = st0.steps_total, st0.spec_decode_proposed_tokens_total, st0.spec_decode_accepted_tokens_total
    engine.add(engine.new_sequence(tag, prompt, Sampling(max_new_tokens=new), emit=emit))
    while not done:
        engine.step()
    assert not done[0], done[0]
    st = engine.snapshot_stats()
    decode_s = times[-1] - times[0]
    return {"tokens": len(times), "decode_s": decode_s, "steps": st.steps_total - steps0, "output": out,
            "proposed": st.spec_decode_proposed_tokens_total - prop0,
            "accepted": st.spec_decode_accepted_tokens_total - acc0}


def summarise(runs: list[dict]) -> dict:
    tokens = sum(r["tokens"] - 1 for r in runs)
    secs = sum(r["decode_s"] for r in runs)
    steps = sum(r["steps"] - 1 for r in runs)  # the first step is the prefill
    proposed, accepted = sum(r["proposed"] for r in runs), sum(r["accepted"] for r in runs)
    return {"decode_tokens": tokens, "decode_s": secs, "tokens_per_s": tokens / secs,
            "tokens_per_step": tokens / max(1, steps), "proposed": proposed, "accepted": accepted,
            "acceptance": accepted / proposed if proposed else None,
            "same_tokens": all(r["same_tokens"] for r in runs)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=2, help="prompts per workload")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="speculative tokens per step")
    p.add_argument("--passage", type=int, default=200, help="tokens of licence text in a quote prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="llama-300m", choices=list(models.BY_NAME))
    p.add_argument("--draft", default="demo", choices=list(models.DRAFTS),
                   help="the draft model (demo for the 300M target; llama-2l, 2 layers, for the demo target)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES))
    p.add_argument("--cache-dir", default="")
    p.add_argument("--out", default="", help="JSON path ('' = none)")
    args = p.parse_args(argv)
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir or Path.home() / ".cache" / "shardserve" / "bench")
    cache.mkdir(parents=True, exist_ok=True)
    model_dir, draft_dir = models.by_name(args.model, cache), models.DRAFTS[args.draft](cache)
    from worker.engine.build import build_engine
    from worker.engine.engine import EngineConfig
    from worker.engine.speculative import NgramProposer

    t0 = time.perf_counter()
    engine = build_engine(EngineConfig(model_dir=model_dir, max_batch_size=1, kv_cache_bytes=1 << 30,
                                       speculative_method="draft", speculative_model=str(draft_dir),
                                       num_speculative_tokens=args.k))
    oracle = Oracle()
    proposers = {"off": None, "ngram": NgramProposer(), "draft": engine.proposer, "oracle": oracle}
    print(f"engine built in {time.perf_counter() - t0:.1f} s: {args.model} fp32, draft {args.draft}, K={args.k}, "
          f"{args.threads} threads, batch 1, {args.new} new tokens, {args.prompts} prompts per workload", flush=True)
    workloads = {"quote": quote_prompts(model_dir, args.prompts, args.passage),
                 "plain": plain_prompts(model_dir, args.prompts)}

    def use(mode: str) -> None:
        engine.proposer = proposers[mode]
        engine.scheduler.num_speculative_tokens = 0 if mode == "off" else args.k

    runs: dict[tuple[str, str], list[dict]] = {}
    for w, prompts in workloads.items():
        for i, prompt in enumerate(prompts):
            rest = modes[1:] if modes[0] == "off" else modes
            for mode in ("off",) + tuple(rest[(i + j) % len(rest)] for j in range(len(rest))):  # off first
                use(mode)
                r = run_one(engine, prompt, args.new, f"{w}-{i}-{mode}")
                runs.setdefault((w, mode), []).append(r)
                if mode == "off":
                    oracle.truth = r["output"]
                r["same_tokens"] = r["output"] == oracle.truth  # greedy: speculation changes no token
                print(f"  {w} prompt {i} ({len(prompt)} tokens) {mode:>6}: {r['tokens'] - 1} tokens in "
                      f"{r['decode_s']:.2f} s, accepted {r['accepted']}/{r['proposed']}"
                      f"{'' if r['same_tokens'] else ', TOKENS DIFFER from off'}", flush=True)
    rows = []
    print(f"\n{'workload':<9}{'mode':<8}{'tok/s':>8}{'x off':>7}{'tok/step':>9}{'accepted':>14}")
    for w in workloads:
        base = summarise(runs[(w, "off")])["tokens_per_s"]
        for mode in ("off",) + tuple(m for m in modes if m != "off"):
            s = summarise(runs[(w, mode)])
            row = {"workload": w, "mode": mode, **s, "speedup": s["tokens_per_s"] / base}
            rows.append(row)
            acc = f"{s['accepted']}/{s['proposed']}" if s["proposed"] else "-"
            print(f"{w:<9}{mode:<8}{s['tokens_per_s']:>8.2f}{row['speedup']:>6.2f}x{s['tokens_per_step']:>9.2f}"
                  f"{acc:>14}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows,
                                              "runs": {f"{w}/{m}": r for (w, m), r in runs.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
