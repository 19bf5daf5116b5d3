"""The launch contract between the controller and a worker rank: one frozen, validated WorkerConfig.

Every default of a worker lives here once. The controller builds one WorkerConfig per replica
(controller/fleet/replica.py: ReplicaSpec adds its supervision settings), copies it per rank with
`dataclasses.replace` (rank, device, threads, cores, sockets) and hands each rank its copy as one JSON
argument (`python -m worker ROLE --config JSON`). The engine's own configs (EngineConfig, SchedulerConfig)
take their fields and defaults from it. A worker that fails in a way the controller must act on writes
a WorkerReport to `report_path` before it exits, instead of a magic exit code.

Torch-free (the controller imports it); worker/ never imports controller/.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

DTYPES = ("fp32", "fp16", "bf16")
# The per-launch token travels in this environment variable, not in the --config argument: a process's
# argv is readable by every user (ps), its environment only by its own user.
TOKEN_ENV = "SHARDSERVE_WORKER_TOKEN"
TOKEN_METADATA = "x-shardserve-worker-token"  # sent by the controller on every worker call
QUANTIZE_METHODS = ("int8", "int4", "w8a8")
SPECULATIVE_METHODS = ("ngram", "draft")  # worker/engine/speculative.py
MAX_SPECULATIVE_TOKENS = 16


class ConfigError(ValueError):
    """A WorkerConfig field with a bad value; the message names the field."""


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: Path  # a Hugging Face folder or a partition (manifest.json)
    # a file on this node into which the controller writes the model's resolved transformers config
    # (worker/model_config.py: no transformers import in the worker); "" = the worker resolves it
    resolved_config: str = ""
    # ---- the engine -----------------------------------------------------------------------------
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    device: str = "cpu"  # cpu | cuda | cuda:N
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int = 0  # per rank, upper bound; 0 = sized to the machine (engine/build.py auto_kv_cache_bytes)
    num_kv_blocks: int = 0  # 0 = derived from kv_cache_bytes
    max_batch_size: int = 32  # rows (sequences, beams) in one step
    max_batch_tokens: int = 2048  # tokens in one step (prefill chunks + decodes)
    max_model_len: int = 0  # 0 = the model config's max_position_embeddings
    prefix_caching: bool = True  # reuse the KV blocks of cached prompt prefixes (block_manager.py)
    quantize: str | None = None  # None | "int8" | "int4" (weight-only) | "w8a8" (int8 weights and per-token activations)
    # speculative decoding (worker/engine/speculative.py): "" = off | "ngram" (prompt lookup) | "draft"
    speculative_method: str = ""
    speculative_model: str = ""  # the draft model's folder (method "draft"; same tokenizer, tp = pp = 1)
    num_speculative_tokens: int = 0  # K: tokens proposed and verified per step (0 with the method off)
    # ---- the replica's layout -------------------------------------------------------------------
    tensor_parallel: int = 1  # ranks per pipeline stage
    pipeline_parallel: int = 1  # pipeline stages
    stage_layers: tuple[int, ...] = ()  # layers per pipeline stage; () = balanced
    collective_timeout_s: float = 60.0  # a collective waiting longer fails and ends the rank
    # ---- this process (set per rank by the controller) -------------------------------------------
    rank: int = 0  # global rank = pp_rank * tp + tp_rank; 0 leads
    threads: int = 0  # torch intra-op threads; 0 = torch's default (the controller gives each rank its share)
    cpus: tuple[int, ...] = ()  # cores this rank may use; () = all
    master_port: int = 0  # rendezvous on master_addr:master_port; 0 = no process group
    master_addr: str = "127.0.0.1"  # rank 0's node address (the Ray executor: another host's)
    socket: str = ""  # unix socket for worker.proto (rank 0)
    address: str = ""  # host:port: rank 0 serves worker.proto over TCP here instead (Ray executor); "" = socket
    # PEM files on the rank's own node: with `address`, rank 0 serves it over TLS only (both or neither; read
    # there at start, so no key material is in the argv or crosses Ray); not used on a unix socket
    tls_cert: str = ""
    tls_key: str = ""
    parent_pid: int = 0  # the controller: the rank exits when it goes away
    native_kernels: bool = True  # False: the torch path only (SHARDSERVE_NATIVE=0)
    prepack_linear: bool = True  # CPU fp32: linear layers through oneDNN, weights reordered at load
    report_path: str = ""  # where the rank writes its WorkerReport before a failure exit
    test_hooks: tuple[str, ...] = ()  # modules imported before the engine is built: tests only, () in production
    # random per launch (controller); the worker refuses calls without it; "" = no check. Not in to_json
    auth_token: str = dataclasses.field(default="", repr=False)

    def __post_init__(self) -> None:
        def fix(name, value):
            object.__setattr__(self, name, value)

        fix("model_dir", Path(self.model_dir))
        if self.quantize == "":
            fix("quantize", None)
        fix("stage_layers", tuple(self.stage_layers))
        fix("cpus", tuple(self.cpus))
        fix("test_hooks", tuple(self.test_hooks))
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"expected one of {', '.join(DTYPES)}")
        _check(self.quantize is None or self.quantize in QUANTIZE_METHODS, "quantize", self.quantize,
               f"expected none or one of {', '.join(QUANTIZE_METHODS)}")
        _check(self.device == "cpu" or self.device == "cuda" or
               (self.device.startswith("cuda:") and self.device[5:].isdigit()), "device", self.device,
               "expected cpu, cuda or cuda:N")
        for name in ("block_size", "max_batch_size", "max_batch_tokens", "tensor_parallel", "pipeline_parallel"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        for name in ("kv_cache_bytes", "num_kv_blocks", "max_model_len", "threads", "master_port", "parent_pid", "rank"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        _check(not self.address or self.address.rpartition(":")[2].isdigit(), "address", self.address,
               "expected host:port")
        _check(bool(self.tls_cert) == bool(self.tls_key), "tls_key" if self.tls_cert else "tls_cert",
               self.tls_key if self.tls_cert else self.tls_cert, "tls_cert and tls_key go together")
        _check(self.collective_timeout_s > 0, "collective_timeout_s", self.collective_timeout_s, "must be > 0")
        self._check_speculative()
        _check(self.rank < self.world_size, "rank", self.rank, f"must be < world size {self.world_size}")
        _check(all(n >= 1 for n in self.stage_layers), "stage_layers", self.stage_layers,
               "expected positive layer counts")  # their number against the stages: the layout check

    def _check_speculative(self) -> None:
        method, k = self.speculative_method, self.num_speculative_tokens
        _check(method in ("",) + SPECULATIVE_METHODS, "speculative_method", method,
               f"expected none or one of {', '.join(SPECULATIVE_METHODS)}")
        _check(0 <= k <= MAX_SPECULATIVE_TOKENS, "num_speculative_tokens", k,
               f"must be in 0..{MAX_SPECULATIVE_TOKENS}")
        _check(bool(method) == (k > 0), "num_speculative_tokens", k,
               "must be > 0 with a speculative_method and 0 without one")
        _check((method == "draft") == bool(self.speculative_model), "speculative_model", self.speculative_model,
               "needed by speculative_method 'draft' and only by it")
        _check(method != "draft" or self.world_size == 1, "speculative_method", method,
               f"a draft model runs at tensor and pipeline parallel degree 1 only (world size {self.world_size}); "
               "use 'ngram' there")

    @property
    def tp(self) -> int:
        return self.tensor_parallel

    @property
    def pp(self) -> int:
        return self.pipeline_parallel

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def worker_fields(self) -> dict:
        """This config's WorkerConfig fields (for a subclass: without its own)."""
        return {f.name: getattr(self, f.name) for f in fields(WorkerConfig)}

    def to_json(self) -> str:
        values = self.worker_fields()
        values.pop("auth_token")  # in TOKEN_ENV: see there
        values["model_dir"] = str(self.model_dir)
        for name in ("stage_layers", "cpus", "test_hooks"):
            values[name] = list(values[name])
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        """Parse and validate; unknown, missing or mistyped fields are ConfigErrors naming the field."""
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"WorkerConfig: not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError("WorkerConfig: expected a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"WorkerConfig.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
        if "model_dir" not in raw:
            raise ConfigError("WorkerConfig.model_dir: missing")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _coerce(name, hints[name], value) for name, value in raw.items()})


