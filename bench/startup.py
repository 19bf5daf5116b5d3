"""Time to ready for a ~300M-parameter Llama: checkpoint vs runtime partition vs ahead-of-time partition
vs plain `transformers.from_pretrained`; plus the peak memory of partitioning.

    python -m bench.startup [--workdir bench-cache/startup] [--repeat 1] [--out bench-results/startup.json]

The model (random weights from a LlamaConfig, the demo tokenizer) is written once into WORKDIR/model.
Every row is a fresh process: `shardserve serve` as a subprocess, timed from spawn until /health/ready
answers 200 (the worker has loaded and run its warm-up request), then one greedy token over gRPC;
`from_pretrained` in a subprocess, timed from spawn to its first generated token. Runtime partition =
controller.acquire.prepare.prepare_model (what serve runs before starting workers) + serve on its result.
All files are in the page cache (read once before timing): this measures CPU and memory work, not disk.
Peak memory is the child's ru_maxrss (os.wait4), beside the same interpreter with the same imports only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
# ~303M parameters: 25 layers x 11.8M + 2 x 4096 x 1024 embeddings (untied), fp32 = 1.21 GB
CONFIG = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=25,
              num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
              tie_word_embeddings=False, rms_norm_eps=1e-5, architectures=["LlamaForCausalLM"])


def build_model(out: Path) -> Path:
    """Random N(0, 0.02) weights written tensor by tensor from a meta-device model's shapes."""
    if (out / "DONE").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from controller.acquire.demo_model import build_tokenizer

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tok = build_tokenizer(out)
    cfg = LlamaConfig(**{**CONFIG, "vocab_size": len(tok)}, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {n: (torch.ones(s) if "norm" in n else torch.randn(s, generator=g) * 0.02) for n, s in shapes.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(out))
    (out / "DONE").write_text(f"{sum(t.numel() for t in tensors.values())} parameters\n")
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_supports(flag: str) -> bool:
    r = subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--help"], capture_output=True, text=True,
                       env=ENV, cwd=ROOT)
    return flag in r.stdout


def time_serve(model: Path, cache: Path, extra: list[str]) -> dict:
    """Spawn `shardserve serve`, wait for /health/ready, one greedy token, stop. Seconds from spawn."""
    import grpc

    from shardserve.v1 import generate_pb2 as gpb
    from shardserve.v1 import generate_pb2_grpc as gpb_grpc

    port, http_port = free_port(), free_port()
    log = cache / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "controller.cli", "serve", "--model", str(model), "--name", "m", "--port",
           str(port), "--http-port", str(http_port), "--cache-dir", str(cache), "--kv-cache-mb", "64",
           "--max-model-len", "512", *extra]
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=fh, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        ready = time.monotonic() - t0
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            gpb_grpc.GenerationStub(ch).Generate(gpb.GenerateRequest(
                model="m", prompts=["Licensed under the"], parameters=gpb.GenerationParameters(max_new_tokens=1)))
        first = time.monotonic() - t0
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        proc.terminate()
        proc.wait(60)
    phases = {}
    for line in metrics.splitlines():
        if line.startswith("shardserve_model_load_seconds{") and 'replica="m-0"' in line:
            phase = line.split('phase="')[1].split('"')[0]
            phases[phase] = round(float(line.rsplit(" ", 1)[1]), 3)
    return {"ready_s": round(ready, 3), "first_token_s": round(first, 3), "worker_phases": phases}


HF_CHILD = """
import sys, time, json
t0 = time.monotonic()
import torch
from transformers import AutoModelForCausalLM
t1 = time.monotonic()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
m.eval()
t2 = time.monotonic()
with torch.no_grad():
    m.generate(torch.tensor([[1, 5, 9, 200, 17]]), max_new_tokens=1, do_sample=False, pad_token_id=0)
t3 = time.monotonic()
print(json.dumps({"import_s": t1 - t0, "from_pretrained_s": t2 - t1, "first_token_s": t3 - t2}))
"""


def child_peak(cmd: list[str]) -> tuple[str, float, dict]:
    """(stdout, seconds from spawn to exit, memory) of one child. memory: peak_rss_bytes (ru_maxrss via
    wait4: anonymous + touched file-mapped pages, e.g. an mmap'd checkpoint) and peak_anon_bytes (RssAnon
    sampled every 10 ms: the memory the process itself allocated; file pages are reclaimable cache)."""
    import threading

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    anon = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            try:
                text = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                return
            for line in text.splitlines():
                if line.startswith("RssAnon:"):
                    anon[0] = max(anon[0], int(line.split()[1]) * 1024)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.stdout.read(), proc.stderr.read()
    done.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}:\n{err.decode()[-3000:]}")
    return out.decode(), time.monotonic() - t0, {"peak_rss_bytes": usage.ru_maxrss * 1024, "peak_anon_bytes": anon[0]}


