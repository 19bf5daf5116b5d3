"""`shardserve serve`: the controller process.

settings (flags > environment > serving.properties > defaults; see controller/properties.py) -> serve
gRPC (Generation, Admin, health, reflection) and HTTP (health, metrics, /v1/stats, SageMaker /ping and
/invocations), both over TLS with --tls-cert/--tls-key -> load the model in the background (readiness
is 503 until a replica is ready; a model that cannot load ends the process with an error) -> on SIGTERM
stop admitting, let in-flight requests finish within the grace period, stop the workers, exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller.admin import TOKEN_ENV, AdminService
from controller.demo_model import demo_model_path
from controller.http import HttpServer
from controller.lifecycle import Layout, ModelManager, ModelRecord, ServingRouter
from controller.metrics import Metrics
from controller.properties import (
    PropertiesError,
    ServingProperties,
    cli_overrides,
    load_properties,
)
from controller.replica import ReplicaSpec
from controller.sagemaker import SageMakerRoutes
from controller.service import GenerationService
from controller.sources import ResolvedSource, resolve_model_source
from shardserve.v1 import admin_pb2, admin_pb2_grpc, generate_pb2, generate_pb2_grpc

log = logging.getLogger("shardserve.controller")

# SageMaker puts model files here; tests point this variable at a folder of their own.
SAGEMAKER_MODEL_DIR_ENV = "SHARDSERVE_SAGEMAKER_MODEL_DIR"
DEFAULT_MAX_BATCH_SIZE = 32  # used when neither a flag, the environment nor serving.properties sets it
DEFAULT_MAX_QUEUED_REQUESTS = 256


class ConfigError(ValueError):
    """The server cannot start with this configuration; the message says which setting and why."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("SHARDSERVE_CACHE", Path.home() / ".cache" / "shardserve"))


def sagemaker_model_dir(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get(SAGEMAKER_MODEL_DIR_ENV) or "/opt/ml/model")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8080
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    shutdown_grace_s: float = 30.0
    grpc_threads: int = 128
    device: str = "cpu"  # default device of models loaded through the admin API
    admin_token: str | None = field(default=None, repr=False)  # None: the admin API refuses every call
    tls_cert: Path | None = None  # PEM; with tls_key, gRPC and HTTP are served over TLS only
    tls_key: Path | None = None


@dataclass(frozen=True)
class ServeSettings:
    """Everything `serve` needs, merged from flags, environment and serving.properties (validated)."""

    server: ServerConfig
    spec: ReplicaSpec  # engine settings per replica; model_dir is replaced per model
    layout: Layout
    source: str | None  # None: SageMaker's model folder when it holds a model, else the demo model
    name: str | None
    replicas: int
    properties: ServingProperties


def resolve_model(src: str | None, cache_dir: Path, env: Mapping[str, str] = os.environ,
                  progress=False) -> ResolvedSource:
    """A local model folder for `src` (see controller/sources.py: local folder, s3:// prefix downloaded into
    the cache, Hugging Face cache folder, serving.properties). No source: /opt/ml/model when it holds a
    model (config.json), else the embedded demo model. `progress`: a callable gets (done, total) bytes."""
    sm = sagemaker_model_dir(env)
    if not src and not (sm / "config.json").is_file():
        return ResolvedSource(path=demo_model_path(cache_dir), kind="demo", origin="the embedded demo model")
    return resolve_model_source(src or None, cache_dir, progress=progress, sagemaker_dir=sm)


def replica_spec(base: ReplicaSpec, model_dir: Path, layout: Layout) -> ReplicaSpec:
    """The spec of one replica of `model_dir` laid out as `layout`; refuses what the workers can't run."""
    have = {f.name for f in dataclasses.fields(ReplicaSpec)}
    kw = {"model_dir": model_dir, "dtype": layout.resolved_dtype, "device": layout.device}
    for attr, value, default in (("tensor_parallel", layout.tensor_parallel, 1),
                                 ("pipeline_parallel", layout.pipeline_parallel, 1),
                                 ("quantize", layout.quantize, None)):
        if attr in have:
            kw[attr] = value
        elif value != default:
            raise ValueError(f"{attr}={value}: not supported by this build's workers")
    return dataclasses.replace(base, **kw)


