"""Worker process entry: `python -m worker shardserve-worker --model-dir DIR --socket PATH ...`.

Loads the model into an engine, serves worker.proto on a unix socket, and exits when its parent
(the controller) goes away, even if the parent was SIGKILLed.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

log = logging.getLogger("shardserve.worker")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardserve-worker")
    p.add_argument("role", nargs="?", default="shardserve-worker", help="names the process in ps")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--socket", required=True, help="unix socket path for worker.proto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-bytes", type=int, default=512 << 20)
    p.add_argument("--num-kv-blocks", type=int, default=0)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=0)
    p.add_argument("--parent-pid", type=int, default=0)
    return p.parse_args(argv)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the parent dies (Linux prctl), plus a polling fallback."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)  # parent already gone before prctl took effect

    def watch():
        while True:
            if parent_pid and os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s worker: %(message)s")
    die_with_parent(args.parent_pid)
    if args.threads:
        torch.set_num_threads(args.threads)
    from shardserve.v1 import worker_pb2_grpc
    from worker.engine.build import build_engine
    from worker.engine.engine import EngineConfig
    from worker.service import WorkerService

    config = EngineConfig(
        model_dir=args.model_dir, dtype=args.dtype, device=args.device, block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes, num_kv_blocks=args.num_kv_blocks,
        max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
        max_model_len=args.max_model_len,
    )
    engine = build_engine(config)
    mc = engine.model_config
    info = {
        "architecture": (getattr(mc, "architectures", None) or [mc.model_type])[0],
        "vocab_size": int(mc.vocab_size),
        "encoder_decoder": bool(getattr(mc, "is_encoder_decoder", False)),
        "ranks": [{"rank": 0, "device": args.device, "parameter_bytes": engine.param_bytes,
                   "kv_cache_bytes": engine.kv_cache_bytes}],
    }
    stop = threading.Event()
    loop = threading.Thread(target=engine.run_forever, args=(stop,), daemon=True, name="engine")
    loop.start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(engine, info), server)
    server.add_insecure_port(f"unix:{args.socket}")
    server.start()
    log.info("serving on unix:%s", args.socket)

    def on_term(signum, frame):
        stop.set()
        server.stop(grace=1.0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    server.wait_for_termination()
    stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
