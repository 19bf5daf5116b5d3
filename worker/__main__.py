"""Worker process entry: `python -m worker shardserve-worker --model-dir DIR --socket PATH ...`.

One process per rank. Every rank joins the replica's process group (with --master-port), loads
its own slice of the weights and runs its part of every step. Rank 0 (the leader) also owns the
scheduler and KV block manager, serves worker.proto on a unix socket, and broadcasts each step's
plan; the other ranks only follow (no gRPC). Every rank exits when its parent (the controller)
goes away, even if the parent was SIGKILLed, and when a collective fails or times out.
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
    p.add_argument("--socket", default="", help="unix socket path for worker.proto (rank 0)")
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
    p.add_argument("--rank", type=int, default=0, help="global rank = pp_rank * tp + tp_rank; 0 leads")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    p.add_argument("--master-port", type=int, default=0, help="rendezvous port on 127.0.0.1 (0 = no process group)")
    p.add_argument("--collective-timeout", type=float, default=60.0, help="seconds before a collective fails")
    p.add_argument("--stage-layers", default="", help="layers per pipeline stage, e.g. 3,2 (default balanced)")
    p.add_argument("--quantize", default="", choices=["", "int8", "int4"], help="weight-only quantization of the linear layers")
    p.add_argument("--cpus", default="", help="CPU cores this rank may use, e.g. 0,1 (default: all)")
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


def fatal_exit(msg: str) -> None:
    """A broken process group: say why, then leave at once (the controller restarts the group)."""
    log.error("%s", msg)
    logging.shutdown()
    os._exit(3)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker[{args.rank}]: %(message)s")
    die_with_parent(args.parent_pid)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    if args.threads:
        torch.set_num_threads(args.threads)
    from shardserve.v1 import worker_pb2_grpc
    from worker import NATIVE_WARMUP_EXIT
    from worker.distributed import destroy_distributed, init_distributed
    from worker.engine.build import NativeWarmupError, build_engine
    from worker.engine.engine import EngineConfig
    from worker.engine.pipeline import exchange_rank_facts, follower_loop, leader_loop, stop_followers
    from worker.service import WorkerService

    if args.master_port:
        if args.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(args.device))
        stages = tuple(int(n) for n in args.stage_layers.split(",")) if args.stage_layers else ()
        init_distributed(args.rank, args.tp, args.pp, args.master_port,
                         backend="nccl" if args.device.startswith("cuda") else "gloo",
                         timeout_s=args.collective_timeout, stage_layers=stages, device=args.device)
    config = EngineConfig(
        model_dir=args.model_dir, dtype=args.dtype, device=args.device, block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes, num_kv_blocks=args.num_kv_blocks,
        max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
        max_model_len=args.max_model_len, quantize=args.quantize or None,
    )
    try:
        engine = build_engine(config)
    except NativeWarmupError as e:
        log.error("%s; exiting with code %d so that the controller restarts every rank on the torch path",
                  e, NATIVE_WARMUP_EXIT)
        logging.shutdown()
        os._exit(NATIVE_WARMUP_EXIT)
    engine.runner.on_fatal = fatal_exit
    log.info("rank %d holds %.2f MB of parameters and %.2f MB of KV cache (%d threads)", args.rank,
             engine.param_bytes / 1e6, engine.kv_cache_bytes / 1e6, torch.get_num_threads())
    if args.rank != 0:
        code = follower_loop(engine.runner, (engine.param_bytes, engine.kv_cache_bytes))
        destroy_distributed()
        return code

    facts = exchange_rank_facts(engine.param_bytes, engine.kv_cache_bytes)
    total = sum(p for p, _ in facts)
    for r, (pb, kb) in enumerate(facts):
        log.info("rank %d: parameter bytes %d (%.1f%% of %d over %d ranks), KV cache bytes %d",
                 r, pb, 100.0 * pb / max(1, total), total, len(facts), kb)
    mc = engine.model_config
    info = {
        "architecture": (getattr(mc, "architectures", None) or [mc.model_type])[0],
        "vocab_size": int(mc.vocab_size),
        "encoder_decoder": bool(getattr(mc, "is_encoder_decoder", False)),
        "tp": args.tp,
        "pp": args.pp,
        "kernel_path": engine.kernel_path,
        "ranks": [{"rank": r, "device": args.device if r == 0 else "", "parameter_bytes": pb,
                   "kv_cache_bytes": kb} for r, (pb, kb) in enumerate(facts)],
    }
    stop = threading.Event()
    heartbeat_s = max(0.2, min(2.0, args.collective_timeout / 4))

    def engine_thread():
        leader_loop(engine, stop, heartbeat_s)
        stop_followers()

    loop = threading.Thread(target=engine_thread, daemon=True, name="engine")
    loop.start()
    # one thread per request the controller has routed here (each Generate stream holds one to its end);
    # threads start on demand, so the cap costs nothing until that many requests are in flight
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(1024, 8 * args.max_batch_size)),
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
    loop.join(timeout=5.0)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
