"""`shardserve serve`: the controller process.

settings (flags > environment > serving.properties > defaults; see controller/config/properties.py) -> serve
gRPC (Generation, Admin, health, reflection) and HTTP (uvicorn in its own thread: health, metrics,
/v1/stats, SageMaker /ping and /invocations, OpenAI /v1/models, /v1/completions, /v1/chat/completions),
both over TLS with --tls-cert/--tls-key -> load the model in the background (readiness
is 503 until a replica is ready; a model that cannot load ends the process with an error) -> on SIGTERM
stop admitting, let in-flight requests finish within the grace period, stop the workers, exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller.acquire.resolver import ResolvedSource, resolve_model_source
from controller.api.admin import AdminService
from controller.api.service import GenerationService
from controller.config.properties import PropertiesError
from controller.config.settings import (
    ConfigError,
    ServerConfig,
    ServeSettings,
    add_serve_flags,
    default_cache_dir,
    replica_spec,
    sagemaker_model_dir,
    settings_from_args,
)
from controller.fleet.lifecycle import ModelManager, ModelRecord
from controller.fleet.placement import Layout
from controller.fleet.replica import ReplicaSpec
from controller.fleet.router import ServingRouter
from controller.metrics.prometheus import Metrics
from shardserve.v1 import admin_pb2, admin_pb2_grpc, generate_pb2, generate_pb2_grpc

if TYPE_CHECKING:
    from controller.api.http import HttpServer

log = logging.getLogger("shardserve.controller")


def resolve_model(src: str | None, cache_dir: Path, env: Mapping[str, str] = os.environ,
                  progress=False, partition_on_nodes: bool = False) -> ResolvedSource:
    """A local model folder for `src` (see controller/acquire/resolver.py: local folder, s3:// prefix downloaded into
    the cache, Hugging Face cache folder, serving.properties). No source: /opt/ml/model when it holds a
    model (config.json), else the embedded demo model. `progress`: a callable gets (done, total) bytes.
    `partition_on_nodes` (the Ray executor): an S3 partition's ranks fetch their own rank files."""
    return resolve_model_source(src or None, cache_dir, progress=progress, sagemaker_dir=sagemaker_model_dir(env),
                                partition_on_nodes=partition_on_nodes,
                                demo=True)


