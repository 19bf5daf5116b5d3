"""One prepared GPU check of the native kernels, for an H100 / H200 with a CUDA torch and nvcc.

    python3 bench/gpu/native_check.py             # on the GPU machine (budget: well under 4 minutes)
    python bench/gpu/native_check.py --device cpu # the same harness on the CPU extension (dry run)

Steps: build the extension (native/build.py, in a subprocess with a timeout), load it, compare
every kernel with native/reference.py on random inputs (fp32 / bf16 / fp16), then time
paged-attention decode and the int8 / int4 GEMV against the torch reference and against the
memory floor (bytes the kernel must move / measured device copy bandwidth). Prints a table and
writes JSON to $OUT/gpu_kernels.json (./gpu_kernels.json when OUT is unset). A watchdog writes
what was gathered so far and exits if any step hangs. Exit code 0 when every comparison passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RESULT: dict = {"step": "start", "compare": [], "timing": [], "errors": []}
_write_lock = threading.Lock()


def out_path() -> Path:
    return Path(os.environ["OUT"]) / "gpu_kernels.json" if os.environ.get("OUT") else Path("gpu_kernels.json")


def write_result() -> None:
    with _write_lock:
        path = out_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(RESULT, indent=1, default=str) + "\n")


def start_watchdog(seconds: float) -> None:
    def fire() -> None:
        RESULT["errors"].append(f"watchdog: step '{RESULT['step']}' still running after {seconds:.0f} s")
        print(f"\nWATCHDOG: giving up in step {RESULT['step']!r}", flush=True)
        write_result()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def build_extension(device_type: str, timeout: float) -> None:
    RESULT["step"] = "build"
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
    flag = "--cuda-only" if device_type == "cuda" else "--cpu-only"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "native" / "build.py"), flag],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        log = (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as exc:
        log = f"build timed out after {timeout:.0f} s\n{(exc.stdout or '')[-2000:]}"
    RESULT["build"] = {"seconds": round(time.perf_counter() - t0, 1), "log_tail": log}
    print(f"build: {RESULT['build']['seconds']} s\n{log[-1500:]}", flush=True)


def max_rel_err(got, want) -> float:
    scale = max(want.float().abs().max().item(), 1e-6)
    return (got.float() - want.float()).abs().max().item() / scale


def compare_all(ns, dev, torch, reference) -> None:
    """Each kernel vs reference; tolerances relative to the output's largest magnitude."""
    tol = {torch.float32: 2e-3, torch.bfloat16: 2**-6, torch.float16: 2**-8}
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(dev)

    def record(name, dtype, fn):
        RESULT["step"] = f"compare {name} {dtype}"
        entry = {"kernel": name, "dtype": str(dtype).replace("torch.", "")}
        try:
            errs = fn(dtype)
            entry["max_rel_err"] = max(errs)
            entry["tol"] = tol[dtype]
            entry["ok"] = bool(max(errs) <= tol[dtype])
        except Exception as exc:  # noqa: BLE001
            entry.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:800])
        RESULT["compare"].append(entry)
        print(
            f"  {'ok ' if entry['ok'] else 'BAD'} {name:24s} {entry['dtype']:9s} "
            f"{entry.get('max_rel_err', entry.get('error'))}",
            flush=True,
        )

    def attention(dt):
        errs = []
        for H, Hkv, alibi in [(8, 8, False), (32, 8, False), (4, 1, True)]:
            B, D, bs, nb = 4, 128, 16, 300
            q, kc, vc = rnd(B, H, D, dtype=dt), rnd(nb, bs, Hkv, D, dtype=dt), rnd(nb, bs, Hkv, D, dtype=dt)
            tables = torch.randperm(nb, generator=g)[: B * 70].reshape(B, 70).int().to(dev)
            lens = torch.tensor([1, 200, 513, 1120], dtype=torch.int32, device=dev)  # 1 / 2 / 3 partitions
            slopes = torch.rand(H, generator=g).to(dev) if alibi else None
            errs.append(
                max_rel_err(
                    ns.paged_attention_decode(q, kc, vc, tables, lens, D**-0.5, slopes),
                    reference.paged_attention_decode(q, kc, vc, tables, lens, D**-0.5, slopes),
                )
            )
        return errs

    def norms(dt):
        x, r, w, b = rnd(7, 4096, dtype=dt), rnd(7, 4096, dtype=dt), rnd(4096, dtype=dt), rnd(4096, dtype=dt)
        errs = []
        for res in (r, None):
            errs += [
                max_rel_err(a, c)
                for a, c in zip(
                    ns.fused_add_rms_norm(x, res, w, 1e-6),
                    reference.fused_add_rms_norm(x, res, w, 1e-6),
                    strict=True,
                )
            ]
            errs += [
                max_rel_err(a, c)
                for a, c in zip(
                    ns.fused_add_layer_norm(x, res, w, b, 1e-5),
                    reference.fused_add_layer_norm(x, res, w, b, 1e-5),
                    strict=True,
                )
            ]
        return errs

    def rotary(dt):
        errs = []
        for neox, rot in [(True, 128), (False, 128), (True, 64)]:
            T, H, Hkv, D = 9, 32, 8, 128
            q, k, v = rnd(T, H, D, dtype=dt), rnd(T, Hkv, D, dtype=dt), rnd(T, Hkv, D, dtype=dt)
            pos = torch.randint(0, 100, (T,), generator=g).to(dev)
            cs = rnd(100, rot)
            slots = torch.tensor([0, 3, -1, 5, 63, 8, -1, 12, 1], device=dev)
            c = [torch.zeros(4, 16, Hkv, D, dtype=dt, device=dev) for _ in range(4)]
            got = ns.rotary_cache_write(q, k, v, pos, cs, c[0], c[1], slots, neox, rot)
            want = reference.rotary_cache_write(q, k, v, pos, cs, c[2], c[3], slots, neox, rot)
            errs += [max_rel_err(a, b) for a, b in zip([*got, c[0], c[1]], [*want, c[2], c[3]], strict=True)]
        return errs

    def int8(dt):
        w, bias = rnd(1000, 4096), rnd(1000)
        qw, s = reference.quantize_int8(w)
        errs = []
        for T in (1, 3, 8, 40):
            x = rnd(T, 4096, dtype=dt)
            errs.append(max_rel_err(ns.int8_linear(x, qw, s, bias), reference.int8_linear(x, qw, s, bias)))
        return errs

    def int4(dt):
        w, bias = rnd(1000, 4096), rnd(1000)
        errs = []
        for gs, sym in [(128, False), (64, True)]:
            p, s, z = reference.quantize_int4(w, gs)
            z = None if sym else z
            for T in (1, 5, 40):
                x = rnd(T, 4096, dtype=dt)
                errs.append(
                    max_rel_err(
                        ns.int4_linear(x, p, s, z, bias, gs), reference.int4_linear(x, p, s, z, bias, gs)
                    )
                )
        return errs

    for name, fn in [
        ("paged_attention_decode", attention),
        ("fused_add_norms", norms),
        ("rotary_cache_write", rotary),
        ("int8_linear", int8),
        ("int4_linear", int4),
    ]:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            record(name, dt, fn)

    RESULT["step"] = "compare sampling"
    entry = {"kernel": "sample_top_k_top_p", "dtype": "float32"}
    try:
        B, V = 64, 32000
        logits = torch.randn(B, V, generator=g) * 3
        temp = torch.rand(B, generator=g) * 1.5
        temp[::6] = 0.0
        top_k = torch.randint(0, 100, (B,), generator=g)
        top_k[::4] = 0
        top_p = torch.rand(B, generator=g)
        top_p[::3] = 1.0
        u = torch.rand(B, generator=g, dtype=torch.float64)
        got = ns.sample_top_k_top_p(
            logits.to(dev), temp.to(dev), top_k.to(dev), top_p.to(dev), u.to(dev)
        ).cpu()
        want = reference.sample_with_uniforms(logits, temp, top_k, top_p, u)
        entry["mismatches"] = int((got != want).sum())
        entry["ok"] = entry["mismatches"] <= 1  # float64 summation order may flip a boundary draw
    except Exception as exc:  # noqa: BLE001
        entry.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:800])
    RESULT["compare"].append(entry)
    print(
        f"  {'ok ' if entry['ok'] else 'BAD'} sample_top_k_top_p mismatches={entry.get('mismatches')}",
        flush=True,
    )