def time_hf(model: Path) -> dict:
    out, seconds, mem = child_peak([sys.executable, "-c", HF_CHILD, str(model)])
    d = json.loads(out.strip().splitlines()[-1])
    return {"ready_s": round(seconds - d["first_token_s"], 3), "first_token_s": round(seconds, 3),
            "from_pretrained_s": round(d["from_pretrained_s"], 3), **mem}


LOAD_CHILD = """
import sys, time, json
from pathlib import Path
from worker.engine.build import build_engine
from worker.engine.engine import EngineConfig
def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon:")).split()[1]) * 1024
before = anon()
e = build_engine(EngineConfig(model_dir=Path(sys.argv[1]), num_kv_blocks=32, max_model_len=512))
print(json.dumps({**e.stats.load_phases, "anon_after_bytes": anon() - before}))
"""


def time_load(folder: Path) -> dict:
    """build_engine in a fresh process: the worker's load and warm-up phases, and the anonymous memory
    they leave resident (the parameters, unless they are views of a mapped file)."""
    out, _, _ = child_peak([sys.executable, "-c", LOAD_CHILD, str(folder)])
    d = json.loads(out.strip().splitlines()[-1])
    return {"load_s": round(d["load"], 3), "warmup_s": round(d["warmup"], 3), "anon_after_bytes": d["anon_after_bytes"]}


def partition_peak(model: Path, out: Path, tp: int) -> dict:
    """Peak RSS of partitioning rank 0 of `tp` in its own process, beside the imports alone."""
    _, _, base = child_peak([sys.executable, "-c", "import worker.partition_rank, transformers, safetensors.torch"])
    _, seconds, mem = child_peak([sys.executable, "-m", "worker.partition_rank", str(model),
                                   str(out / f"peak-tp{tp}.safetensors"), "--tp", str(tp), "--rank", "0"])
    rank_bytes = (out / f"peak-tp{tp}.safetensors").stat().st_size
    (out / f"peak-tp{tp}.safetensors").unlink()
    return {"tp": tp, "seconds": round(seconds, 3), **mem, "imports_only": base, "rank_file_bytes": rank_bytes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="bench-cache/startup", help="model and partitions (kept between runs)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per row (the fastest is reported)")
    ap.add_argument("--out", default="bench-results/startup.json")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip (hf, tp1, tp2)")
    ap.add_argument("--load-only", action="store_true", help="only the in-process worker load comparison")
    ap.add_argument("--ready-only", action="store_true",
                    help="only the time-to-ready rows (no partitioning peak memory, no in-process load runs)")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    work = Path(a.workdir).absolute()
    t = time.monotonic()
    model = build_model(work / "model")
    n_params = int((model / "DONE").read_text().split()[0])
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(f"model: {n_params / 1e6:.0f}M parameters, {model_bytes / 1e9:.2f} GB fp32 ({time.monotonic() - t:.0f}s)",
          file=sys.stderr)
    for f in model.iterdir():  # page cache warm for every row alike
        f.read_bytes()
    from controller.acquire.partition import partition
    from controller.acquire.prepare import prepare_model

    aot = {1: work / "aot-tp1", 2: work / "aot-tp2"}
    if a.load_only:
        if not (aot[1] / "manifest.json").is_file():
            partition(model, aot[1], tp=1, pp=1)
        loads = worker_load(model, aot[1], max(3, a.repeat))
        print_loads(loads)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"bench": "startup-load", "worker_load": loads}, indent=2) + "\n")
        return 0
    rows: list[dict] = []
    has_tp = serve_supports("--tp")

    def best(name: str, fn, **info) -> None:
        runs = [fn() for _ in range(a.repeat)]
        row = {"row": name, **info, **min(runs, key=lambda r: r["ready_s"])}
        rows.append(row)
        print(f"  {name}: ready {row['ready_s']:.2f}s", file=sys.stderr)

    if "hf" not in skip:
        best("transformers from_pretrained (tp=1)", lambda: time_hf(model))
    if "tp1" not in skip:
        best("serve checkpoint folder (tp=1)", lambda: time_serve(model, Path(tempfile.mkdtemp(dir=work)), []))

    def aot_partition(tp: int) -> float:
        if a.ready_only and (aot[tp] / "manifest.json").is_file():
            return 0.0  # made by an earlier run: not timed again
        t0 = time.monotonic()
        partition(model, aot[tp], tp=tp, pp=1)
        return time.monotonic() - t0

    part_s = {1: aot_partition(1)}
    if "tp1" not in skip:
        best("serve ahead-of-time partition (tp=1)",
             lambda: time_serve(aot[1], Path(tempfile.mkdtemp(dir=work)), []), partition_s_once=round(part_s[1], 3))
    if "tp2" not in skip:
        part_s[2] = aot_partition(2)
        if has_tp:
            def runtime(cold: bool) -> dict:
                cache = Path(tempfile.mkdtemp(dir=work))
                if not cold:
                    prepare_model(str(model), cache, tp=2, progress=False)
                t0 = time.monotonic()
                p = prepare_model(str(model), cache, tp=2, progress=False)
                prep = time.monotonic() - t0
                r = time_serve(p.path, cache, ["--tp", "2"])
                return {**r, "ready_s": round(r["ready_s"] + prep, 3),
                        "first_token_s": round(r["first_token_s"] + prep, 3), "prepare_s": round(prep, 3),
                        "partition": p.partition}

            best("serve checkpoint, runtime partition, cold cache (tp=2)", lambda: runtime(True))
            best("serve checkpoint, runtime partition, cached (tp=2)", lambda: runtime(False))
            best("serve ahead-of-time partition (tp=2)",
                 lambda: time_serve(aot[2], Path(tempfile.mkdtemp(dir=work)), ["--tp", "2"]),
                 partition_s_once=round(part_s[2], 3))
        else:
            print("  serve has no --tp on this build: tp=2 serving rows skipped", file=sys.stderr)
    peaks = [] if a.ready_only else [partition_peak(model, work, tp) for tp in sorted(part_s)]
    loads = [] if a.ready_only else worker_load(model, aot[1], max(3, a.repeat))
    print_table(rows, peaks, n_params, model_bytes, part_s)
    if loads:
        print_loads(loads)
    report = {"bench": "startup", "model": {"parameters": n_params, "bytes": model_bytes, "config": CONFIG},
              "rows": rows, "partition_seconds": part_s, "partition_peak_memory": peaks, "worker_load": loads,
              "host": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version()},
              "serve_has_tp": has_tp}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"load average after: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; wrote {out}")
    for d in work.glob("tmp*"):
        shutil.rmtree(d, ignore_errors=True)
    return 0