class Controller:
    def __init__(self, config: ServerConfig, cache_dir: Path, spec: ReplicaSpec | None = None,
                 chat_template: Path | None = None):
        self.config = config
        self.chat_template = chat_template  # overrides every model's own for /v1/chat/completions
        self.cache_dir = cache_dir
        self.base_spec = spec or ReplicaSpec(model_dir=Path())
        self.router = ServingRouter()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="shardserve-"))  # mode 0700: the worker sockets
        self.metrics = Metrics()
        self.health = health.HealthServicer()
        self.models = ModelManager(self.router, self.metrics, self.runtime_dir,
                                   resolve=lambda src, progress: resolve_model(
                                       src, cache_dir, progress=progress,
                                       partition_on_nodes=self.base_spec.executor == "ray"),
                                   spec_for=lambda path, layout: replica_spec(self.base_spec, path, layout),
                                   cache_dir=cache_dir,
                                   max_queued_requests=config.max_queued_requests,
                                   grace_s=config.shutdown_grace_s, on_accepting=self._set_serving)
        self.server: grpc.Server | None = None
        self.http: HttpServer | None = None
        self.stopped = threading.Event()
        self._health_names: set[str] = set()  # model names ever given a grpc.health status

    def load_model(self, name: str, source: str | None, layout: Layout, replicas: int = 1) -> ModelRecord:
        """Load and wait until every replica is ready; raises RuntimeError when the model failed."""
        rec = self.models.load(name, source or "", layout, replicas)
        self.models.wait_settled(rec, None, lambda: not self.stopped.is_set())
        if rec.state == "failed":
            raise RuntimeError(f"model {name!r} failed to load: {rec.error}")
        return rec

    def _set_serving(self, ok: bool) -> None:
        """grpc.health.v1: "" is liveness (the process is up; NOT_SERVING only while drained or shutting
        down), the Generation service is the server's readiness (/health/ready), and each model's name is
        that model's readiness (admitting, with a ready replica). Also refreshed every poll_stats tick."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        r = self.router
        self.health.set("", serving if ok and r.accepting else not_serving)
        self.health.set(generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
                        serving if ok and r.all_ready() else not_serving)
        names = set(r.names())
        for name in names | self._health_names:
            entry = r.models.get(name)
            up = ok and r.accepting and name in names and name not in r.gate and entry is not None \
                and bool(entry.ready_replicas())
            self.health.set(name, serving if up else not_serving)
        self._health_names = names | self._health_names

    def poll_stats(self, interval_s: float = 1.0) -> None:
        """Engine stats of every replica into the metrics, every interval (a daemon thread)."""
        while not self.stopped.wait(interval_s):
            self._set_serving(self.router.accepting)
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
        size = c.limits.max_message_bytes  # larger messages: RESOURCE_EXHAUSTED from gRPC itself
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=c.grpc_threads),
                                  maximum_concurrent_rpcs=c.grpc_threads * 4,
                                  options=[("grpc.max_receive_message_length", size),
                                           ("grpc.max_send_message_length", size)])
        generate_pb2_grpc.add_GenerationServicer_to_server(
            GenerationService(self.router, self.record, c.limits), self.server)
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
        self._set_serving(True)
        self.server.start()
        # the HTTP side (FastAPI: ~0.2 s of imports) here, not at module level: `run` starts the
        # initial model's workers first, so these imports overlap the workers' start
        from controller.api.http import HttpServer
        from controller.api.openai_routes import OpenAIRoutes
        from controller.api.sagemaker import SageMakerRoutes

        self.http = HttpServer(c.host, c.http_port, ready=self.router.all_ready, metrics=self.metrics,
                               ssl_context=ssl_ctx)
        self.http.add("GET", "/v1/stats", self._stats_route)
        SageMakerRoutes(self.router, self.router.all_ready, self.record, limits=c.limits).install(self.http)
        OpenAIRoutes(self.router, self.record, self.chat_template, limits=c.limits).install(self.http)
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
        if self.base_spec.executor == "ray":  # every actor is killed and placement group removed by now
            from controller.fleet.ray_executor import disconnect

            disconnect()
        if self.http:
            self.http.stop()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def keep_compute_out() -> None:
    """The controller process never loads torch (nor, through it, model code or native kernels):
    from here on `import torch` fails in this process, so a stray import shows at once instead of
    costing every start seconds and hundreds of MB. transformers then takes its torch-free path for
    tokenizers and configs (the only parts the controller uses). Workers are other processes."""
    if "torch" in sys.modules and sys.modules["torch"] is not None:
        log.warning("torch was imported before the controller started; its tokenizers may use it")
        return
    sys.modules["torch"] = None
    logging.getLogger("transformers").addFilter(
        lambda rec: "PyTorch was not found" not in rec.getMessage())  # expected here, not news


def run(args) -> int:
    keep_compute_out()
    try:
        settings = settings_from_args(args, os.environ)
    except (ConfigError, PropertiesError) as e:
        print(f"shardserve serve: configuration error: {e}", file=sys.stderr)
        return 2
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    template = Path(args.chat_template) if getattr(args, "chat_template", None) else None
    if template is not None and not template.is_file():
        print(f"shardserve serve: configuration error: --chat-template {template}: no such file", file=sys.stderr)
        return 2
    if settings.spec.executor == "ray":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports unless asked for
        from controller.fleet.ray_executor import connect

        try:  # here, on the main thread, before our signal handlers: Ray's start-up must not replace them
            connect(settings.spec.ray_address)
        except Exception as e:  # noqa: BLE001 - any failure to reach the cluster stops the start
            print(f"shardserve serve: cannot join the Ray cluster ({settings.spec.ray_address or 'auto/local'}): "
                  f"{e}", file=sys.stderr)
            return 2
    taken = unbindable(settings.server)
    if taken:  # before any worker starts: a start that cannot serve ends at once, with the reason
        print(f"shardserve serve: cannot listen on {taken}", file=sys.stderr)
        return 2
    ctl = Controller(settings.server, cache_dir, settings.spec, chat_template=template)
    term = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: term.set())
    signal.signal(signal.SIGINT, lambda *a: term.set())
    try:
        # the initial model first: its workers import torch and load weights (seconds) while the
        # servers start; readiness stays NOT_SERVING until the model is loaded either way
        loader = threading.Thread(target=_load_initial, args=(ctl, settings, term), daemon=True, name="initial-load")
        loader.start()
        ctl.start_servers()
        term.wait()
        if getattr(ctl, "load_error", None):
            return 1
        log.info("shutting down: draining in-flight requests (grace %.0fs)", settings.server.shutdown_grace_s)
    finally:
        ctl.shutdown()
    return 0


def unbindable(config: ServerConfig) -> str | None:
    """The first of the gRPC and HTTP ports another process holds ("--port HOST:PORT: reason"), else
    None; 0 (any free port) is never taken. A probe bind, closed at once: the servers bind for real
    later (after the initial model's workers have started), and fail there if the port is taken since."""
    for flag, port in (("--port", config.port), ("--http-port", config.http_port)):
        if not port:
            continue
        try:
            infos = socket.getaddrinfo(config.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as e:
            return f"{flag} {config.host}:{port}: {e}"
        for family, kind, proto, _, addr in infos[:1]:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(addr)
                except OSError as e:
                    return f"{flag} {config.host}:{port}: {e.strerror or e}"
    return None


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
    add_serve_flags(p)
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template for /v1/chat/completions, instead of each model's own")
    p.set_defaults(func=run)
