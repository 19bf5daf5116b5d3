"""The model's transformers config, resolved once and read back without importing transformers.

Importing transformers (5.x) costs a worker ~1.5 s of its start, only to fill a config's defaults. So the
resolved values (every attribute the model code can read) travel as JSON instead: a partition's manifest
holds them (the partitioner resolves them), and for a plain checkpoint the controller, which imports
transformers for the tokenizer anyway, writes them into a file the worker waits for while it imports
torch (`WorkerConfig.resolved_config`). Values resolved by another transformers version are not read.

Torch-free (the controller imports it); transformers only inside the functions that need it.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

from worker.manifest import RESOLVED_CONFIG, is_partition, read_manifest

log = logging.getLogger(__name__)

# Left out of a resolved config: classification labels (int keys JSON cannot keep; no generation reads
# them). transformers_version there is the version that resolved it.
UNRESOLVED = ("id2label", "label2id", "transformers_version")
RESOLVED_WAIT_S = 300.0  # a worker waits this long for the controller's file, then resolves it itself


class ResolvedConfig(SimpleNamespace):
    """A transformers config's attribute values (`resolved_config_values`) read back from JSON: what
    the model code reads, without the class. getattr(cfg, name, default) behaves as on the class."""


def load_config(model_dir: Path, resolved_file: str = ""):
    """The model's config: a partition's resolved one, else the controller's `resolved_file` (waited
    for), else transformers' AutoConfig (where neither holds values of the installed transformers)."""
    if is_partition(model_dir):
        resolved = read_resolved_config(read_manifest(model_dir))
        if resolved is not None:
            log.info("model config: resolved in the partition's manifest")
            return resolved
    if resolved_file:
        resolved = wait_resolved_file(Path(resolved_file))
        if resolved is not None:
            log.info("model config: resolved by the controller")
            return resolved
    log.info("model config: resolving %s/config.json with transformers", model_dir)
    from transformers import AutoConfig

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
    return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)


def resolved_config_values(config) -> dict | None:
    """Every attribute model code can read from `config`, as JSON values: to_dict() (the instance's
    values, defaults filled), the aliases of its attribute_map (GPT-2's n_embd is also hidden_size)
    and its JSON-valued properties. None where loading still needs the config object: a scaled rope
    (transformers computes its frequencies from the object) or a value of to_dict() JSON cannot hold."""
    if uses_scaled_rope(config):
        return None
    values = {k: v for k, v in config.to_dict().items() if k not in UNRESOLVED}
    for name in getattr(config, "attribute_map", {}):
        values[name] = getattr(config, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in dir(type(config)):
            if name.startswith("__") or not isinstance(getattr(type(config), name, None), property):
                continue
            try:
                value = getattr(config, name)
                json.dumps(value, allow_nan=False)
            except Exception:  # noqa: BLE001 - a property that needs what this config lacks, or an object
                continue
            values[name] = value
    values["transformers_version"] = installed_version("transformers")
    try:
        return json.loads(json.dumps(values, allow_nan=False))
    except (TypeError, ValueError):
        return None


def uses_scaled_rope(config) -> bool:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return isinstance(params, dict) and params.get("rope_type", params.get("type", "default")) not in ("default",
                                                                                                         "dynamic")


def read_resolved_config(manifest: dict) -> ResolvedConfig | None:
    """The manifest's resolved config when it was made with the transformers installed now, else None."""
    return _current(manifest.get(RESOLVED_CONFIG))


def _current(values: dict | None) -> ResolvedConfig | None:
    if not values or values.get("transformers_version") != installed_version("transformers"):
        return None
    return ResolvedConfig(**values)


def write_resolved_file(model_dir: Path, out: Path) -> None:
    """The controller's side: resolve `model_dir`'s config and write {"values": ...} (None where it
    cannot be resolved to JSON) or {"error": why} to `out` atomically. Never raises: a worker waiting
    for the file must always get an answer (and then resolves the config itself)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
        body = {"values": resolved_config_values(config)}
    except Exception as e:  # noqa: BLE001 - the worker resolves it again and reports what fails
        body = {"error": f"{type(e).__name__}: {e}"}
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
        os.replace(tmp, out)
    except OSError as e:  # the worker waits RESOLVED_WAIT_S, then resolves the config itself
        log.warning("cannot write the resolved config %s: %s", out, e)


def wait_resolved_file(path: Path, timeout_s: float = RESOLVED_WAIT_S) -> ResolvedConfig | None:
    """The worker's side: the controller's resolved config, once its file appears (None: resolve it here)."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            log.warning("no resolved model config from the controller in %s after %.0f s: resolving it here",
                        path, timeout_s)
            return None
        time.sleep(0.005)
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("resolved model config %s unreadable (%s): resolving it here", path, e)
        return None
    if body.get("error"):
        log.info("the controller could not resolve the model config (%s): resolving it here", body["error"])
    return _current(body.get("values"))


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