def worker_load(model: Path, part: Path, n: int) -> list[dict]:
    loads = []
    for _ in range(n):  # alternating, so a burst of load on the machine hits both alike
        loads += [{"from": "checkpoint", **time_load(model)}, {"from": "partition", **time_load(part)}]
    return loads


def print_loads(loads: list[dict]) -> None:
    print("\nWorker load, world size 1, in a fresh process (build_engine; median of runs):")
    for kind in ("checkpoint", "partition"):
        runs = sorted((r for r in loads if r["from"] == kind), key=lambda r: r["load_s"])
        med = runs[len(runs) // 2]
        print(f"  {kind:<10} load {med['load_s']:.2f}s, warm-up {med['warmup_s']:.2f}s, anonymous memory left "
              f"resident {med['anon_after_bytes'] / 1e6:.0f} MB (load runs: {[r['load_s'] for r in runs]})")


def print_table(rows, peaks, n_params, model_bytes, part_s) -> None:
    print(f"\nTime to ready, {n_params / 1e6:.0f}M-parameter Llama, fp32 ({model_bytes / 1e9:.2f} GB), warm page cache")
    head = f"{'start':<56} {'ready s':>8} {'1st token s':>12} {'worker load s':>14} {'warm-up s':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ph = r.get("worker_phases", {})
        load = f"{ph['load']:.2f}" if "load" in ph else (f"{r['from_pretrained_s']:.2f}" if "from_pretrained_s" in r else "")
        warm = f"{ph['warmup']:.2f}" if "warmup" in ph else ""
        print(f"{r['row']:<56} {r['ready_s']:>8.2f} {r['first_token_s']:>12.2f} {load:>14} {warm:>10}")
    print("\nAhead-of-time partitioning (shardserve partition), one-off cost: "
          + ", ".join(f"tp={tp} {s:.2f}s" for tp, s in part_s.items()))
    print("Peak memory of partitioning one rank in its own process:")
    for p in peaks:
        base = p["imports_only"]["peak_anon_bytes"]
        print(f"  tp={p['tp']} rank 0: anonymous memory peak {p['peak_anon_bytes'] / 1e6:.0f} MB (the imports alone "
              f"{base / 1e6:.0f} MB, so +{(p['peak_anon_bytes'] - base) / 1e6:.0f} MB for the work; ru_maxrss with the "
              f"mapped checkpoint pages {p['peak_rss_bytes'] / 1e6:.0f} MB) writing a {p['rank_file_bytes'] / 1e6:.0f} MB "
              f"rank file of a {model_bytes / 1e6:.0f} MB model")

if __name__ == "__main__":
    sys.exit(main())