def _check(ok: bool, name: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(f"WorkerConfig.{name}={value!r}: {why}")


def _coerce(name: str, hint, value):
    """A JSON value as the field's type, or ConfigError naming the field."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is Path:
        ok, out = isinstance(value, str) and value != "", Path(value) if isinstance(value, str) else None
    elif hint is bool:
        ok, out = isinstance(value, bool), value
    elif hint is int:
        ok, out = isinstance(value, int) and not isinstance(value, bool), value
    elif hint is float:
        ok, out = isinstance(value, (int, float)) and not isinstance(value, bool), float(value) if \
            isinstance(value, (int, float)) else None
    elif hint is str:
        ok, out = isinstance(value, str), value
    elif typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        ok = isinstance(value, list) and all(
            isinstance(v, item) and not isinstance(v, bool) for v in value)
        out = tuple(value) if ok else None
    else:  # pragma: no cover - a field type this parser does not know
        raise ConfigError(f"WorkerConfig.{name}: no JSON form for {hint}")
    if not ok:
        raise ConfigError(f"WorkerConfig.{name}={value!r}: expected {getattr(hint, '__name__', hint)}")
    return out


# ---- how a rank says why it stopped ---------------------------------------------------------------

NATIVE_WARMUP = "native-warmup"  # native kernels failed a process group's warm-up: restart on torch
COLLECTIVE = "collective"  # a collective failed or timed out: the group restarts


@dataclass(frozen=True)
class WorkerReport:
    rank: int
    failure: str  # NATIVE_WARMUP | COLLECTIVE
    message: str

    def write(self, path: str | Path) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self)))
        tmp.replace(path)

    @classmethod
    def read(cls, path: str | Path) -> WorkerReport | None:
        """The report at `path`, or None when there is none (or it is not one)."""
        try:
            return cls.parse(Path(path).read_text())
        except OSError:
            return None

    @classmethod
    def parse(cls, text: str) -> WorkerReport | None:
        """A report from its JSON text (a remote rank's, read on its node), or None."""
        try:
            raw = json.loads(text)
            return cls(rank=int(raw["rank"]), failure=str(raw["failure"]), message=str(raw["message"]))
        except (ValueError, KeyError, TypeError):
            return None
