"""`shardserve serve`: the controller process.

resolve the model -> launch its replica(s) and wait until ready -> serve gRPC (Generation,
health, reflection) and HTTP (health, metrics) -> on SIGTERM stop admitting, let in-flight
requests finish within the grace period, stop the workers, exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller.demo_model import demo_model_path
from controller.http import HttpServer
from controller.metrics import Metrics
from controller.replica import Replica, ReplicaSpec
from controller.router import ModelEntry, Router
from controller.service import GenerationService
from controller.tokenizer import Codec
from shardserve.v1 import generate_pb2, generate_pb2_grpc

log = logging.getLogger("shardserve.controller")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SHARDSERVE_CACHE", Path.home() / ".cache" / "shardserve"))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8080
    max_queued_requests: int = 256
    shutdown_grace_s: float = 30.0
    grpc_threads: int = 128


def resolve_model(src: str | None, cache_dir: Path) -> tuple[Path, str]:
    """(local model folder, served name)."""
    if not src:
        return demo_model_path(cache_dir), "demo"
    path = Path(src).expanduser()
    if "://" in src:
        raise ValueError(f"model source {src!r}: only local folders are supported by this build")
    if not path.is_dir():
        raise FileNotFoundError(f"model source {src!r}: no such folder")
    return path.resolve(), path.resolve().name


class Controller:
    def __init__(self, config: ServerConfig, cache_dir: Path):
        self.config = config
        self.cache_dir = cache_dir
        self.router = Router()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="shardserve-"))
        self.metrics = Metrics()
        self.health = health.HealthServicer()
        self.server: grpc.Server | None = None
        self.http: HttpServer | None = None
        self.stopped = threading.Event()

    def load_model(self, name: str, spec: ReplicaSpec, replicas: int = 1) -> ModelEntry:
        codec = Codec(spec.model_dir)
        reps = [Replica(f"{name}-{i}", spec, self.runtime_dir, on_event=self._replica_event) for i in range(replicas)]
        for r in reps:
            r.model_name = name
            r.start()
            for phase in r.status.load_phases:
                self.metrics.observe_load_phase(name, r.name, phase.phase, phase.seconds)
        st = reps[0].status
        entry = ModelEntry(name=name, codec=codec, replicas=reps, max_model_len=st.max_model_len,
                           vocab_size=st.vocab_size, max_queued_requests=self.config.max_queued_requests,
                           max_batch_size=spec.max_batch_size, encoder_decoder=st.encoder_decoder)
        self.router.add(entry)
        return entry

    def _replica_event(self, event: str, replica: Replica) -> None:
        model = getattr(replica, "model_name", replica.name)
        if event in ("up", "down"):
            self.metrics.set_worker_up(model, replica.name, 0, event == "up")
        elif event == "restart":
            self.metrics.inc_worker_restarts(model, replica.name)

    def poll_stats(self, interval_s: float = 1.0) -> None:
        """Engine stats of every replica into the metrics, every interval (a daemon thread)."""
        while not self.stopped.wait(interval_s):
            for entry in list(self.router.models.values()):
                for r in entry.replicas:
                    st = r.refresh_status()
                    if st is not None and st.HasField("stats"):
                        self.metrics.set_engine_stats(entry.name, r.name, st.stats)

    def start_servers(self) -> None:
        c = self.config
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=c.grpc_threads),
                                  maximum_concurrent_rpcs=c.grpc_threads * 4)
        generate_pb2_grpc.add_GenerationServicer_to_server(GenerationService(self.router, self.record), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        port = self.server.add_insecure_port(f"{c.host}:{c.port}")
        if not port:
            raise OSError(f"cannot listen on {c.host}:{c.port}")
        self.server.start()
        self.http = HttpServer(c.host, c.http_port, ready=self.router.any_ready, metrics=self.metrics)
        self.http.add("GET", "/v1/stats", self._stats_route)
        self.http.start()
        threading.Thread(target=self.poll_stats, daemon=True, name="stats-poll").start()
        for svc in ("", names[0]):
            self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving gRPC on %s:%d and HTTP on %s:%d", c.host, port, c.host, self.http.port)

    def _stats_route(self, body, headers):
        """Engine stats of every replica, fresh from the workers (JSON)."""
        from google.protobuf.json_format import MessageToDict

        out = {}
        for entry in self.router.models.values():
            reps = {}
            for r in entry.replicas:
                st = r.refresh_status()
                reps[r.name] = {"state": r.state, "restarts": r.restarts, "outstanding": r.outstanding,
                                "stats": MessageToDict(st.stats, always_print_fields_with_no_presence=True)
                                if st else None}
            out[entry.name] = {"in_flight": entry.in_flight, "replicas": reps}
        return 200, "application/json", json.dumps(out).encode()

    def record(self, rec) -> None:
        if self.metrics is not None:
            self.metrics.observe_request(rec)

    def shutdown(self) -> None:
        """Stop admitting, drain in-flight requests (up to the grace period), stop everything."""
        self.router.accepting = False
        self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while time.monotonic() < deadline and any(e.in_flight for e in self.router.models.values()):
            time.sleep(0.1)
        if self.server:
            self.server.stop(grace=1.0).wait()
        for entry in self.router.models.values():
            for r in entry.replicas:
                r.stop()
        if self.http:
            self.http.stop()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self.stopped.set()


def spec_from_args(args, model_dir: Path) -> ReplicaSpec:
    return ReplicaSpec(model_dir=model_dir, dtype=args.dtype, device=args.device, block_size=args.block_size,
                       kv_cache_bytes=args.kv_cache_mb << 20, num_kv_blocks=args.num_kv_blocks,
                       max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                       max_model_len=args.max_model_len, threads=args.threads)


def run(args) -> int:
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    model_dir, name = resolve_model(args.model, cache_dir)
    config = ServerConfig(host=args.host, port=args.port, http_port=args.http_port,
                          max_queued_requests=args.max_queued_requests, shutdown_grace_s=args.shutdown_grace)
    ctl = Controller(config, cache_dir)
    term = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: term.set())
    signal.signal(signal.SIGINT, lambda *a: term.set())
    try:
        ctl.load_model(args.name or name, spec_from_args(args, model_dir), replicas=args.replicas)
        ctl.start_servers()
        if model_dir.joinpath("DEMO_MODEL").is_file():
            log.info("serving the embedded demo model: random weights, its text is not meaningful")
        term.wait()
        log.info("shutting down: draining in-flight requests (grace %.0fs)", config.shutdown_grace_s)
    finally:
        ctl.shutdown()
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the controller (and its workers)")
    p.add_argument("--model", default=None, help="a local Hugging Face model folder (default: the demo model)")
    p.add_argument("--name", default=None, help="the name clients use (default: the folder name, or 'demo')")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP port: health, metrics")
    p.add_argument("--cache-dir", default=None, help="downloads, partitions, the demo model")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = all cores)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences per engine step")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per engine step")
    p.add_argument("--max-queued-requests", type=int, default=256, help="admitted beyond the batch before RESOURCE_EXHAUSTED")
    p.add_argument("--max-model-len", type=int, default=0, help="context limit (0 = the model's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache per rank, MiB (upper bound)")
    p.add_argument("--num-kv-blocks", type=int, default=0, help="exact KV block count (overrides --kv-cache-mb)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.set_defaults(func=run)
