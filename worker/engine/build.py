"""Build an engine from a model folder: config, model, weights, KV cache, warm-up."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from native import ops
from worker.distributed import get_parallel_state
from worker.engine.engine import Engine, EngineConfig
from worker.engine.pipeline import agree_num_blocks, prune_for_stage
from worker.engine.sequence import Sampling
from worker.layers.linear import prepack_model, quantize_model
from worker.loader import load_partition, load_weights
from worker.manifest import check_layout, is_partition
from worker.model_config import load_config
from worker.models.registry import max_positions, model_class

log = logging.getLogger(__name__)


class NativeWarmupError(RuntimeError):
    """Native kernels failed the warm-up of a process group: the worker reports it (worker/config.py,
    WorkerReport NATIVE_WARMUP) and exits."""


def kv_bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
    elem = dtype.itemsize
    return sum(2 * block_size * a.num_kv_heads * a.head_dim * elem for a in model.attention_layers())


def build_engine(config: EngineConfig) -> Engine:
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    kernels = ops.backend(config.device)  # resolved once: the extension if built and self-checked, else torch
    log.info("kernel path: %s (%s)", kernels.path, kernels.detail)
    model_config = load_config(config.model_dir, config.resolved_config)
    cls = model_class(model_config)
    dtype = config.torch_dtype
    slow = slow_half_precision(config.device, dtype)
    if slow:
        log.warning(slow)
    with torch.device(config.device):
        torch.set_default_dtype(dtype)
        try:
            model = cls(model_config)
        finally:
            torch.set_default_dtype(torch.float32)
    model.eval()
    prune_for_stage(model)  # pipeline stages drop the embedding / LM head they never run
    param_bytes, quantize = load_rank_weights(model, config.model_dir, config.quantize)
    if quantize:  # not already stored quantized in a partition
        before, param_bytes, layers = quantize_model(model, quantize)
        log.info("quantized %d linear layers to %s: %.2f MB -> %.2f MB of parameters (this rank)",
                 layers, quantize, before / 1e6, param_bytes / 1e6)
    if config.prepack_linear:
        packed = prepack_model(model)
        if sum(packed.values()):
            log.info("fp32 linear layers with weights laid out once: %d for oneDNN, %d transposed for BLAS "
                     "(the faster on this machine, timed per shape)", packed["onednn"], packed["blas"])
    phases["load"] = time.monotonic() - t0
    max_len = config.max_model_len or max_positions(model_config)
    per_block = kv_bytes_per_block(model, config.block_size, dtype)
    blocks_for_one = -(-max_len // config.block_size)
    if config.num_kv_blocks:
        num_blocks = config.num_kv_blocks
    else:
        if not config.kv_cache_bytes:  # 0 = auto: sized to the machine
            config = dataclasses.replace(config, kv_cache_bytes=auto_kv_cache_bytes(config, model_config))
        config = reserve_cross_state(model, model_config, config)
        useful = blocks_for_one * config.max_batch_size
        num_blocks = max(1, min(config.kv_cache_bytes // per_block, useful))
    num_blocks = agree_num_blocks(num_blocks)  # every rank indexes the same block ids
    wanted = config.max_batch_size * max_len
    log.info("KV cache holds %d tokens (%d blocks); max_batch_size x max_model_len = %d tokens",
             num_blocks * config.block_size, num_blocks, wanted)
    if num_blocks * config.block_size < wanted:
        log.warning("KV cache of %d tokens cannot hold max_batch_size=%d sequences of max_model_len=%d (%d tokens): "
                    "long requests will be preempted and recomputed; raise the KV cache size or lower them",
                    num_blocks * config.block_size, config.max_batch_size, max_len, wanted)
    if num_blocks < blocks_for_one:
        raise ValueError(
            f"KV cache of {num_blocks} blocks x {config.block_size} tokens cannot hold one sequence of "
            f"max_model_len={max_len}; raise the KV cache size or lower max_model_len"
        )
    draft = load_draft(config, model_config)
    engine = Engine(model, model_config, config, num_blocks, draft)
    engine.param_bytes = param_bytes
    log.info("model %s loaded: %.1f MB parameters, KV cache %d blocks x %d tokens (%.1f MB), %.2fs",
             cls.__name__, param_bytes / 1e6, num_blocks, config.block_size, engine.kv_cache_bytes / 1e6,
             phases["load"])
    t1 = time.monotonic()
    st = get_parallel_state()
    if not st.distributed or st.rank == 0:  # with a process group the other ranks join from their loop
        try:
            warm_up(engine)
        except Exception as exc:  # noqa: BLE001 - a native kernel failing at start means the torch path
            if kernels.path != "native":
                raise
            if st.distributed:
                raise NativeWarmupError(f"native kernels failed at warm-up: {exc}") from exc
            log.warning("warm-up failed on the native kernels, falling back to torch: %s", exc)
            kernels = ops.Backend(kernels.device_type, None, f"native failed at warm-up: {exc}")
            ops._force(kernels.device_type, kernels)
            engine = Engine(model, model_config, config, num_blocks, draft)
            engine.param_bytes = param_bytes
            warm_up(engine)
    phases["warmup"] = time.monotonic() - t1
    engine.stats.load_phases = phases
    engine.kernel_path = kernels.path
    return engine


def load_draft(config: EngineConfig, target_config):
    """(the draft model, its config) for speculative_method 'draft', else None: built and loaded like
    the target (its dtype and device; a checkpoint folder, not a partition), decoder-only, its
    vocabulary the target's (a draft with more or fewer ids is cut or padded: the same tokenizer is
    the user's promise)."""
    if config.speculative_method != "draft":
        return None
    folder = Path(config.speculative_model)
    draft_config = load_config(folder)
    if getattr(draft_config, "is_encoder_decoder", False):
        raise ValueError(f"speculative_model {folder}: an encoder-decoder model cannot be a draft")
    dv, tv = getattr(draft_config, "vocab_size", None), getattr(target_config, "vocab_size", None)
    if dv != tv:
        log.warning("draft model vocabulary %s != target's %s: draft ids past the target's are never proposed", dv, tv)
    with torch.device(config.device):
        torch.set_default_dtype(config.torch_dtype)
        try:
            draft = model_class(draft_config)(draft_config)
        finally:
            torch.set_default_dtype(torch.float32)
    draft.eval()
    loaded = load_weights(draft, folder)
    log.info("draft model %s (%s): %.1f MB parameters", folder, type(draft).__name__, loaded / 1e6)
    return draft, draft_config


