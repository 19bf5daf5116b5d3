"""Pure decode speed against the memory floor: our engine (in-process) at fp32 / bf16 / int8 / int4 / w8a8,
CTranslate2 float32 / int8 and transformers fp32 on the same ~300M-parameter Llama, side by side.

    python -m bench.decode [--threads 2] [--tokens 64] [--batches 1,8] [--out bench/results/cpu-decode.json]

Each variant prefills B prompts of --prompt tokens, then runs --tokens decode steps of the whole batch
(greedy, no EOS: every sequence stays to the end). tokens/s = B * tokens / decode seconds; ms/step =
decode seconds / tokens.
  ours: engine.step() timed step by step (the prefill step is timed apart and not counted).
  CTranslate2: generate_batch has no per-step hook, so decode = (time of max_length = tokens + 1)
    - (best time of max_length = 1, i.e. prefill + the first token); both are reported.
  transformers: generate(), the same subtraction, batch 1 only (context, not a target).
Memory floor: bytes one decode step must read (weights the step multiplies by, LM head included, the
embedding table not, since a step reads one row of it; plus the K/V of every context token of every
sequence) / the machine's read bandwidth (bench.kernels.read_bandwidth, the better of before and
after). "x floor" = ms/step / floor ms/step; 1.0x is the floor.
Size: "disk" = checkpoint / model.bin bytes; "memory" = parameters + buffers on the rank after
load (+ quantize), engine.param_bytes (the quantized variants have no file of their own yet).
--profile-steps N (default 8): a breakdown of one fp32 batch-1 step: module forward hooks (exclusive
time per module kind) and torch.profiler (self time per aten op); written to the JSON as "profile".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench import ct2, models

PROMPT_SEED_ID = 3  # prompt ids start past the demo tokenizer's special tokens (0..2)


def make_prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    """`batch` distinct prompts of `length` token ids (deterministic)."""
    return [[PROMPT_SEED_ID + (97 * b + 31 * i) % (vocab - PROMPT_SEED_ID) for i in range(length)]
            for b in range(batch)]


def kv_bytes_per_token(cfg: dict, elem: int) -> int:
    """K and V of one token over all layers, bytes."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * elem


def kv_read_per_step(cfg: dict, elem: int, batch: int, prompt: int, tokens: int) -> float:
    """Mean K/V bytes a decode step reads: decode step j (0-based) attends over prompt + 1 + j tokens."""
    mean_ctx = prompt + 1 + (tokens - 1) / 2
    return batch * mean_ctx * kv_bytes_per_token(cfg, elem)


def row(variant: str, batch: int, tokens: int, decode_s: float, weight_bytes: float, kv_bytes: float,
        size_bytes: int, size_kind: str, bw: float, **extra) -> dict:
    ms_step = 1e3 * decode_s / tokens
    floor_ms = 1e3 * (weight_bytes + kv_bytes) / bw
    return {"variant": variant, "batch": batch, "tokens": tokens, "decode_s": decode_s,
            "tokens_per_s": batch * tokens / decode_s, "ms_per_step": ms_step,
            "floor_ms_per_step": floor_ms, "x_floor": ms_step / floor_ms,
            "bytes_read_per_step": weight_bytes + kv_bytes, "weight_bytes_per_step": weight_bytes,
            "kv_bytes_per_step": kv_bytes, "size_bytes": size_bytes, "size_kind": size_kind, **extra}


def cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy over `seconds` while this process sleeps: other load on the machine."""
    def sample():
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(f), f[3] + f[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return -1.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait_s: float, busy_below: float = 0.25) -> float:
    """Wait (up to `max_wait_s`) until other load uses under `busy_below` of the CPUs; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy(1.0)
    while busy >= busy_below and time.monotonic() < deadline:
        busy = cpu_busy(1.0)
    return busy


# ---- ours -------------------------------------------------------------------------------------------

