"""DJLServing / SageMaker LMI configuration (`serving.properties` + environment) as one typed spec.

Users coming from SageMaker LMI bring a `serving.properties` file and/or environment variables;
`load_properties` turns them into a frozen `ServingProperties`, validated once.

Precedence, highest first (one value per setting, the highest level that sets it wins):
  1. CLI flags            (`cli=` mapping of field name -> value, e.g. from `cli_overrides(args)`)
  2. environment          `OPTION_<KEY>` for `option.<key>`, `SERVING_<KEY>` for a server key
                          (`job_queue_size` -> `SERVING_JOB_QUEUE_SIZE`), and LMI's short names:
                          HF_MODEL_ID, TENSOR_PARALLEL_DEGREE (also SM_NUM_GPUS), PIPELINE_PARALLEL_DEGREE,
                          HF_MODEL_QUANTIZE, HF_MODEL_TRUST_REMOTE_CODE, MAX_BATCH_SIZE,
                          MAX_CONCURRENT_REQUESTS, OPTION_ENGINE
  3. serving.properties   (`engine=...`, `option.model_id=...`, `job_queue_size=...`, ...)
  4. defaults             (those of LMI where LMI has one)
Note: LMI itself lets serving.properties override environment variables; shardserve follows the
usual container convention instead (environment over the file baked into the image), so a
deployment can change one setting without rebuilding the model artifact.

The request input limits (controller/api/limits.py, README "Limits") are keys too: `option.max_prompts`
(env OPTION_MAX_PROMPTS or SERVING_MAX_PROMPTS, flag --max-prompts), and so on for every RequestLimits field.

Strictness: every key in the file, and every environment variable named OPTION_* or SERVING_*, must
be one we know; otherwise `PropertiesError` names the key, where it came from and the closest known
keys. (Kubernetes service-link variables such as SERVING_SERVICE_HOST / OPTION_PORT are skipped.)
A bad value names the key and the accepted values. `option.trust_remote_code=true` is refused:
shardserve never runs code shipped with a model. `engine` values from DJLServing (Python, MPI,
FasterTransformer, DeepSpeed, PyTorch) are accepted with a log line: shardserve runs its own engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from controller.api.limits import RequestLimits

log = logging.getLogger(__name__)

SAGEMAKER_PROPERTIES = Path("/opt/ml/model/serving.properties")  # where SageMaker puts the model dir


class PropertiesError(ValueError):
    """A configuration problem a person can fix; the message names the key and its origin."""


LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(RequestLimits))  # also ServingProperties fields
MAX_GRPC_MESSAGE = (1 << 31) - 1  # gRPC takes message sizes as a C int

# DJLServing engines we accept for compatibility; the value is its canonical spelling.
_ENGINES = {
    e.lower(): e for e in ("shardserve", "Python", "MPI", "FasterTransformer", "DeepSpeed", "PyTorch")
}
_DTYPES = {
    "fp32": "fp32", "float32": "fp32",
    "fp16": "fp16", "float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
}  # fmt: skip
_QUANTIZE = {"int8": "int8", "int4": "int4", "none": None, "w8a8": "w8a8"}
_SPECULATIVE = {"ngram": "ngram", "draft": "draft", "none": None}
# LMI rolling-batch backends: all mean "continuous batching", which is what shardserve always does.
_ROLLING_ON = ("auto", "true", "vllm", "lmi-dist", "trtllm", "tensorrtllm", "deepspeed", "scheduler")
_ROLLING_OFF = ("disable", "false")
_EXECUTORS = {"local": "local", "ray": "ray"}
_STRATEGIES = {"pack": "pack", "spread": "spread", "strict-spread": "strict-spread", "strict_spread": "strict-spread"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class ServingProperties:
    engine: str = "shardserve"  # as given (canonical spelling); informational only
    model_id: str | None = None  # S3 URI, local folder or hub id; see `model_source`
    s3url: str | None = None  # DJLServing's older key, always s3://...
    tensor_parallel_degree: int | Literal["max"] = 1  # "max": every visible device
    pipeline_parallel_degree: int = 1
    dtype: Literal["fp32", "fp16", "bf16"] | None = None  # None: the engine's default for the device
    quantize: Literal["int8", "int4", "w8a8"] | None = None
    rolling_batch: bool = True  # continuous batching requested; shardserve's engine always batches so
    max_rolling_batch_size: int = 256  # most sequences in one running batch
    max_input_len: int | None = None  # prompt tokens; None: the model's context length
    max_output_len: int | None = None  # new tokens; None: up to the model's context length
    job_queue_size: int = 1000  # requests queued per model before RESOURCE_EXHAUSTED
    batch_size: int = 1  # DJLServing dynamic batch size (non-rolling mode)
    max_batch_delay: int = 100  # milliseconds, DJLServing dynamic batching
    enable_prefix_caching: bool = True  # reuse the KV cache of shared prompt prefixes (--no-prefix-caching)
    executor: Literal["local", "ray"] = "local"  # where ranks run: children of the server, or Ray actors
    placement_strategy: Literal["pack", "spread", "strict-spread"] = "pack"  # Ray placement group strategy
    speculative_method: Literal["ngram", "draft"] | None = None  # None: draft with a speculative_model, else off
    speculative_model: str | None = None  # the draft model's local folder (same tokenizer)
    num_speculative_tokens: int | None = None  # None: 4 when speculation is on
    trust_remote_code: bool = False  # invariant: always False (True is refused at load)
    entry_point: str | None = None  # accepted for compatibility, ignored
    # request input limits (controller/api/limits.py; README "Limits"): option.<name>, OPTION_/SERVING_<NAME>
    max_prompt_bytes: int = RequestLimits.max_prompt_bytes
    max_prompts: int = RequestLimits.max_prompts
    max_stop_strings: int = RequestLimits.max_stop_strings
    max_stop_bytes: int = RequestLimits.max_stop_bytes
    max_bad_words: int = RequestLimits.max_bad_words
    max_bad_word_bytes: int = RequestLimits.max_bad_word_bytes
    max_message_bytes: int = RequestLimits.max_message_bytes
    # field name -> where its value came from ("default", "file.properties:3 option.dtype", "env X", ...)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def model_source(self) -> str | None:
        return self.model_id or self.s3url

    def resolved_tensor_parallel_degree(self, device_count: int) -> int:
        if self.tensor_parallel_degree == "max":
            return max(1, device_count)
        return int(self.tensor_parallel_degree)

    @property
    def limits(self) -> RequestLimits:
        """The request input limits these properties set (RequestLimits' defaults for the others)."""
        return RequestLimits(**{f: getattr(self, f) for f in LIMIT_FIELDS})

    def describe(self) -> list[str]:
        """One line per setting with its origin, for logs and `admin describe`."""
        names = [f for f in self.__dataclass_fields__ if f != "sources"]
        return [f"{n}={getattr(self, n)!r} ({self.sources.get(n, 'default')})" for n in names]


# -- value parsers: raw string (or CLI value) -> typed value; raise ValueError(accepted values) ----


def _positive_int(raw: Any) -> int:
    try:
        v = int(str(raw).strip())
    except ValueError:
        raise ValueError("a positive integer") from None
    if v < 1:
        raise ValueError("a positive integer")
    return v


def _message_bytes(raw: Any) -> int:
    v = _positive_int(raw)
    if v > MAX_GRPC_MESSAGE:
        raise ValueError(f"a positive integer <= {MAX_GRPC_MESSAGE} (gRPC's largest message)")
    return v


def _non_negative_int(raw: Any) -> int:
    try:
        v = int(str(raw).strip())
    except ValueError:
        raise ValueError("an integer >= 0 (milliseconds)") from None
    if v < 0:
        raise ValueError("an integer >= 0 (milliseconds)")
    return v


def _tp(raw: Any) -> int | str:
    if str(raw).strip().lower() == "max":
        return "max"
    try:
        return _positive_int(raw)
    except ValueError:
        raise ValueError("a positive integer or 'max'") from None


def _choice(table: Mapping[str, Any]) -> Callable[[Any], Any]:
    def parse(raw: Any) -> Any:
        key = str(raw).strip().lower()
        if key not in table:
            raise ValueError("one of " + ", ".join(table))
        return table[key]

    return parse


def _dtype(raw: Any) -> str | None:
    if str(raw).strip().lower() == "auto":
        return None
    return _choice(_DTYPES)(raw)


def _engine(raw: Any) -> str:
    engine = _ENGINES.get(str(raw).strip().lower())
    if engine is None:
        raise ValueError(
            "one of " + ", ".join(_ENGINES.values()) + " (shardserve serves LLMs with its own engine)"
        )
    return engine


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    s = str(raw).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError("true or false")


def _rolling(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    s = str(raw).strip().lower()
    if s in _ROLLING_ON:
        return True
    if s in _ROLLING_OFF:
        return False
    raise ValueError("one of " + ", ".join(_ROLLING_ON + _ROLLING_OFF))


def _text(raw: Any) -> str:
    s = str(raw).strip()
    if not s or "\x00" in s:
        raise ValueError("a non-empty string")
    return s


def _s3(raw: Any) -> str:
    s = _text(raw)
    if not s.startswith("s3://"):
        raise ValueError("an S3 URI (s3://bucket/prefix/)")
    return s


@dataclass(frozen=True)
class _Key:
    field: str
    file_key: str  # as written in serving.properties
    parse: Callable[[Any], Any]
    aliases: tuple[str, ...] = ()  # extra environment variable names (LMI / SageMaker short forms)

    @property
    def env(self) -> str:
        if self.file_key.startswith("option."):
            return "OPTION_" + self.file_key[len("option.") :].upper()
        return "SERVING_" + self.file_key.upper()


KEYS: tuple[_Key, ...] = (
    _Key("engine", "engine", _engine, ("OPTION_ENGINE",)),
    _Key("entry_point", "option.entryPoint", _text),
    _Key("model_id", "option.model_id", _text, ("HF_MODEL_ID",)),
    _Key("s3url", "option.s3url", _s3),
    _Key("tensor_parallel_degree", "option.tensor_parallel_degree", _tp, ("TENSOR_PARALLEL_DEGREE", "SM_NUM_GPUS")),
    _Key("pipeline_parallel_degree", "option.pipeline_parallel_degree", _positive_int, ("PIPELINE_PARALLEL_DEGREE",)),
    _Key("dtype", "option.dtype", _dtype),
    _Key("quantize", "option.quantize", _choice(_QUANTIZE), ("HF_MODEL_QUANTIZE",)),
    _Key("rolling_batch", "option.rolling_batch", _rolling),
    _Key("max_rolling_batch_size", "option.max_rolling_batch_size", _positive_int, ("MAX_BATCH_SIZE",)),
    _Key("max_input_len", "option.max_input_len", _positive_int),
    _Key("max_output_len", "option.max_output_len", _positive_int),
    _Key("enable_prefix_caching", "option.enable_prefix_caching", _bool),
    _Key("executor", "option.executor", _choice(_EXECUTORS)),
    _Key("placement_strategy", "option.placement_strategy", _choice(_STRATEGIES)),
    _Key("speculative_method", "option.speculative_method", _choice(_SPECULATIVE)),
    _Key("speculative_model", "option.speculative_model", _text),
    _Key("num_speculative_tokens", "option.num_speculative_tokens", _positive_int),
    _Key("trust_remote_code", "option.trust_remote_code", _bool, ("HF_MODEL_TRUST_REMOTE_CODE",)),
    _Key("job_queue_size", "job_queue_size", _positive_int, ("MAX_CONCURRENT_REQUESTS",)),
    _Key("batch_size", "batch_size", _positive_int),
    _Key("max_batch_delay", "max_batch_delay", _non_negative_int),
    # every request input limit: option.max_prompts, OPTION_MAX_PROMPTS or SERVING_MAX_PROMPTS, --max-prompts
    *(_Key(f, f"option.{f}", _message_bytes if f == "max_message_bytes" else _positive_int, (f"SERVING_{f.upper()}",))
      for f in LIMIT_FIELDS),
)  # fmt: skip
_BY_FILE_KEY = {k.file_key.lower(): k for k in KEYS}
_BY_FIELD = {k.field: k for k in KEYS}
_BY_ENV = {name: k for k in KEYS for name in (k.env, *k.aliases)}
_ENV_PREFIXES = ("OPTION_", "SERVING_")
# Variables Kubernetes injects for a Service named "option" or "serving" (enableServiceLinks).
_K8S_SERVICE_LINK = re.compile(
    r"^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?)$"
)

# `shardserve serve` flag (argparse dest) -> field. Flags left at None do not override.
CLI_FLAGS = {
    "model": "model_id",
    "tp": "tensor_parallel_degree",
    "pp": "pipeline_parallel_degree",
    "dtype": "dtype",
    "quantize": "quantize",
    "max_batch_size": "max_rolling_batch_size",
    "max_queued_requests": "job_queue_size",
    "prefix_caching": "enable_prefix_caching",
    "executor": "executor",
    "placement_strategy": "placement_strategy",
    **{f: f for f in LIMIT_FIELDS},  # --max-prompts etc. (settings.py LIMIT_FLAGS): dest = the field
    "speculative_method": "speculative_method",
    "speculative_model": "speculative_model",
    "num_speculative_tokens": "num_speculative_tokens",
}


def _unknown(what: str, origin: str, candidates: list[str]) -> PropertiesError:
    close = difflib.get_close_matches(what, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return PropertiesError(f"{origin}: unknown key {what!r}{hint} (known: {', '.join(sorted(candidates))})")


def _parse_value(key: _Key, raw: Any, origin: str, name: str) -> Any:
    try:
        return key.parse(raw)
    except ValueError as e:
        raise PropertiesError(f"{origin}: {name}={str(raw)!r} is not valid; expected {e}") from None


def read_properties_file(path: Path) -> list[tuple[str, str, int]]:
    """(key, value, line number) per entry of a Java-style properties file (`=` or `:` separated,
    `#`/`!` comments, trailing-backslash continuation). A key set twice is an error."""
    entries: list[tuple[str, str, int]] = []
    seen: dict[str, int] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        lineno, line = i + 1, lines[i].strip()
        i += 1
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + lines[i].strip()
            i += 1
        if not line or line[0] in "#!":
            continue
        m = re.match(r"^([^=:\s]+)\s*[=:\s]\s*(.*)$", line)
        if not m:
            m = re.match(r"^([^=:\s]+)()$", line)
        if not m:
            raise PropertiesError(f"{path}:{lineno}: cannot read {line!r}; expected key=value")
        key, value = m.group(1), m.group(2).strip()
        if key.lower() in seen:
            raise PropertiesError(f"{path}:{lineno}: {key} is already set on line {seen[key.lower()]}")
        seen[key.lower()] = lineno
        entries.append((key, value, lineno))
    return entries


def _from_file(path: Path) -> dict[str, tuple[Any, str]]:
    if path.is_dir():
        path = path / "serving.properties"
    if not path.is_file():
        raise PropertiesError(f"{path}: no such properties file")
    out: dict[str, tuple[Any, str]] = {}
    for raw_key, value, lineno in read_properties_file(path):
        origin = f"{path}:{lineno}"
        key = _BY_FILE_KEY.get(raw_key.lower())
        if key is None:
            raise _unknown(raw_key, origin, [k.file_key for k in KEYS])
        out[key.field] = (_parse_value(key, value, origin, raw_key), f"{origin} {key.file_key}")
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for name in sorted(env):
        key = _BY_ENV.get(name)
        if key is None:
            if name.startswith(_ENV_PREFIXES) and not _K8S_SERVICE_LINK.match(name):
                raise _unknown(name, f"environment variable {name}", sorted(_BY_ENV))
            continue
        value = _parse_value(key, env[name], f"environment variable {name}", name)
        if key.field in out and out[key.field][0] != value:
            other = out[key.field][1]
            raise PropertiesError(
                f"{other} and env {name} both set {key.file_key} with different values "
                f"({out[key.field][0]!r} vs {value!r}); set only one"
            )
        out[key.field] = (value, f"env {name}")
    return out


def _from_cli(cli: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for name, raw in cli.items():
        if raw is None:
            continue
        key = _BY_FIELD.get(name)
        if key is None:
            raise _unknown(name, "command-line override", sorted(_BY_FIELD))
        out[name] = (_parse_value(key, raw, "command-line flag", name), f"flag {name}")
    return out


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `serve` flags that were given (not None), keyed by ServingProperties field."""
    return {f: getattr(args, dest) for dest, f in CLI_FLAGS.items() if getattr(args, dest, None) is not None}


def load_properties(
    path: Path | None, env: Mapping[str, str], cli: Mapping[str, Any] | None = None
) -> ServingProperties:
    """Merge defaults < serving.properties at `path` (a file, or a folder holding one) < `env` <
    `cli` into one validated ServingProperties. Raises PropertiesError."""
    levels = [
        ("file", _from_file(Path(path)) if path is not None else {}),
        ("env", _from_env(env)),
        ("cli", _from_cli(cli or {})),
    ]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for _level, found in levels:
        # model_id and s3url are one setting (the model's location): the higher level wins.
        if "model_id" in found or "s3url" in found:
            for f in ("model_id", "s3url"):
                if f not in found and f in values:
                    log.info("%s (%s) replaced by a higher-precedence model location", f, sources[f])
                    del values[f], sources[f]
        for f, (v, origin) in found.items():
            values[f], sources[f] = v, origin
    if values.get("model_id") and values.get("s3url") and values["model_id"] != values["s3url"]:
        raise PropertiesError(
            f"{sources['model_id']} and {sources['s3url']} name different models "
            f"({values['model_id']!r} vs {values['s3url']!r}); set only option.model_id"
        )
    if values.get("trust_remote_code"):
        raise PropertiesError(
            f"{sources['trust_remote_code']}: trust_remote_code=true is refused: shardserve never runs "
            "code shipped with a model; it serves supported architectures with its own model code. "
            "Remove the setting (or set it to false)."
        )
    engine = values.get("engine")
    if engine is not None and engine != "shardserve":
        log.info("engine=%s accepted (%s): shardserve runs its own engine", engine, sources["engine"])
    if values.get("entry_point") is not None:
        level = logging.INFO if values["entry_point"].startswith("djl_python.") else logging.WARNING
        log.log(level, "option.entryPoint=%s (%s) ignored: shardserve has no handler scripts",
                values["entry_point"], sources["entry_point"])  # fmt: skip
    if "rolling_batch" in values and not values["rolling_batch"]:
        log.info("option.rolling_batch=disable (%s): shardserve's engine batches continuously anyway",
                 sources["rolling_batch"])  # fmt: skip
    return ServingProperties(**values, sources={**{f: "default" for f in _BY_FIELD}, **sources})
