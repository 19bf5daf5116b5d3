"""Worker process entry: `python -m worker ROLE --config JSON` (ROLE names the process in ps; JSON is
one worker/config.py WorkerConfig, this rank's copy, validated here once).

One process per rank. Every rank joins the replica's process group (with --master-port), loads
its own slice of the weights and runs its part of every step. Rank 0 (the leader) also owns the
scheduler and KV block manager, serves worker.proto on a unix socket (or, placed by Ray on another
host, on its node's address: TCP, same token check, TLS with tls_cert/tls_key), and broadcasts each step's
plan; the other ranks only follow (no gRPC). Every rank exits when its parent (the controller)
goes away, even if the parent was SIGKILLed, and when a collective fails or times out.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import importlib
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
import torch

from worker.auth import TokenCheck, server_credentials
from worker.config import COLLECTIVE, NATIVE_WARMUP, TOKEN_ENV, ConfigError, WorkerConfig, WorkerReport

log = logging.getLogger("shardserve.worker")


def parse_args(argv=None) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="shardserve-worker")
    p.add_argument("role", nargs="?", default="shardserve-worker", help="names the process in ps")
    p.add_argument("--config", required=True, help="this rank's WorkerConfig as JSON (worker/config.py)")
    args = p.parse_args(argv)
    try:
        config = WorkerConfig.from_json(args.config)
    except ConfigError as e:
        p.error(str(e))
    token = os.environ.pop(TOKEN_ENV, "")  # not inherited by anything this process starts
    return dataclasses.replace(config, auth_token=token) if token else config


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


_config: WorkerConfig | None = None  # this process's, for fatal_exit


def fail(failure: str, msg: str, code: int = 3) -> None:
    """Say why (log and, for the controller, a WorkerReport), then leave at once."""
    log.error("%s", msg)
    if _config is not None and _config.report_path:
        try:
            WorkerReport(rank=_config.rank, failure=failure, message=msg).write(_config.report_path)
        except OSError as e:
            log.error("cannot write the failure report %s: %s", _config.report_path, e)
    logging.shutdown()
    os._exit(code)


def fatal_exit(msg: str) -> None:
    """A broken process group (the controller restarts the group)."""
    fail(COLLECTIVE, msg)


def main(argv=None) -> int:
    global _config
    args = _config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker[{args.rank}]: %(message)s")
    die_with_parent(args.parent_pid)
    if args.cpus:
        os.sched_setaffinity(0, set(args.cpus))
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.native_kernels:  # read by native/ops on first use
        os.environ["SHARDSERVE_NATIVE"] = "0"
    for hook in args.test_hooks:
        importlib.import_module(hook)
    try:  # before the weights load: a missing certificate fails the start at once
        tls = server_credentials(args.tls_cert, args.tls_key) if args.rank == 0 and args.address else None
    except ValueError as e:
        log.error("%s", e)
        return 2
    from shardserve.v1 import worker_pb2_grpc
    from worker.distributed import destroy_distributed, init_distributed
    from worker.engine.build import NativeWarmupError, build_engine
    from worker.engine.engine import EngineConfig
    from worker.engine.pipeline import exchange_rank_facts, follower_loop, leader_loop, stop_followers
    from worker.service import WorkerService

    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    if args.master_port and args.world_size > 1:  # alone, a rank needs no group: no rendezvous, no per-step broadcast
        init_distributed(args.rank, args.tp, args.pp, args.master_port,
                         backend="nccl" if args.device.startswith("cuda") else "gloo",
                         timeout_s=args.collective_timeout_s, stage_layers=args.stage_layers, device=args.device,
                         master_addr=args.master_addr)
    try:
        engine = build_engine(EngineConfig(**args.worker_fields()))
    except NativeWarmupError as e:
        fail(NATIVE_WARMUP, f"{e}; the controller restarts every rank on the torch path", code=4)
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
    heartbeat_s = max(0.2, min(2.0, args.collective_timeout_s / 4))

    # one thread per request the controller has routed here (each Generate stream holds one to its end);
    # threads start on demand, so the cap costs nothing until that many requests are in flight
    # over TCP the controller pings every few seconds (a vanished host shows as a broken call): allow it
    pings = [("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_ping_interval_without_data_ms", 1000),
             ("grpc.http2.max_ping_strikes", 0)] if args.address else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(1024, 8 * args.max_batch_size)),
                         options=[("grpc.max_receive_message_length", 64 << 20), *pings],
                         interceptors=[TokenCheck(args.auth_token)] if args.auth_token else [])
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(engine, info), server)
    where = args.address or f"unix:{args.socket}"
    if not (server.add_secure_port(where, tls) if tls else server.add_insecure_port(where)):
        fail(COLLECTIVE, f"cannot listen on {where}")
    server.start()
    log.info("serving on %s%s", where, " (TLS)" if tls else "")

    def on_term(signum, frame):
        stop.set()
        server.stop(grace=1.0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # The engine runs on the main thread, the one that loaded the model: every torch op of this
    # process then runs from one OpenMP team. A second calling thread gets a second team, libgomp
    # then manages more threads than cores and stops spinning between parallel regions, and every
    # small GEMM pays a futex wake-up (2 cores, the T5 bench: decode step 13 -> 25 ms).
    try:
        leader_loop(engine, stop, heartbeat_s)
        stop_followers()
    finally:
        server.stop(grace=1.0).wait()
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
