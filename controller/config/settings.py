"""The `serve` settings: flags > environment > serving.properties > defaults, merged and validated once
into one frozen ServeSettings (config/properties.py reads the file and the environment)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from controller.acquire.resolver import model_name
from controller.api.auth import TOKEN_ENV
from controller.api.limits import RequestLimits
from controller.config.properties import ServingProperties, cli_overrides, load_properties
from controller.config.worker_tls import worker_tls
from controller.fleet.placement import Layout, visible_gpus
from controller.fleet.replica import ReplicaSpec

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
    limits: RequestLimits = RequestLimits()  # per-request input limits (README "Limits")


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
        tp = props.resolved_tensor_parallel_degree(visible_gpus() if device.startswith("cuda") else 1)
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
    try:
        leader_tls = worker_tls(args, props.executor, cert, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.replicas < 1:
        raise ConfigError(f"--replicas {args.replicas}: must be >= 1")
    if not args.restart_backoff >= 0:
        raise ConfigError(f"--restart-backoff {args.restart_backoff}: must be >= 0 seconds")
    limits = props.limits  # flags > environment > serving.properties > RequestLimits' defaults
    # One gRPC thread per admitted stream (a GenerateStream holds its thread to the end) plus room for
    # health, admin and ModelInfo calls, so that admitted requests never wait for a thread and a full
    # server still answers probes. Threads start on demand: an idle server holds few.
    admitted = max_batch * args.replicas + max_queued
    server = ServerConfig(host=args.host, port=args.port, http_port=args.http_port, max_queued_requests=max_queued,
                          grpc_threads=max(ServerConfig.grpc_threads, admitted + 32),
                          shutdown_grace_s=args.shutdown_grace, device=device, admin_token=token or None,
                          tls_cert=Path(cert) if cert else None, tls_key=Path(key) if key else None,
                          limits=limits)
    try:  # the launch contract validates its fields (worker/config.py), naming the one that is wrong
        spec = ReplicaSpec(model_dir=Path(), block_size=args.block_size, kv_cache_bytes=args.kv_cache_mb << 20,
                           num_kv_blocks=args.num_kv_blocks, max_batch_size=max_batch,
                           max_batch_tokens=args.max_batch_tokens, max_model_len=args.max_model_len, threads=args.threads,
                           prefix_caching=props.enable_prefix_caching, **speculative(props),
                           stage_layers=args.stage_layers, collective_timeout_s=args.collective_timeout,
                           watchdog_s=args.step_watchdog, max_restarts=args.max_restarts,
                           executor=props.executor, placement_strategy=props.placement_strategy,
                           ray_address=getattr(args, "ray_address", None) or "",
                           restart_backoff_s=args.restart_backoff, **leader_tls)
        replica_spec(spec, Path(), layout)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ServeSettings(server=server, spec=spec, layout=layout, source=props.model_source,
                         name=args.name or default_name(props.model_source, env), replicas=args.replicas,
                         properties=props)


DEFAULT_SPECULATIVE_TOKENS = 4  # proposed per step when speculation is on and no count is given


def speculative(props: ServingProperties) -> dict:
    """The WorkerConfig speculative_* fields: on with a method, or with a draft model (method
    'draft'); the count defaults to DEFAULT_SPECULATIVE_TOKENS and alone turns nothing on. A draft
    folder must hold a config.json (it is loaded as is, never downloaded)."""
    method, model, k = props.speculative_method, props.speculative_model, props.num_speculative_tokens
    if method is None and model:
        method = "draft"
    if method is None:
        return {}
    if method == "draft":
        if not model:
            raise ConfigError("--speculative-method draft needs --speculative-model DIR (option.speculative_model)")
        if not (Path(model) / "config.json").is_file():
            raise ConfigError(f"--speculative-model {model}: not a model folder (no config.json)")
        model = str(Path(model).resolve())
    elif model:
        raise ConfigError(f"--speculative-model {model} goes with --speculative-method draft, not {method}")
    return {"speculative_method": method, "speculative_model": model or "",
            "num_speculative_tokens": k or DEFAULT_SPECULATIVE_TOKENS}


LIMIT_FLAGS = {  # flag -> RequestLimits field; also option.<field> / OPTION_<FIELD> / SERVING_<FIELD> (properties.py)
    "--max-prompt-bytes": "max_prompt_bytes", "--max-prompts": "max_prompts",
    "--max-stop-strings": "max_stop_strings", "--max-stop-bytes": "max_stop_bytes",
    "--max-bad-words": "max_bad_words", "--max-bad-word-bytes": "max_bad_word_bytes",
    "--max-message-bytes": "max_message_bytes",
}


def default_name(source: str | None, env: Mapping[str, str] = os.environ) -> str:
    """The served name when --name is not given (acquire/resolver.py's one naming rule)."""
    return model_name(source, sagemaker_model_dir(env))


def add_serve_flags(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "w8a8"],
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
    p.add_argument("--kv-cache-mb", type=int, default=0,
                   help="KV cache per rank, MiB (upper bound; default 0: sized to the machine, see README)")
    p.add_argument("--num-kv-blocks", type=int, default=0, help="exact KV block count (overrides --kv-cache-mb)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_const", const=False, default=None,
                   help="do not reuse the KV cache of shared prompt prefixes (default: option.enable_prefix_caching, on)")
    p.add_argument("--speculative-method", default=None, choices=["ngram", "draft"],
                   help="speculative decoding: ngram (prompt lookup) or draft (a small model, --speculative-model; "
                   "tp=pp=1) (default: option.speculative_method; off)")
    p.add_argument("--speculative-model", default=None, metavar="DIR",
                   help="the draft model's folder, with the same tokenizer (implies --speculative-method draft)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help=f"tokens proposed and verified per step (default {DEFAULT_SPECULATIVE_TOKENS} when on)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--admin-token", default=None, help=f"enables the admin API (default: ${TOKEN_ENV}; none: disabled)")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="serve gRPC and HTTP over TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's private key")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree: ranks per pipeline stage (default 1)")
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel degree: stages (default 1)")
    p.add_argument("--stage-layers", type=_layer_counts, default=(), help="layers per stage, e.g. 3,1 (default balanced)")
    p.add_argument("--collective-timeout", type=float, default=60.0, help="seconds a collective may wait before the group restarts")
    p.add_argument("--step-watchdog", type=float, default=120.0, help="seconds without an engine step (requests waiting) before the group restarts")
    defaults = RequestLimits()
    for flag, attr in LIMIT_FLAGS.items():
        p.add_argument(flag, type=int, default=None, dest=attr,
                       help=f"request input limit (default {getattr(defaults, attr)}; also option.{attr} / "
                       f"SERVING_{attr.upper()}; README 'Limits')")
    p.add_argument("--max-restarts", type=int, default=5, help="group restarts before the model is marked failed")
    p.add_argument("--executor", default=None, choices=["local", "ray"],
                   help="where ranks run: local child processes, or Ray actors across nodes (default: "
                   "option.executor, local; README 'Multi-node')")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --executor ray: the cluster (host:port or auto; default: RAY_ADDRESS or this "
                   "machine's cluster, else a local Ray on 127.0.0.1)")
    p.add_argument("--placement-strategy", default=None, choices=["pack", "spread", "strict-spread"],
                   help="with --executor ray: how a replica's ranks spread over nodes (default: "
                   "option.placement_strategy, pack; strict-spread = one rank per node)")
    for flag, what in (("cert", "the leader's certificate, PEM, at this path on every node (default: --tls-cert)"),
                       ("key", "its private key, likewise (default: --tls-key)"),
                       ("ca", "the CA the controller trusts for it (default: the certificate)"),
                       ("name", "the name the controller checks in it (default: its first DNS name)")):
        p.add_argument(f"--worker-tls-{flag}", default=None, metavar="NAME" if flag == "name" else "PEM",
                       help=f"with --executor ray, TLS to a remote leader: {what}")
    p.add_argument("--restart-backoff", type=float, default=0.5,
                   help="seconds before a group's first restart; doubles per restart, at most 30")


def _layer_counts(raw: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(n) for n in raw.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r}: expected comma-separated layer counts, e.g. 3,1") from None
    return counts