def build(model_dir: Path, dtype: str, quantize: str | None, max_batch: int, max_len: int):
    from worker.engine.build import build_engine
    from worker.engine.engine import EngineConfig

    engine = build_engine(EngineConfig(model_dir=model_dir, dtype=dtype, max_batch_size=max_batch,
                                       max_batch_tokens=max(2048, max_batch * max_len), max_model_len=max_len,
                                       num_kv_blocks=max_batch * (-(-max_len // 16) + 1), quantize=quantize))
    if hasattr(engine.scheduler, "prefill_budget"):  # the bench prefills every prompt in one step
        engine.scheduler.prefill_budget = engine.config.max_batch_tokens
    return engine


SAMPLED = False  # --sampled: every request samples with penalties instead of greedy


def add_batch(engine, tag: str, prompts: list[list[int]], new_tokens: int) -> list:
    from worker.engine.sequence import Sampling

    done = []
    for i, p in enumerate(prompts):
        # no eos_token_ids: nothing stops before the length
        sampling = (Sampling(max_new_tokens=new_tokens, temperature=0.8, top_k=50, top_p=0.9, seed=i,
                             repetition_penalty=1.1, frequency_penalty=0.1, return_log_probs=True)
                    if SAMPLED else Sampling(max_new_tokens=new_tokens))
        engine.add(engine.new_sequence(f"{tag}-{i}", p, sampling,
                                       emit=lambda t, lp, fin, err: done.append((fin, err)) if fin else None))
    return done


def ours_pass(engine, prompts: list[list[int]], tokens: int, tag: str) -> tuple[float, list[float]]:
    """Prefill (one step, timed apart), then `tokens` decode steps; returns (prefill s, step seconds)."""
    done = add_batch(engine, tag, prompts, tokens + 1)
    t0 = time.perf_counter()
    engine.step()
    prefill = time.perf_counter() - t0
    running = list(engine.scheduler.running)
    if len(running) != len(prompts) or any(s.num_generated != 1 for s in running):
        raise RuntimeError("the prefill did not run every prompt in one step; raise max_batch_tokens")
    steps = []
    while len(done) < len(prompts):
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    if len(steps) != tokens or any(err for _, err in done):
        raise RuntimeError(f"expected {tokens} decode steps, got {len(steps)}: {done}")
    return prefill, steps


def run_ours(model_dir: Path, cfg: dict, dtype: str, quantize: str | None, args, bw: float,
             ckpt_bytes: int, profile_steps: int = 0) -> tuple[list[dict], dict | None]:
    max_len = args.prompt + args.tokens + 16
    t0 = time.monotonic()
    engine = build(model_dir, dtype, quantize, max(args.batches), max_len)
    built = time.monotonic() - t0
    name = f"ours {dtype}" + (f" {quantize}" if quantize else "")
    elem = torch.empty((), dtype=engine.config.torch_dtype).element_size()
    embed = cfg["vocab_size"] * cfg["hidden_size"] * elem  # the embedding stays in the load dtype
    weight_bytes = engine.param_bytes - embed
    if quantize is None and dtype == "fp32":
        size, kind = ckpt_bytes, "disk"
    else:
        size, kind = engine.param_bytes, "memory"
    rows = []
    for b in args.batches:
        prompts = make_prompts(b, args.prompt, cfg["vocab_size"])
        ours_pass(engine, prompts, min(4, args.tokens), f"warm{b}")  # this batch shape's first-call costs
        busy = cpu_busy()
        passes = [ours_pass(engine, prompts, args.tokens, f"b{b}r{r}") for r in range(args.reps)]
        prefill, steps = min(passes, key=lambda p: sum(p[1]))  # the best pass: the least disturbed
        rows.append(row(name, b, args.tokens, sum(steps), weight_bytes,
                        kv_read_per_step(cfg, elem, b, args.prompt, args.tokens), size, kind, bw,
                        prefill_s=prefill, ms_per_step_median=1e3 * statistics.median(steps),
                        build_s=built, kernel_path=engine.kernel_path, cpu_busy_before=busy,
                        all_pass_ms_per_step=[1e3 * sum(p[1]) / args.tokens for p in passes]))
        print(fmt_row(rows[-1]), flush=True)
    prof = profile(engine, cfg, args, profile_steps) if profile_steps else None
    del engine
    gc.collect()
    return rows, prof


# ---- where one step's time goes (ours fp32, batch 1) ---------------------------------------------------

def kind_of(module) -> str:
    n = type(module).__name__
    if "LMHead" in n:
        return "LM head"
    if "Linear" in n:
        return "linear layers"
    if n == "PagedAttention" or "PagedAttention" in n:
        return "attention core (cache write + attend)"
    if "Rotary" in n:
        return "rotary"
    if "Norm" in n:
        return "norms"
    if "Embedding" in n:
        return "embedding"
    return "glue inside the model (splits, silu*mul, residual adds, module calls)"


def profile(engine, cfg: dict, args, steps: int) -> dict:
    """Exclusive time per module kind (forward hooks) and self time per op (torch.profiler) over
    `steps` decode steps at batch 1; everything outside the model's forward is "engine outside the model"."""
    excl: dict[str, float] = defaultdict(float)
    stack: list[list] = []  # [t0, children seconds]
    top = engine.model

    def pre(mod, inp):
        stack.append([time.perf_counter(), 0.0])

    def post(mod, inp, out):
        t0, child = stack.pop()
        dt = time.perf_counter() - t0
        excl[kind_of(mod)] += dt - child
        if mod is top:
            excl["_model_total"] += dt
        if stack:
            stack[-1][1] += dt

    handles = [m.register_forward_pre_hook(pre) for m in top.modules()]
    handles += [m.register_forward_hook(post) for m in top.modules()]
    prompts = make_prompts(1, args.prompt, cfg["vocab_size"])
    try:
        done = add_batch(engine, "prof", prompts, steps + 1)
        engine.step()  # prefill
        excl.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    assert len(done) == 1
    model_total = excl.pop("_model_total", 0.0)
    # compute_logits (the LM head) is called by the runner, not from model.forward
    outside = wall - model_total - excl.get("LM head", 0.0)
    hooks = {k: 1e3 * v / steps for k, v in sorted(excl.items(), key=lambda kv: -kv[1])}
    hooks["engine outside the model (schedule, plan, sample, update)"] = 1e3 * outside / steps

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    done = add_batch(engine, "prof2", prompts, steps + 1)
    engine.step()
    with tprofile(activities=[ProfilerActivity.CPU]) as p:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        pwall = time.perf_counter() - t0
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in p.key_averages()),
                 key=lambda x: -x[1])
    in_ops = sum(ms for _, ms, _ in ops)
    return {
        "batch": 1, "steps": steps,
        "hooks_ms_per_step": hooks, "hooks_wall_ms_per_step": 1e3 * wall / steps,
        "profiler_wall_ms_per_step": 1e3 * pwall / steps,
        "profiler_self_ms_in_ops_per_step": in_ops,
        "profiler_ops_per_step": sum(c for _, _, c in ops),
        "profiler_top_ops": [{"op": k, "self_ms_per_step": ms, "calls_per_step": c} for k, ms, c in ops[:15]],
    }


def fmt_profile(p: dict) -> str:
    lines = [f"where a decode step goes (ours fp32, batch 1, {p['steps']} steps; module hooks, "
             f"wall {p['hooks_wall_ms_per_step']:.1f} ms/step with hooks):"]
    total = p["hooks_wall_ms_per_step"]
    for k, v in p["hooks_ms_per_step"].items():
        lines.append(f"  {v:8.2f} ms  {100 * v / total:5.1f}%  {k}")
    lines.append(f"torch.profiler: {p['profiler_ops_per_step']:.0f} ops/step, "
                 f"{p['profiler_self_ms_in_ops_per_step']:.1f} ms self time in ops of "
                 f"{p['profiler_wall_ms_per_step']:.1f} ms/step wall (profiled); top ops:")
    for o in p["profiler_top_ops"][:10]:
        lines.append(f"  {o['self_ms_per_step']:8.2f} ms  {o['calls_per_step']:5.0f} calls  {o['op']}")
    return "\n".join(lines)


# ---- CTranslate2 and transformers --------------------------------------------------------------------

def ct2_timed(gen, toks: list[list[str]], n: int) -> float:
    """Seconds for one generate_batch of exactly `n` new tokens per prompt (greedy, no end token)."""
    t0 = time.perf_counter()
    res = gen.generate_batch(toks, max_length=n, min_length=n, include_prompt_in_result=False,
                             sampling_topk=1, end_token=[], max_batch_size=len(toks))
    dt = time.perf_counter() - t0
    got = [len(r.sequences_ids[0]) for r in res]
    if got != [n] * len(toks):
        raise RuntimeError(f"CTranslate2 made {got} tokens, expected {n} each")
    return dt


def run_ct2(model_dir: Path, ct2_dir: Path, cfg: dict, compute: str, args, bw: float) -> list[dict]:
    import ctranslate2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    gen = ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type=compute, intra_threads=args.threads)
    size = (ct2_dir / "model.bin").stat().st_size
    elem = 1 if compute == "int8" else 4  # int8: CT2 quantizes the embedding and the LM head too
    weight_bytes = size - cfg["vocab_size"] * cfg["hidden_size"] * elem
    rows = []
    for b in args.batches:
        toks = [tok.convert_ids_to_tokens(p) for p in make_prompts(b, args.prompt, cfg["vocab_size"])]

        def timed(n: int, gen=gen, toks=toks) -> float:
            return ct2_timed(gen, toks, n)

        timed(min(4, args.tokens))  # warm-up
        busy = cpu_busy()
        prefill = min(timed(1) for _ in range(3))
        totals = [timed(args.tokens + 1) for _ in range(args.reps)]
        total = min(totals)
        rows.append(row(f"ct2 {compute}", b, args.tokens, total - prefill, weight_bytes,
                        kv_read_per_step(cfg, 4, b, args.prompt, args.tokens), size, "disk", bw,
                        prefill_s=prefill, total_s=total, all_total_s=totals, cpu_busy_before=busy,
                        timing="best total(max_length=N+1) - best total(max_length=1)"))
        print(fmt_row(rows[-1]), flush=True)
    del gen
    gc.collect()
    return rows


@torch.inference_mode()
def hf_timed(model, ids: torch.Tensor, n: int) -> float:
    """Seconds for one generate() of exactly `n` new tokens (greedy, no EOS)."""
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    dt = time.perf_counter() - t0
    if out.shape[1] != ids.shape[1] + n:
        raise RuntimeError(f"transformers made {out.shape[1] - ids.shape[1]} tokens, expected {n}")
    return dt


def run_hf(model_dir: Path, cfg: dict, args, bw: float, ckpt_bytes: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor(make_prompts(1, args.prompt, cfg["vocab_size"]))

    def timed(n: int, model=model) -> float:
        return hf_timed(model, ids, n)

    timed(2)
    busy = cpu_busy()
    prefill = min(timed(1) for _ in range(3))
    total = min(timed(args.tokens + 1) for _ in range(args.reps))
    embed = cfg["vocab_size"] * cfg["hidden_size"] * 4
    r = row("transformers fp32", 1, args.tokens, total - prefill, ckpt_bytes - embed,
            kv_read_per_step(cfg, 4, 1, args.prompt, args.tokens), ckpt_bytes, "disk", bw,
            prefill_s=prefill, total_s=total, cpu_busy_before=busy,
            timing="best total(N+1 new) - best total(1 new)")
    print(fmt_row(r), flush=True)
    del model
    gc.collect()
    return [r]


# ---- table and main ---------------------------------------------------------------------------------

HEADER = f"{'variant':<20} {'batch':>5} {'tokens/s':>9} {'ms/step':>8} {'floor ms':>8} {'x floor':>7} {'size MB':>9} {'busy':>5}"


def fmt_row(r: dict) -> str:
    return (f"{r['variant']:<20} {r['batch']:>5} {r['tokens_per_s']:>9.1f} {r['ms_per_step']:>8.1f} "
            f"{r['floor_ms_per_step']:>8.1f} {r['x_floor']:>6.2f}x {r['size_bytes'] / 1e6:>7.0f} "
            f"{r['size_kind'][0]} {100 * r.get('cpu_busy_before', -1):>4.0f}%")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads and CTranslate2 intra_threads")
    p.add_argument("--tokens", type=int, default=64, help="decode steps timed per variant and batch")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    p.add_argument("--model", default="llama-300m", choices=list(models.BY_NAME))
    p.add_argument("--model-dir", default="", help="any Llama-family HF folder instead of --model")
    p.add_argument("--variants", default="fp32,int8,ct2-int8,int4,ct2-float32,bf16,hf",
                   help="any of fp32,bf16,int8,int4,w8a8 (ours), ct2-float32, ct2-int8, hf")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each variant, wait up to this many seconds for other CPU load to drop under 25%%")
    p.add_argument("--sampled", action="store_true",
                   help="our engine only: requests sample (temperature 0.8, top-k 50, top-p 0.9, repetition "
                        "and frequency penalties, log-probs) instead of greedy")
    p.add_argument("--reps", type=int, default=2, help="timed passes per variant and batch; the best counts")
    p.add_argument("--profile-steps", type=int, default=8, help="0 = no step breakdown")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="buffer for the read-bandwidth probe")
    p.add_argument("--cache-dir", default="", help="default ~/.cache/shardserve/bench")
    p.add_argument("--out", default="bench/results/cpu-decode.json", help="JSON path ('' = none)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variants = args.variants.split(",")
    global SAMPLED
    SAMPLED = args.sampled
    return args


def bandwidth(gib: float) -> dict:
    from bench.kernels import read_bandwidth

    return read_bandwidth(gib=gib, reps=5)


def summarize(args, model_dir: Path, cfg: dict, rows: list[dict], prof: dict | None, bw_before: dict,
              bw_after: dict | None, load_before, elapsed: float) -> dict:
    """Rows re-floored at the better bandwidth probe, machine facts; the JSON document."""
    from native import ops

    best_bw = max(bw_before["floor_GBps"], (bw_after or bw_before)["floor_GBps"]) * 1e9
    for r in rows:  # the floor from the better of the two probes (a lower floor, the stricter ratio)
        r["floor_ms_per_step"] = 1e3 * r["bytes_read_per_step"] / best_bw
        r["x_floor"] = r["ms_per_step"] / r["floor_ms_per_step"]
    machine = {
        "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "processor": _cpu_model(), "kernel_path": ops.kernel_path("cpu"), "kernel_detail": ops.backend("cpu").detail,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "bandwidth_before": bw_before, "bandwidth_after": bw_after, "floor_GBps_used": best_bw / 1e9,
    }
    try:
        import ctranslate2

        machine["ctranslate2"] = ctranslate2.__version__
    except ImportError:
        pass
    return {"model": model_dir.name, "params": _params(cfg), "prompt_tokens": args.prompt, "tokens": args.tokens,
            "batches": args.batches, "complete": bw_after is not None, "machine": machine, "elapsed_s": elapsed,
            "results": rows, "profile": prof, "method": __doc__}


def write(args, doc: dict) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else Path.home() / ".cache" / "shardserve" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t_start = time.monotonic()
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        model_dir = models.by_name(args.model, cache)
    cfg = json.loads((model_dir / "config.json").read_text())
    ckpt_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    bw_before = bandwidth(args.bandwidth_gib)
    bw = bw_before["floor_GBps"] * 1e9
    print(f"model {model_dir.name}: {ckpt_bytes / 1e6:.0f} MB fp32 checkpoint; read bandwidth "
          f"{bw_before['read_GBps']:.1f} GB/s, memcpy {bw_before['copy_GBps_read_plus_write']:.1f} GB/s "
          f"(read+write); {args.threads} threads; prompt {args.prompt}, {args.tokens} decode steps", flush=True)
    print(HEADER, flush=True)
    rows: list[dict] = []
    prof = None
    ours = {"fp32": ("fp32", None), "bf16": ("bf16", None), "int8": ("fp32", "int8"), "int4": ("fp32", "int4"),
            "w8a8": ("fp32", "w8a8")}
    for v in args.variants:
        if args.wait_quiet:
            wait_quiet(args.wait_quiet)
        if v in ours:
            dtype, q = ours[v]
            got, p = run_ours(model_dir, cfg, dtype, q, args, bw, ckpt_bytes,
                              profile_steps=args.profile_steps if v == "fp32" and 1 in args.batches else 0)
            rows += got
            prof = prof or p
        elif v.startswith("ct2-"):
            compute = v[4:]
            ct2_dir = ct2.convert(model_dir, cache, None if compute == "float32" else compute)
            rows += run_ct2(model_dir, ct2_dir, cfg, compute, args, bw)
        elif v == "hf" and 1 in args.batches:
            rows += run_hf(model_dir, cfg, args, bw, ckpt_bytes)
        if v == "fp32" and prof:
            print(fmt_profile(prof), flush=True)
        # a partial document after every variant: a long run cut short still leaves its figures
        write(args, summarize(args, model_dir, cfg, rows, prof, bw_before, None, load_before,
                              time.monotonic() - t_start))
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    bw_after = bandwidth(args.bandwidth_gib)
    elapsed = time.monotonic() - t_start
    doc = summarize(args, model_dir, cfg, rows, prof, bw_before, bw_after, load_before, elapsed)
    write(args, doc)
    m = doc["machine"]
    print("\n" + HEADER)
    for r in rows:
        print(fmt_row(r))
    print(f"[size: d = on disk, m = in memory after load/quantize; busy = other CPU load measured just before; "
          f"floor at {m['floor_GBps_used']:.1f} GB/s; load average {load_before[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after; kernels: {m['kernel_path']}; {elapsed:.0f} s]")
    if prof:
        print(fmt_profile(prof))
    return 0


def _params(cfg: dict) -> int:
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    attn = h * hd * (cfg["num_attention_heads"] * 2 + cfg["num_key_value_heads"] * 2)
    return n * (attn + 3 * h * i + 2 * h) + 2 * v * h + h


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