def settings_from_args(args, env: Mapping[str, str]) -> ServeSettings:
    """Merge flags, environment and serving.properties. Raises ConfigError / PropertiesError."""
    props_path = Path(args.properties) if args.properties else None
    if props_path is None:
        sm_props = sagemaker_model_dir(env) / "serving.properties"
        if sm_props.is_file():
            log.info("reading %s (SageMaker's model folder)", sm_props)
            props_path = sm_props
    props = load_properties(props_path, env, cli_overrides(args))
    src = props.sources

    device = args.device
    tp = props.tensor_parallel_degree
    if tp == "max":
        tp = props.resolved_tensor_parallel_degree(_cuda_devices() if device.startswith("cuda") else 1)
    layout = Layout(tensor_parallel=int(tp), pipeline_parallel=props.pipeline_parallel_degree,
                    dtype=props.dtype, quantize=props.quantize, device=device)
    max_batch = props.max_rolling_batch_size if src.get("max_rolling_batch_size") != "default" \
        else DEFAULT_MAX_BATCH_SIZE
    max_queued = props.job_queue_size if src.get("job_queue_size") != "default" else DEFAULT_MAX_QUEUED_REQUESTS
    for name in ("max_input_len", "max_output_len", "batch_size", "max_batch_delay"):
        if src.get(name, "default") != "default":
            log.info("%s=%s (%s) accepted and not used: continuous batching and the model's context apply",
                     name, getattr(props, name), src[name])

    token = args.admin_token if args.admin_token is not None else env.get(TOKEN_ENV)
    cert, key = args.tls_cert, args.tls_key
    if bool(cert) != bool(key):
        raise ConfigError("--tls-cert and --tls-key go together: give both (PEM files) or neither")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    if args.replicas < 1:
        raise ConfigError(f"--replicas {args.replicas}: must be >= 1")
    # One gRPC thread per admitted stream (a GenerateStream holds its thread to the end) plus room for
    # health, admin and ModelInfo calls, so that admitted requests never wait for a thread and a full
    # server still answers probes. Threads start on demand: an idle server holds few.
    admitted = max_batch * args.replicas + max_queued
    server = ServerConfig(host=args.host, port=args.port, http_port=args.http_port, max_queued_requests=max_queued,
                          grpc_threads=max(ServerConfig.grpc_threads, admitted + 32),
                          shutdown_grace_s=args.shutdown_grace, device=device, admin_token=token or None,
                          tls_cert=Path(cert) if cert else None, tls_key=Path(key) if key else None)
    spec = ReplicaSpec(model_dir=Path(), block_size=args.block_size, kv_cache_bytes=args.kv_cache_mb << 20,
                       num_kv_blocks=args.num_kv_blocks, max_batch_size=max_batch,
                       max_batch_tokens=args.max_batch_tokens, max_model_len=args.max_model_len, threads=args.threads,
                       stage_layers=args.stage_layers, collective_timeout_s=args.collective_timeout,
                       watchdog_s=args.step_watchdog, max_restarts=args.max_restarts)
    try:
        replica_spec(spec, Path(), layout)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ServeSettings(server=server, spec=spec, layout=layout, source=props.model_source,
                         name=args.name or default_name(props.model_source, env), replicas=args.replicas,
                         properties=props)


def default_name(source: str | None, env: Mapping[str, str] = os.environ) -> str:
    """The served name when --name is not given: the source's last path part, 'model' for SageMaker's
    model folder, 'demo' for the embedded model."""
    if source and "://" in source:
        return source.rstrip("/").rsplit("/", 1)[-1] or "model"
    if source:
        return Path(source).expanduser().resolve().name or "model"
    return "model" if (sagemaker_model_dir(env) / "config.json").is_file() else "demo"


def _cuda_devices() -> int:
    import torch  # only for tensor_parallel_degree=max on cuda

    return torch.cuda.device_count()