CPU_KV_SHARE = 0.5  # of the memory available after the weights are loaded, split over the local ranks
CPU_KV_CAP = 16 << 30  # bytes, at most (the explicit kv_cache_bytes overrides)
GPU_KV_FRACTION = 0.9  # of the device memory free after the weights and the step's activations


def mem_available(path: str = "/proc/meminfo") -> int:
    """MemAvailable in bytes (0 when unknown)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def activation_bytes(config: EngineConfig, model_config) -> int:
    """A bound on one step's activations: max_batch_tokens rows of the widest intermediates (the
    MLP's two projections, q/k/v/o, residuals) plus the logits of a full batch, in the step's dtype."""
    hidden = int(getattr(model_config, "hidden_size", 0) or getattr(model_config, "d_model", 0) or 0)
    inter = int(getattr(model_config, "intermediate_size", 0) or getattr(model_config, "d_ff", 0) or 4 * hidden)
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    elem = config.torch_dtype.itemsize
    return config.max_batch_tokens * (3 * inter + 8 * hidden) * elem + config.max_batch_size * vocab * 4 * 2


def auto_kv_cache_bytes(config: EngineConfig, model_config, available: int | None = None) -> int:
    """The KV cache budget when none is configured (kv_cache_bytes == 0), called after the weights
    are loaded. CPU: CPU_KV_SHARE of MemAvailable divided by the replica's world size (its ranks share
    the host's memory and measure it at about the same time), at most CPU_KV_CAP. GPU: GPU_KV_FRACTION of the
    free device memory less one step's activations. `available` overrides the measured free bytes."""
    dev = torch.device(config.device)
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0] if available is None else available
        budget = int(free * GPU_KV_FRACTION) - activation_bytes(config, model_config)
        where = f"{free / 2**30:.1f} GiB free on {dev}"
    else:
        free = mem_available() if available is None else available
        budget = min(int(free * CPU_KV_SHARE / config.world_size), CPU_KV_CAP) if free else 512 << 20
        where = f"{free / 2**30:.1f} GiB available" if free else "available memory unknown"
    budget = max(budget, 1 << 20)
    log.info("KV cache sized to the machine: %.0f MiB (%s)", budget / 2**20, where)
    return budget