def timed(fn, dev, torch, iters: int) -> float:
    """Median seconds per call."""
    fn()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(dev, torch, nbytes: int, iters: int) -> float:
    """Device copy bandwidth, bytes read + written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * nbytes / timed(lambda: b.copy_(a), dev, torch, iters)


def time_all(ns, dev, torch, reference, quick: bool) -> None:
    RESULT["step"] = "timing copy bandwidth"
    iters = 5 if quick else 20
    bw = copy_bandwidth(dev, torch, (256 if quick else 2048) << 20, iters)
    RESULT["copy_GBps_read_plus_write"] = bw / 1e9
    print(f"copy bandwidth (read+write): {bw / 1e9:.0f} GB/s", flush=True)

    def row(name, nbytes, native_fn, ref_fn, extra=None):
        RESULT["step"] = f"timing {name}"
        entry = {"kernel": name, "bytes": nbytes}
        try:
            t_nat = timed(native_fn, dev, torch, iters)
            t_ref = timed(ref_fn, dev, torch, max(2, iters // 4))
            floor = nbytes / bw
            entry.update(
                native_us=t_nat * 1e6,
                torch_us=t_ref * 1e6,
                floor_us=floor * 1e6,
                native_x_floor=t_nat / floor,
                torch_x_floor=t_ref / floor,
                native_GBps=nbytes / t_nat / 1e9,
            )
            for label, fn in (extra or {}).items():
                try:
                    t = timed(fn, dev, torch, iters)
                except Exception as exc:  # noqa: BLE001 - e.g. an op this torch lacks on the device
                    entry[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                entry[f"{label}_us"] = t * 1e6
                entry[f"{label}_x_floor"] = t / floor
        except Exception as exc:  # noqa: BLE001
            entry["error"] = f"{type(exc).__name__}: {exc}"[:800]
        RESULT["timing"].append(entry)
        print(
            "  " + json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in entry.items()}),
            flush=True,
        )

    g = torch.Generator().manual_seed(1)
    dt = torch.bfloat16
    B, H, Hkv, D, bs, ctx = (4, 8, 2, 64, 16, 256) if quick else (32, 32, 8, 128, 16, 2048)
    nb = B * ctx // bs
    q = torch.randn(B, H, D, generator=g).to(dt).to(dev)
    kc = torch.randn(nb, bs, Hkv, D, generator=g).to(dt).to(dev)
    vc = torch.randn(nb, bs, Hkv, D, generator=g).to(dt).to(dev)
    tables = torch.randperm(nb, generator=g).reshape(B, ctx // bs).int().to(dev)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    row(
        f"paged_attention_decode bf16 B={B} H={H}/{Hkv} D={D} ctx={ctx}",
        2 * kc.numel() * 2,
        lambda: ns.paged_attention_decode(q, kc, vc, tables, lens, D**-0.5, None),
        lambda: reference.paged_attention_decode(q, kc, vc, tables, lens, D**-0.5),
    )

    n_out = n_in = 2048 if quick else 8192
    w = torch.randn(n_out, n_in, generator=g).to(dev) * 0.02
    qw, s = reference.quantize_int8(w)
    p4, s4, z4 = reference.quantize_int4(w, 128)
    wb = w.to(dt)
    s_b = s.to(dt)
    for T in (1, 4):
        x = torch.randn(T, n_in, generator=g).to(dt).to(dev)
        extra = {"torch_bf16_linear": lambda x=x: torch.nn.functional.linear(x, wb)}
        if hasattr(torch, "_weight_int8pack_mm"):
            extra["torch_int8pack_mm"] = lambda x=x: torch._weight_int8pack_mm(x, qw, s_b)
        row(
            f"int8_linear bf16 x, T={T}, {n_out}x{n_in}",
            n_out * n_in,
            lambda x=x: ns.int8_linear(x, qw, s, None),
            lambda x=x: reference.int8_linear(x, qw, s),
            extra,
        )
        row(
            f"int4_linear g128 bf16 x, T={T}, {n_out}x{n_in}",
            n_out * n_in // 2,
            lambda x=x: ns.int4_linear(x, p4, s4, z4, None, 128),
            lambda x=x: reference.int4_linear(x, p4, s4, z4, None, 128),
        )


def print_table() -> None:
    print("\n== kernel comparisons ==")
    for c in RESULT["compare"]:
        detail = c.get("max_rel_err", c.get("mismatches", c.get("error")))
        print(f"{'ok ' if c['ok'] else 'BAD'} {c['kernel']:24s} {c['dtype']:9s} {detail}")
    print("\n== timings (median; x floor = time / (bytes / copy bandwidth)) ==")
    for t in RESULT["timing"]:
        if "error" in t:
            print(f"{t['kernel']}: ERROR {t['error']}")
            continue
        extra = "".join(
            f"  {k[:-3]} {t[k]:.1f} us ({t[k[:-3] + '_x_floor']:.2f}x)"
            for k in t
            if k.endswith("_us") and k not in ("native_us", "torch_us", "floor_us")
        )
        print(
            f"{t['kernel']}\n    native {t['native_us']:.1f} us ({t['native_x_floor']:.2f}x floor, "
            f"{t['native_GBps']:.0f} GB/s)  torch ref {t['torch_us']:.1f} us "
            f"({t['torch_x_floor']:.2f}x){extra}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--deadline", type=float, default=225.0, help="watchdog, seconds")
    parser.add_argument("--build-timeout", type=float, default=150.0)
    parser.add_argument("--no-build", action="store_true", help="use the library already built")
    parser.add_argument("--quick", action="store_true", help="small timing sizes")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    start_watchdog(args.deadline)
    import torch

    from native import build, ops, reference

    RESULT["env"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device}
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            RESULT["errors"].append("torch.cuda.is_available() is False")
            write_result()
            print("no CUDA device visible to torch", flush=True)
            return 2
        RESULT["env"]["gpu"] = torch.cuda.get_device_name()
        RESULT["env"]["capability"] = list(torch.cuda.get_device_capability())
        major, minor = torch.cuda.get_device_capability()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    print(json.dumps(RESULT["env"]), flush=True)
    if not args.no_build:
        build_extension(dev.type, args.build_timeout)
    write_result()
    RESULT["step"] = "load"
    chosen = ops.backend(dev)  # loads the library and runs its self-check
    RESULT["kernel_path"] = {"path": chosen.path, "detail": chosen.detail}
    print(f"kernel path on {dev.type}: {chosen.path} ({chosen.detail})", flush=True)
    ns = chosen.ops
    if ns is None and build.is_current(dev.type):  # self-check failed: still compare kernel by kernel
        try:
            ns = ops._library_ops(dev.type)  # torch.ops.shardserve, CPU library loaded first
        except Exception as exc:  # noqa: BLE001
            RESULT["errors"].append(f"load: {exc}")
    if ns is None:
        RESULT["errors"].append(f"no native library for {dev.type}: {chosen.detail}")
        write_result()
        print_table()
        return 1
    try:
        print("comparisons:", flush=True)
        compare_all(ns, dev, torch, reference)
        write_result()
        print("timings:", flush=True)
        time_all(ns, dev, torch, reference, args.quick or dev.type == "cpu")
    except Exception:  # noqa: BLE001
        RESULT["errors"].append(traceback.format_exc()[-3000:])
    RESULT["step"] = "done"
    RESULT["seconds"] = round(time.perf_counter() - t_start, 1)
    ok = all(c["ok"] for c in RESULT["compare"]) and not RESULT["errors"]
    RESULT["ok"] = ok
    write_result()
    print_table()
    print(f"\n{'ALL OK' if ok else 'FAILURES'} in {RESULT['seconds']} s; wrote {out_path()}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