class Controller:
    def __init__(self, config: ServerConfig, cache_dir: Path, spec: ReplicaSpec | None = None):
        self.config = config
        self.cache_dir = cache_dir
        self.base_spec = spec or ReplicaSpec(model_dir=Path())
        self.router = ServingRouter()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="shardserve-"))
        self.metrics = Metrics()
        self.health = health.HealthServicer()
        self.models = ModelManager(self.router, self.metrics, self.runtime_dir,
                                   resolve=lambda src, progress: resolve_model(src, cache_dir, progress=progress),
                                   spec_for=lambda path, layout: replica_spec(self.base_spec, path, layout),
                                   cache_dir=cache_dir,
                                   max_queued_requests=config.max_queued_requests,
                                   grace_s=config.shutdown_grace_s, on_accepting=self._set_serving)
        self.server: grpc.Server | None = None
        self.http: HttpServer | None = None
        self.stopped = threading.Event()

    def load_model(self, name: str, source: str | None, layout: Layout, replicas: int = 1) -> ModelRecord:
        """Load and wait until every replica is ready; raises RuntimeError when the model failed."""
        rec = self.models.load(name, source or "", layout, replicas)
        self.models.wait_settled(rec, None, lambda: not self.stopped.is_set())
        if rec.state == "failed":
            raise RuntimeError(f"model {name!r} failed to load: {rec.error}")
        return rec

    def _set_serving(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for svc in ("", generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name):
            self.health.set(svc, status)

    def poll_stats(self, interval_s: float = 1.0) -> None:
        """Engine stats of every replica into the metrics, every interval (a daemon thread)."""
        while not self.stopped.wait(interval_s):
            for entry in list(self.router.models.values()):
                for r in entry.replicas:
                    st = r.refresh_status()
                    if st is not None and st.HasField("stats"):
                        self.metrics.set_engine_stats(entry.name, r.name, st.stats)

    def _tls(self) -> tuple[grpc.ServerCredentials | None, ssl.SSLContext | None]:
        c = self.config
        if not c.tls_cert:
            return None, None
        cert, key = c.tls_cert.read_bytes(), c.tls_key.read_bytes()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(c.tls_cert), str(c.tls_key))
        return grpc.ssl_server_credentials([(key, cert)]), ctx

    def start_servers(self) -> None:
        c = self.config
        # gRPC's blocking iterators (each controller->worker stream, one thread each) wake every
        # grpc._common.MAXIMUM_WAIT_TIMEOUT (0.1 s) only so that signal handlers can run; at 32 streams
        # that polling was most of the controller's CPU (bench/profile.py: Python threads 25.7 of 30.4 CPU s,
        # blocked in that loop in nearly every py-spy sample).
        # Signals here reach the main thread, which waits on an Event, so waking every 2 s loses nothing;
        # a message or a cancellation still wakes the waiting thread at once.
        if hasattr(grpc, "_common") and getattr(grpc._common, "MAXIMUM_WAIT_TIMEOUT", 0) < 2.0:
            grpc._common.MAXIMUM_WAIT_TIMEOUT = 2.0
        creds, ssl_ctx = self._tls()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=c.grpc_threads),
                                  maximum_concurrent_rpcs=c.grpc_threads * 4)
        generate_pb2_grpc.add_GenerationServicer_to_server(GenerationService(self.router, self.record), self.server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self.models, c.admin_token, c.device), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
                 admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        addr = f"{c.host}:{c.port}"
        port = self.server.add_secure_port(addr, creds) if creds else self.server.add_insecure_port(addr)
        if not port:
            raise OSError(f"cannot listen on {addr}")
        self._set_serving(False)
        self.server.start()
        self.http = HttpServer(c.host, c.http_port, ready=self.router.all_ready, metrics=self.metrics,
                               ssl_context=ssl_ctx)
        self.http.add("GET", "/v1/stats", self._stats_route)
        SageMakerRoutes(self.router, self.router.all_ready, self.record).install(self.http)
        self.http.start()
        threading.Thread(target=self.poll_stats, daemon=True, name="stats-poll").start()
        scheme = "TLS" if creds else "plaintext"
        log.info("serving gRPC on %s:%d and HTTP%s on %s:%d (%s); admin API %s", c.host, port,
                 "S" if creds else "", c.host, self.http.port, scheme,
                 "enabled (token)" if c.admin_token else "disabled (no --admin-token)")

    def _stats_route(self, body, headers):
        """Engine stats of every replica, fresh from the workers (JSON)."""
        from google.protobuf.json_format import MessageToDict

        out = {}
        for entry in list(self.router.models.values()):
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
        self.router.closed_reason = "server is shutting down"
        self.router.accepting = False
        self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while time.monotonic() < deadline and any(e.in_flight for e in list(self.router.models.values())):
            time.sleep(0.1)
        self.stopped.set()
        if self.server:
            self.server.stop(grace=1.0).wait()
        self.models.stop_all()
        if self.http:
            self.http.stop()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def run(args) -> int:
    try:
        settings = settings_from_args(args, os.environ)
    except (ConfigError, PropertiesError) as e:
        print(f"shardserve serve: configuration error: {e}", file=sys.stderr)
        return 2
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    ctl = Controller(settings.server, cache_dir, settings.spec)
    term = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: term.set())
    signal.signal(signal.SIGINT, lambda *a: term.set())
    try:
        ctl.start_servers()
        loader = threading.Thread(target=_load_initial, args=(ctl, settings, term), daemon=True, name="initial-load")
        loader.start()
        term.wait()
        if getattr(ctl, "load_error", None):
            return 1
        log.info("shutting down: draining in-flight requests (grace %.0fs)", settings.server.shutdown_grace_s)
    finally:
        ctl.shutdown()
    return 0


