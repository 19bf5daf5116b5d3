"""CPU kernel bench: weight-streaming linear layers against the machine's memory floor.

Runs the linear layers of a ~300M-parameter decoder (24 layers, hidden 1024, MLP 2816: 307M
weights, far larger than the last-level cache) once per token, as batch-1 decode does, through:
  torch fp32 / bf16 F.linear, our int8 and int4 kernels (native/ops.py), and torch's own
  _weight_int8pack_mm and _weight_int4pack_mm_for_cpu.
Reports GB/s of weight bytes streamed and the ratio of the time to the memory floor
(weight bytes / the larger of the measured read and memcpy bandwidths; 1.0x is the
floor). Also times the other kernels against their torch references. Prints a table and writes JSON (--json PATH, default
bench/results/kernels.json).

    python -m bench.kernels [--layers 24] [--reps 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from native import ops, reference  # noqa: E402

HIDDEN, MLP = 1024, 2816
# (out, in) of the linear layers of one decoder layer: fused qkv, o, fused gate+up, down
LAYER_SHAPES = [(3 * HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (2 * MLP, HIDDEN), (HIDDEN, MLP)]
GROUP = 128


def best_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_bandwidth(gib: float = 1.0, reps: int = 5) -> dict:
    """Memory floor, GB/s: a streaming read (fp32 sum of a 1 GiB buffer) and a memcpy (bytes read
    plus bytes written per second). The floor of a weight-streaming kernel is weight bytes over the
    larger of the two."""
    n = int(gib * (1 << 30)) // 4
    a = torch.ones(n, dtype=torch.float32)
    b = torch.empty_like(a)
    read = a.numel() * 4 / best_seconds(lambda: a.sum(), reps)
    copy = 2 * a.numel() * 4 / best_seconds(lambda: b.copy_(a), reps)
    return {
        "read_GBps": read / 1e9,
        "copy_GBps_read_plus_write": copy / 1e9,
        "floor_GBps": max(read, copy) / 1e9,
    }


def make_layers(n_layers: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o, i, generator=g) * 0.02 for _ in range(n_layers) for (o, i) in LAYER_SHAPES]


def run_linear_bench(n_layers: int, reps: int, tokens: list[int]) -> list[dict]:
    t_start = time.perf_counter()
    ws = make_layers(n_layers)
    params = sum(w.numel() for w in ws)
    print(
        f"layers: {n_layers} x {len(LAYER_SHAPES)} linears, {params / 1e6:.0f}M weights "
        f"(built in {time.perf_counter() - t_start:.1f} s)",
        flush=True,
    )

    q8 = [reference.quantize_int8(w) for w in ws]
    q4 = [reference.quantize_int4(w, GROUP) for w in ws]
    variants: dict[str, tuple[int, Callable[[int, torch.dtype], Callable[[], object]]]] = {}

    def chain(fn_per_layer, T, x_dtype):
        xs = {i: torch.randn(T, i, dtype=x_dtype) for (_, i) in LAYER_SHAPES}
        return lambda: [fn_per_layer(k, xs[ws[k].shape[1]]) for k in range(len(ws))]

    variants["torch fp32 F.linear"] = (
        4,
        lambda T, dt: chain(lambda k, x: F.linear(x, ws[k]), T, torch.float32),
    )
    wb = None
    if os.environ.get("BENCH_SKIP_BF16") is None:
        wb = [w.to(torch.bfloat16) for w in ws]
        variants["torch bf16 F.linear"] = (
            2,
            lambda T, dt: chain(lambda k, x: F.linear(x, wb[k]), T, torch.bfloat16),
        )
    variants["ours int8 (fp32 x)"] = (
        1,
        lambda T, dt: chain(lambda k, x: ops.int8_linear(x, *q8[k]), T, torch.float32),
    )
    variants["ours int8 (bf16 x)"] = (
        1,
        lambda T, dt: chain(lambda k, x: ops.int8_linear(x, *q8[k]), T, torch.bfloat16),
    )
    variants["ours w8a8 (fp32 x, int8 activations)"] = (
        1,
        lambda T, dt: chain(lambda k, x: ops.w8a8_linear(x, *q8[k]), T, torch.float32),
    )
    s8b = [s.to(torch.bfloat16) for (_, s) in q8]
    variants["torch _weight_int8pack_mm (bf16 x)"] = (
        1,
        lambda T, dt: chain(lambda k, x: torch._weight_int8pack_mm(x, q8[k][0], s8b[k]), T, torch.bfloat16),
    )
    variants["ours int4 g128 (fp32 x)"] = (
        0.5,
        lambda T, dt: chain(
            lambda k, x: ops.int4_linear(x, q4[k][0], q4[k][1], q4[k][2], None, GROUP), T, torch.float32
        ),
    )
    # torch's CPU int4 format: [N, K] int32 values 0..15 packed by _convert_weight_to_int4pack_for_cpu,
    # scales_and_zeros [K/group, N, 2] with w = (q - 8) * scale + zero
    t4 = []
    for p, s, z in q4:
        qv = reference.unpack_int4(p).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(qv, 2)
        zero_pt = (8.0 - z) * s  # (q - z) * s == (q - 8) * s + (8 - z) * s
        sz = torch.stack([s, zero_pt], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        t4.append((packed, sz))
    variants["torch _weight_int4pack_mm_for_cpu (bf16 x)"] = (
        0.5,
        lambda T, dt: chain(
            lambda k, x: torch._weight_int4pack_mm_for_cpu(x, t4[k][0], GROUP, t4[k][1]), T, torch.bfloat16
        ),
    )
    print(f"quantised and packed in {time.perf_counter() - t_start:.1f} s", flush=True)

    rows = []
    for T in tokens:
        fns = {name: make(T, None) for name, (_, make) in variants.items()}
        for fn in fns.values():  # warm-up
            fn()
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(reps):  # interleaved rounds: a burst of load hits every variant alike
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        for name, (bytes_per_weight, _) in variants.items():
            sec = best[name]
            weight_bytes = params * bytes_per_weight
            gbps = weight_bytes / sec / 1e9
            rows.append(
                {
                    "kernel": name,
                    "tokens": T,
                    "ms_per_pass": sec * 1e3,
                    "weight_GB": weight_bytes / 1e9,
                    "GBps": gbps,
                }
            )
            print(f"  T={T:<3d} {name:44s} {sec * 1e3:8.1f} ms {gbps:6.1f} GB/s", flush=True)
    return rows


def run_other_kernels(reps: int) -> list[dict]:
    """Native vs torch reference for the non-linear kernels at decode-like sizes (fp32)."""
    g = torch.Generator().manual_seed(1)
    out = []
    cases = {}
    # long contexts; the 300M bench Llama at 32 streams (bench/models.py); the demo model at 8 streams
    for B, H, Hkv, D, ctx in ((8, 16, 4, 64, 1024), (32, 16, 8, 64, 192), (8, 8, 4, 32, 304)):
        bs = 16
        nb = B * ctx // bs
        q = torch.randn(B, H, D, generator=g)
        kc, vc = torch.randn(nb, bs, Hkv, D, generator=g), torch.randn(nb, bs, Hkv, D, generator=g)
        tables = torch.randperm(nb, generator=g).reshape(B, ctx // bs).int()
        lens = torch.full((B,), ctx, dtype=torch.int32)
        cases[f"paged_attention_decode B={B} H={H}/{Hkv} D={D} ctx={ctx}"] = (
            lambda q=q, kc=kc, vc=vc, t=tables, n=lens, D=D: ops.paged_attention_decode(q, kc, vc, t, n, D**-0.5),
            lambda q=q, kc=kc, vc=vc, t=tables, n=lens, D=D: reference.paged_attention_decode(q, kc, vc, t, n, D**-0.5),
            2 * kc.numel() * 4,
        )
    x, r, w = torch.randn(8, 4096), torch.randn(8, 4096), torch.randn(4096)
    logits = torch.randn(8, 32000, generator=g)
    temp, tk, tp = torch.full((8,), 0.8), torch.full((8,), 50), torch.full((8,), 0.9)
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    cases |= {
        "fused_add_rms_norm 8x4096": (
            lambda: ops.fused_add_rms_norm(x, r, w, 1e-6),
            lambda: reference.fused_add_rms_norm(x, r, w, 1e-6),
            0,
        ),
        "sample_top_k_top_p 8x32000 (k=50, p=0.9)": (
            lambda: ops.sample_top_k_top_p(logits, temp, tk, tp, gens),
            lambda: reference.sample_top_k_top_p(logits, temp, tk, tp, gens),
            0,
        ),
    }
    for name, (nat, ref, nbytes) in cases.items():
        a, b = best_seconds(nat, reps), best_seconds(ref, reps)
        row = {"kernel": name, "native_ms": a * 1e3, "torch_ms": b * 1e3, "speedup": b / a}
        if nbytes:
            row["native_GBps"] = nbytes / a / 1e9
        out.append(row)
        print(f"  {name:48s} native {a * 1e3:8.3f} ms  torch {b * 1e3:8.3f} ms  x{b / a:5.1f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24 = 307M weights)")
    parser.add_argument("--reps", type=int, default=3, help="timed passes per variant (best kept)")
    parser.add_argument("--tokens", default="1,4", help="batch sizes (tokens per pass), comma separated")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "kernels.json"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    load_at_start = os.getloadavg()  # other processes on these 2 cores skew every number
    print(
        f"kernel path: {ops.KERNEL_PATH} ({ops.backend('cpu').detail}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    bw = read_bandwidth()
    print(
        f"memory: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps_read_plus_write']:.1f} GB/s "
        f"(read+write); load average {load_at_start[0]:.1f}",
        flush=True,
    )
    tokens = [int(t) for t in args.tokens.split(",") if t]
    linear = run_linear_bench(args.layers, args.reps, tokens)
    bw_end = read_bandwidth()  # measured again: the floor is the best the machine showed
    floor = max(bw["floor_GBps"], bw_end["floor_GBps"])
    bw = {"start": bw, "end": bw_end, "floor_GBps": floor}
    print(f"\nfloor: {floor:.1f} GB/s (best of the read and memcpy runs before and after)")
    print(f"  {'T':>3s} {'kernel':44s} {'ms/pass':>9s} {'GB/s':>7s} {'x floor':>8s}")
    for row in linear:
        row["x_floor"] = floor / row["GBps"]
        print(
            f"  {row['tokens']:3d} {row['kernel']:44s} {row['ms_per_pass']:9.1f} {row['GBps']:7.1f} "
            f"{row['x_floor']:8.2f}"
        )
    print("other kernels (fp32):")
    other = run_other_kernels(args.reps)
    result = {
        "load_average_at_start": load_at_start,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "kernel_path": ops.KERNEL_PATH,
            "isa": ops.backend("cpu").detail,
        },
        "memory": bw,
        "layers": args.layers,
        "linear": linear,
        "other": other,
        "seconds": time.perf_counter() - t0,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