# CPU flags that give bf16 / fp16 matrix products their own instructions (oneDNN uses them)
HALF_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def slow_half_precision(device, dtype: torch.dtype, flags: set[str] | None = None) -> str | None:
    """A warning when `dtype` on this CPU has no native instructions (it is then converted to fp32
    inside every product: slower than fp32 itself, though half the memory); None when fine."""
    if torch.device(device).type != "cpu" or dtype not in HALF_FLAGS:
        return None
    flags = cpu_flags() if flags is None else flags
    if not flags or any(f in flags for f in HALF_FLAGS[dtype]):
        return None  # unknown (no /proc/cpuinfo) or supported
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return (f"dtype {name} on a CPU without {' or '.join(HALF_FLAGS[dtype])}: products run through fp32 "
            f"conversions and may be slower than --dtype fp32 (which needs twice the memory)")


def reserve_cross_state(model, model_config, config: EngineConfig) -> EngineConfig:
    """Encoder-decoder models keep each request's cross-attention K/V (every decoder layer, up to the
    encoder's length) beside the paged cache. Reserve it out of kv_cache_bytes for a full batch, at most
    half the budget: fewer requests then run at once (max_batch_size lowered, logged). Returns the
    config with kv_cache_bytes (and maybe max_batch_size) reduced; unchanged for decoder-only models."""
    if not getattr(model_config, "is_encoder_decoder", False) or config.num_kv_blocks:
        return config
    from worker.models.t5 import max_encoder_len

    enc = max_encoder_len(model_config)
    per_request = kv_bytes_per_block(model, 1, config.torch_dtype) * enc  # cross K/V: self-attention's shape
    fit = (config.kv_cache_bytes // 2) // per_request
    if fit < 1:
        raise ValueError(f"cross-attention state of one request of up to {enc} encoder tokens needs "
                         f"{per_request / 2**20:.1f} MiB, over half the KV cache budget of "
                         f"{config.kv_cache_bytes / 2**20:.0f} MiB; raise --kv-cache-mb")
    batch = min(config.max_batch_size, fit)
    if batch < config.max_batch_size:
        log.warning("cross-attention state: %d requests x %d encoder tokens would take over half the KV cache "
                    "budget; running at most %d requests at once (raise --kv-cache-mb for more)",
                    config.max_batch_size, enc, batch)
    log.info("KV budget: %.1f MiB reserved for cross-attention state (%d requests x %d encoder tokens)",
             batch * per_request / 2**20, batch, enc)
    return dataclasses.replace(config, kv_cache_bytes=config.kv_cache_bytes - batch * per_request,
                               max_batch_size=batch)


def load_rank_weights(model, model_dir, quantize: str | None = None) -> tuple[int, str | None]:
    """From this rank's file of a partition (manifest.json present), else from the checkpoint.

    Returns (bytes loaded, the quantization still to apply at load): `quantize` unless the partition
    already holds it. A partition quantized with another method than `quantize` is refused; asked for
    none, a quantized partition serves its own (logged)."""
    if not is_partition(model_dir):
        return load_weights(model, model_dir), quantize
    st = get_parallel_state()
    m = check_layout(model_dir, st.tp_size, st.pp_size, quantize=quantize)
    stored = m.get("quantize")  # None in every manifest from before quantized partitions
    entry = next(r for r in m["ranks"] if r["rank"] == st.rank)
    layers = getattr(model, "layers", None)
    if layers is not None and st.pp_size > 1 and list(entry["layers"]) != list(st.layer_range(len(layers))):
        raise ValueError(f"{model_dir}: rank {st.rank} was partitioned with layers {entry['layers']}, this worker's "
                         f"stage owns {list(st.layer_range(len(layers)))} (stage layers {list(st.stage_layers)}); "
                         f"a --stage-layers split needs a partition made with the same split")
    log.info("loading rank %d from partition file %s%s", st.rank, entry["file"],
             f" (stored {stored})" if stored else "")
    loaded = load_partition(model, model_dir / entry["file"], stored)
    return loaded, None if stored else quantize


def warm_up(engine: Engine) -> None:
    """Run one short request through the whole step path so the first client is not the test."""
    done = []
    # with speculation, a repeating prompt and a few more tokens: proposals are verified once too
    k = engine.scheduler.num_speculative_tokens
    prompt = list(range(1, 5)) * 2 if k else list(range(1, 9))
    seq = engine.new_sequence("warmup", prompt, Sampling(max_new_tokens=2 + k),
                              emit=lambda toks, lps, fin, err: done.append((fin, err)) if fin else None)
    engine.add(seq)
    while not done:
        engine.step()
    fin, err = done[0]
    if err:
        raise RuntimeError(f"warm-up failed: {err}")
    engine.stats.prompt_tokens_total = 0
    engine.stats.generated_tokens_total = 0
    engine.stats.steps_total = 0
    engine.scheduler.spec_proposed = engine.scheduler.spec_accepted = 0