def _load_initial(ctl: Controller, settings: ServeSettings, term: threading.Event) -> None:
    """The startup model; failing to load it ends the process (exit 1), as a container runtime expects."""
    try:
        rec = ctl.load_model(settings.name, settings.source, settings.layout, settings.replicas)
    except Exception as e:
        log.error("%s", e)
        ctl.load_error = str(e)
        term.set()
        return
    if rec.path is not None and rec.path.joinpath("DEMO_MODEL").is_file():
        log.info("serving the embedded demo model: random weights, its text is not meaningful")
    if ctl.router.accepting:
        ctl._set_serving(True)


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the controller (and its workers)")
    # Flags that serving.properties / the environment can also set default to None: None = not given.
    p.add_argument("--model", default=None,
                   help="local folder, s3://bucket/prefix/, HF cache folder or hub id "
                   "(default: option.model_id, HF_MODEL_ID, /opt/ml/model, the demo)")
    p.add_argument("--properties", default=None, metavar="FILE",
                   help="a DJLServing serving.properties file (or a folder holding one)")
    p.add_argument("--name", default=None, help="the name clients use (default: the folder name, or 'demo')")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP port: health, metrics, /ping, /invocations")
    p.add_argument("--cache-dir", default=None, help="downloads, partitions, the demo model")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of the linear layers (default: option.quantize, none)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = all cores)")
    p.add_argument("--max-batch-size", type=int, default=None, help=f"sequences per engine step (default {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per engine step")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help=f"admitted beyond the batch before RESOURCE_EXHAUSTED (default {DEFAULT_MAX_QUEUED_REQUESTS})")
    p.add_argument("--max-model-len", type=int, default=0, help="context limit (0 = the model's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache per rank, MiB (upper bound)")
    p.add_argument("--num-kv-blocks", type=int, default=0, help="exact KV block count (overrides --kv-cache-mb)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--admin-token", default=None, help=f"enables the admin API (default: ${TOKEN_ENV}; none: disabled)")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="serve gRPC and HTTP over TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's private key")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree: ranks per pipeline stage (default 1)")
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel degree: stages (default 1)")
    p.add_argument("--stage-layers", type=_layer_counts, default=(), help="layers per stage, e.g. 3,1 (default balanced)")
    p.add_argument("--collective-timeout", type=float, default=60.0, help="seconds a collective may wait before the group restarts")
    p.add_argument("--step-watchdog", type=float, default=120.0, help="seconds without an engine step (requests waiting) before the group restarts")
    p.add_argument("--max-restarts", type=int, default=5, help="group restarts before the model is marked failed")
    p.set_defaults(func=run)


def _layer_counts(raw: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(n) for n in raw.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r}: expected comma-separated layer counts, e.g. 3,1") from None
    return counts
