"""One prepared GPU check of the serving path: real controller + worker on CUDA (NCCL process group,
world size 1), greedy tokens against transformers on the same GPU, decode speed.

    python3 bench/gpu/serve_check.py              # on the GPU machine (finishes in < 3 minutes)
    python3 bench/gpu/serve_check.py --device cpu # the same harness on CPU (gloo), a dry run

Steps: build a tiny random Llama with its tokenizer (controller.acquire.demo_model) in a temp dir; start
`shardserve serve --model DIR --device cuda --tp 1` as a subprocess on free ports; wait for
readiness; greedy-generate a few prompts over gRPC and compare the token ids with transformers'
greedy generate on the same device (both fp32); time one long stream (decode tokens/s after the first token)
and a batch of concurrent streams (aggregate tokens/s); stop the server with SIGTERM. Writes JSON
to $OUT/gpu_serve.json (./gpu_serve.json when OUT is unset) after every step, so a watchdog exit
still leaves what was measured. Every wait has a timeout; exit code 0 when all tokens matched.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RESULT: dict = {"step": "start", "errors": []}
_lock = threading.Lock()
_server: subprocess.Popen | None = None

PROMPTS = ["The license grants", "Copyright holders may", "Permission is hereby granted"]


def out_path() -> Path:
    return Path(os.environ["OUT"]) / "gpu_serve.json" if os.environ.get("OUT") else Path("gpu_serve.json")


def write_result() -> None:
    with _lock:
        path = out_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(RESULT, indent=1, default=str) + "\n")


def stop_server() -> None:
    if _server is not None and _server.poll() is None:
        _server.kill()  # the workers follow (parent-death signal)
        try:
            _server.wait(10)
        except subprocess.TimeoutExpired:
            pass


def start_watchdog(seconds: float) -> None:
    def fire() -> None:
        RESULT["errors"].append(f"watchdog: step '{RESULT['step']}' still running after {seconds:.0f} s")
        print(f"WATCHDOG: giving up in step {RESULT['step']!r}", flush=True)
        write_result()
        stop_server()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(name: str) -> None:
    RESULT["step"] = name
    print(f"[serve_check] {name}", flush=True)
    write_result()


def build_model(out: Path) -> Path:
    from controller.acquire.demo_model import build_demo_model

    return build_demo_model(out)


def start_server(model_dir: Path, device: str, tp: int, cache: Path, timeout: float) -> tuple[str, Path]:
    global _server
    port, http_port = free_port(), free_port()
    log = cache / "server.log"
    cmd = [sys.executable, "-m", "controller.cli", "serve", "--model", str(model_dir), "--device", device,
           "--tp", str(tp), "--dtype", "fp32", "--port", str(port), "--http-port", str(http_port), "--cache-dir", str(cache),
           "--max-batch-size", "16", "--kv-cache-mb", "256", "--collective-timeout", "60",
           "--shutdown-grace", "5"]
    RESULT["server_cmd"] = " ".join(cmd)
    _server = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                   filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        if _server.poll() is not None:
            raise RuntimeError(f"server exited with {_server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health/ready", timeout=2) as r:
                if r.status == 200:
                    RESULT["server_ready_s"] = round(time.monotonic() - t0, 2)
                    return f"127.0.0.1:{port}", log
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def served_tokens(address: str, prompts: list[str], n: int, timeout: float) -> list[list[int]]:
    import grpc

    from shardserve.v1 import generate_pb2 as gpb
    from shardserve.v1 import generate_pb2_grpc as gpb_grpc

    with grpc.insecure_channel(address) as ch:
        stub = gpb_grpc.GenerationStub(ch)
        params = gpb.GenerationParameters(max_new_tokens=n, min_new_tokens=n, ignore_eos=True)
        out = stub.Generate(gpb.GenerateRequest(prompts=prompts, parameters=params), timeout=timeout)
    return [list(o.token_ids) for o in out.outputs]


def hf_tokens(model_dir: Path, prompts: list[str], n: int, device: str) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    from controller.tokenizer import Codec

    codec = Codec(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([codec.encode(p)], device=device)
            seq = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)
            outs.append(seq[0, ids.shape[1]:].tolist())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return outs


def time_stream(address: str, n: int, timeout: float) -> dict:
    """One stream of n tokens: time to first token and decode tokens/s after it."""
    import grpc

    from shardserve.v1 import generate_pb2 as gpb
    from shardserve.v1 import generate_pb2_grpc as gpb_grpc

    with grpc.insecure_channel(address) as ch:
        stub = gpb_grpc.GenerationStub(ch)
        params = gpb.GenerationParameters(max_new_tokens=n, min_new_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        first = last = None
        count = 0
        for _ in stub.GenerateStream(gpb.GenerateStreamRequest(prompt="Timing this stream", parameters=params),
                                     timeout=timeout):
            last = time.perf_counter()
            first = first or last
            count += 1
    decode_s = (last - first) if count > 1 else float("nan")
    return {"tokens": count, "ttft_ms": round((first - t0) * 1e3, 2),
            "decode_tokens_per_s": round((count - 1) / decode_s, 1) if count > 1 else None,
            "tpot_ms": round(decode_s / (count - 1) * 1e3, 3) if count > 1 else None}


def time_batch(address: str, streams: int, n: int, timeout: float) -> dict:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(streams) as pool:
        futs = [pool.submit(served_tokens, address, [f"Concurrent request {i}"], n, timeout) for i in range(streams)]
        total = sum(len(f.result(timeout=timeout)[0]) for f in futs)
    wall = time.perf_counter() - t0
    return {"streams": streams, "tokens": total, "wall_s": round(wall, 3), "tokens_per_s": round(total / wall, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="serve_check")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=24, help="tokens compared with transformers")
    p.add_argument("--stream-tokens", type=int, default=256, help="tokens of the timed stream")
    p.add_argument("--batch", type=int, default=8, help="concurrent streams of the throughput run")
    p.add_argument("--budget", type=float, default=170.0, help="seconds before the watchdog gives up")
    a = p.parse_args(argv)
    start_watchdog(a.budget)
    t_start = time.monotonic()
    RESULT.update({"device": a.device, "tp": a.tp, "python": sys.version.split()[0]})
    ok = False
    tmp = Path(tempfile.mkdtemp(prefix="shardserve-gpu-check-"))
    try:
        step("environment")
        import torch

        RESULT["torch"] = torch.__version__
        if a.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available to torch")
            RESULT["gpu"] = torch.cuda.get_device_name(0)
            try:
                RESULT["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
            except Exception as e:  # noqa: BLE001 - informational only
                RESULT["nccl"] = f"unknown ({e})"
        step("build model")
        model_dir = build_model(tmp / "model")
        step("start server")
        address, log = start_server(model_dir, a.device, a.tp, tmp, timeout=max(30.0, a.budget * 0.45))
        step("served greedy tokens")
        ours = served_tokens(address, PROMPTS, a.new_tokens, timeout=60)
        step("transformers greedy tokens")
        ref = hf_tokens(model_dir, PROMPTS, a.new_tokens, "cuda:0" if a.device.startswith("cuda") else "cpu")
        compare = []
        for prompt, o, r in zip(PROMPTS, ours, ref):
            first_diff = next((i for i, (x, y) in enumerate(zip(o, r)) if x != y), None)
            compare.append({"prompt": prompt, "match": o == r, "first_difference": first_diff,
                            "ours": o, "transformers": r})
        RESULT["compare"] = compare
        ok = all(c["match"] for c in compare)
        step("time one stream")
        RESULT["stream"] = time_stream(address, a.stream_tokens, timeout=60)
        step("time a batch")
        RESULT["batch"] = time_batch(address, a.batch, 64, timeout=60)
        step("stop server (SIGTERM)")
        _server.send_signal(signal.SIGTERM)
        RESULT["server_exit_code"] = _server.wait(30)
        text = log.read_text()
        RESULT["rank_log"] = [line for line in text.splitlines() if "parameter bytes" in line or "joined" in line][:8]
        RESULT["nccl_process_group"] = "joined (nccl)" in text
    except Exception as e:  # noqa: BLE001 - everything goes into the JSON
        RESULT["errors"].append(f"{RESULT['step']}: {e}\n{traceback.format_exc()}")
        ok = False
    finally:
        stop_server()
        shutil.rmtree(tmp, ignore_errors=True)
        RESULT["ok"] = ok
        RESULT["step"] = "done"
        RESULT["total_s"] = round(time.monotonic() - t_start, 1)
        write_result()
    print(json.dumps({k: RESULT.get(k) for k in ("ok", "gpu", "server_ready_s", "stream", "batch", "errors")},
                     indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
