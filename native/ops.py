"""Kernel API used by the worker: the native extension where it is built for the device, the
plain-torch reference (native/reference.py) otherwise.

The CPU choice is made once at import: the library built by `make native` (native/build.py) is
loaded only if its stamp matches the current sources and torch, then every kernel is run once on
small inputs against its reference (self-check). Any failure logs a warning and selects the torch
path; it never raises. KERNEL_PATH says what CPU tensors get ("native" or "torch"); for other
devices ask kernel_path(device) (the CUDA library is tried on first use). SHARDSERVE_NATIVE=0
forces the torch path everywhere.

The kernels are one operator namespace, torch.ops.shardserve: the CPU library defines the schemas
and the CPU implementations, the CUDA library adds CUDA implementations, and torch dispatches by the
tensors' device. Whether a device type runs them (or the torch path) is still chosen per device
type: each calls `_native(tensor)` before the op.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from native import reference

log = logging.getLogger("shardserve.native")

NATIVE_DEVICE_TYPES = ("cpu", "cuda")  # device types with a library (native/build.py)


@dataclass(frozen=True)
class Backend:
    """What one device type runs: `ops` is torch.ops.shardserve, or None for the torch path."""

    device_type: str
    ops: object | None
    detail: str  # ISA / reason, for the log line

    @property
    def path(self) -> str:
        return "native" if self.ops is not None else "torch"


_backends: dict[str, Backend] = {}
_lock = threading.Lock()


_loaded: set[str] = set()


def _load(device_type: str) -> None:
    """Loads the built library of `device_type` once (the CPU one first: it defines the schemas)."""
    from native import build

    for kind in ("cpu", device_type) if device_type != "cpu" else ("cpu",):
        if not build.is_current(kind):
            where = build.library_path(kind)
            state = "stale" if where.exists() else "not built"
            raise RuntimeError(f"{kind} extension {state} ({where}); run `make native`")
        if kind not in _loaded:
            torch.ops.load_library(str(build.library_path(kind)))
            _loaded.add(kind)


def _library_ops(device_type: str):
    """torch.ops.shardserve with the library of `device_type` loaded (no self-check); raises."""
    _load(device_type)
    return torch.ops.shardserve


def _resolve(device_type: str) -> Backend:
    if os.environ.get("SHARDSERVE_NATIVE", "1").lower() in {"0", "off", "false", "no"}:
        return Backend(device_type, None, "disabled by SHARDSERVE_NATIVE")
    if device_type not in NATIVE_DEVICE_TYPES:
        return Backend(device_type, None, "no native kernels for this device type")
    try:
        ns = _library_ops(device_type)
        from native.selfcheck import self_check

        self_check(ns, torch.device(device_type))
        detail = ns.isa() if device_type == "cpu" else "cuda"
        return Backend(device_type, ns, detail)
    except Exception as exc:  # noqa: BLE001 - any failure at start means the torch path
        if isinstance(exc, RuntimeError) and "run `make native`" in str(exc):
            log.info("native kernels unavailable for %s: %s", device_type, exc)
        else:
            log.warning("native %s kernels failed their start-up check, using torch: %s", device_type, exc)
        return Backend(device_type, None, str(exc).splitlines()[0] if str(exc) else repr(exc))


def backend(device: torch.device | str) -> Backend:
    """The backend for a device, resolved (and logged) once per device type."""
    device_type = torch.device(device).type
    found = _backends.get(device_type)
    if found is not None:
        return found
    with _lock:
        if device_type not in _backends:
            chosen = _resolve(device_type)
            _backends[device_type] = chosen
            log.info("kernel path for %s: %s (%s)", device_type, chosen.path, chosen.detail)
        return _backends[device_type]


def kernel_path(device: torch.device | str = "cpu") -> str:
    """ "native" or "torch": what kernels on `device` run."""
    return backend(device).path


def is_native(device: torch.device | str) -> bool:
    """Whether tensors on `device` run the native kernels (callers keep their own fast torch code
    for the other case: the references below are written for clarity, not speed)."""
    return backend(device).ops is not None


def _force(device_type: str, chosen: Backend) -> None:
    """Test hook: pin the backend of a device type."""
    with _lock:
        _backends[device_type] = chosen


def _native(t: torch.Tensor) -> bool:
    """Whether the op on `t` runs torch.ops.shardserve (torch dispatches it to t's device)."""
    return backend(t.device).ops is not None


_lib = torch.ops.shardserve  # resolved lazily: the ops exist once a library is loaded


# ---------------------------------------------------------------- kernels


def paged_attention_decode(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32, includes the current token
    scale: float,
    alibi_slopes: torch.Tensor | None = None,  # [H]
) -> torch.Tensor:  # [B, H, D]
    if not _native(q):
        return reference.paged_attention_decode(
            q, k_cache, v_cache, block_tables, context_lens, scale, alibi_slopes
        )
    return _lib.paged_attention_decode(
        q, k_cache, v_cache, block_tables, context_lens, float(scale), alibi_slopes
    )


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, residual_out): residual_out = x + residual (or x), out = rmsnorm(residual_out) * w."""
    if not _native(x):
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    return _lib.fused_add_rms_norm(x, residual, weight, float(eps))


def fused_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not _native(x):
        return reference.fused_add_layer_norm(x, residual, weight, bias, eps)
    return _lib.fused_add_layer_norm(x, residual, weight, bias, float(eps))


def rotary_cache_write(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, rot_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], written
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; < 0 skips
    is_neox: bool,
    rot_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (q_rot, k_rot)
    if not _native(q) or k_cache.dtype != q.dtype or not k_cache.is_contiguous():
        return reference.rotary_cache_write(
            q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox, rot_dim
        )
    return _lib.rotary_cache_write(
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, bool(is_neox), int(rot_dim)
    )


quantize_int8 = reference.quantize_int8
quantize_int4 = reference.quantize_int4


def int8_linear(
    x: torch.Tensor,  # [..., in]
    qw: torch.Tensor,  # [out, in] int8
    scales: torch.Tensor,  # [out] fp32
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [..., out]
    if not _native(x):
        return reference.int8_linear(x, qw, scales, bias)
    return _lib.int8_linear(x, qw, scales, bias)


def w8a8_linear(
    x: torch.Tensor,  # [..., in]
    qw: torch.Tensor,  # [out, in] int8 (quantize_int8)
    scales: torch.Tensor,  # [out] fp32
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [..., out]
    """int8 weights x int8 activations quantized per token at run time, int32 accumulation (see
    reference.w8a8_linear). CPU kernel only so far: on other devices the torch twin runs."""
    if not _native(x) or x.device.type != "cpu":
        return reference.w8a8_linear(x, qw, scales, bias)
    in_f = qw.shape[1]
    rows = x.numel() // in_f
    # in_f >= 16: torch 2.13's _int_mm returns uninitialised memory for an inner size of 1.
    if rows >= W8A8_GEMM_MIN_ROWS and in_f >= 16 and x.dtype == torch.float32 and onednn_int8_exact():
        # Same codes, same exact int32 sums, same dequantisation order as the native kernel and the
        # reference: a row's output bits do not depend on which path its batch size picked.
        qx, xs = _lib.quantize_rows_int8(x.reshape(rows, in_f))
        y = torch._int_mm(qx, qw.t()).float().mul_(xs[:, None]).mul_(scales[None, :])
        if bias is not None:
            y.add_(bias)
        return y.reshape(*x.shape[:-1], qw.shape[0])
    return _lib.w8a8_linear(x, qw, scales, bias)


# From this many rows (tokens), w8a8 multiplies through oneDNN's int8 GEMM (torch._int_mm, which
# runs AMX or VNNI tiles) instead of the native kernel, which reads each weight byte once and is the
# faster of the two for a few decode rows. Crossover measured on a 2-core Xeon with AMX: 4 rows 0.68
# ms native vs 0.89 oneDNN, 8 rows 1.23 vs 0.76, 32 rows 4.4 vs 1.0 (one layer of the 300M Llama).
W8A8_GEMM_MIN_ROWS = 6
_onednn_int8: bool | None = None


def onednn_int8_exact() -> bool:
    """Whether torch._int_mm on this CPU is exact int8 x int8 -> int32 (checked once on extreme
    values against the reference; without VNNI, oneDNN's u8 x s8 pair sums can saturate int16).
    Only CPUs with VNNI (avx512_vnni / avx_vnni / amx_int8) are tried; the others keep the native
    kernel."""
    global _onednn_int8
    if _onednn_int8 is None:
        _onednn_int8 = _check_onednn_int8()
        path = "oneDNN int8" if _onednn_int8 else "native"
        log.info("w8a8 GEMM from %d rows: %s", W8A8_GEMM_MIN_ROWS, path)
    return _onednn_int8


def _check_onednn_int8() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    if not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags):
        return False
    gen = torch.Generator().manual_seed(0)
    qx = torch.randint(-127, 128, (W8A8_GEMM_MIN_ROWS + 3, 1040), generator=gen, dtype=torch.int8)
    qw = torch.randint(-127, 128, (72, 1040), generator=gen, dtype=torch.int8)
    qx[0], qw[0], qw[1] = 127, 127, -127  # every pair sum at its extreme
    try:
        return bool(torch.equal(torch._int_mm(qx, qw.t()), reference.int8_gemm(qx, qw)))
    except RuntimeError:
        return False


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, in] -> (int8 codes, per-row fp32 scales), as w8a8_linear quantizes its input."""
    if not _native(x) or x.device.type != "cpu":
        return reference.quantize_rows_int8(x)
    return _lib.quantize_rows_int8(x)


def int8_gemm(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """[T, in] int8 . [out, in]^T int8 -> [T, out] int32 (exact)."""
    if not _native(qx) or qx.device.type != "cpu":
        return reference.int8_gemm(qx, qw)
    return _lib.int8_gemm(qx, qw)


def int4_linear(
    x: torch.Tensor,  # [..., in]
    packed: torch.Tensor,  # [out, in/2] uint8 (layout: reference.pack_int4)
    scales: torch.Tensor,  # [out, in/group_size]
    zeros: torch.Tensor | None,  # [out, in/group_size] or None (= 8)
    bias: torch.Tensor | None = None,
    group_size: int = 128,
) -> torch.Tensor:  # [..., out]
    if not _native(x):
        return reference.int4_linear(x, packed, scales, zeros, bias, group_size)
    return _lib.int4_linear(x, packed, scales, zeros, bias, int(group_size))


def _row_param(values, batch: int, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=dtype).flatten().cpu()
    if t.numel() == 1 and batch != 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"expected {batch} per-row values, got {t.numel()}")
    return t


def sample_top_k_top_p(
    logits: torch.Tensor,  # [B, V] fp32
    temperature: torch.Tensor | Sequence[float],  # [B]; 0 = greedy
    top_k: torch.Tensor | Sequence[int],  # [B]; 0 = off
    top_p: torch.Tensor | Sequence[float],  # [B]; 1 = off
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:  # [B] int64 on logits.device
    """One token per row; each row consumes one uniform from its own generator (see reference)."""
    batch = logits.shape[0]
    uniforms = reference.draw_uniforms(batch, list(generators))
    temperature = _row_param(temperature, batch, torch.float32)
    top_k = _row_param(top_k, batch, torch.int64)
    top_p = _row_param(top_p, batch, torch.float32)
    if not _native(logits):
        return reference.sample_with_uniforms(logits, temperature, top_k, top_p, uniforms)
    dev = logits.device
    return _lib.sample_top_k_top_p(logits, temperature.to(dev), top_k.to(dev), top_p.to(dev), uniforms.to(dev))


KERNEL_PATH: str = kernel_path("cpu")
