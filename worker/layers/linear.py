"""Linear layers that know how they are sharded over tensor-parallel ranks.

Each parameter carries `weight_loader(param, loaded, shard_id)`, where `loaded` is the *full*
checkpoint tensor or a lazy safetensors slice of it (anything supporting `get_shape()`/`.shape`
and slicing); the loader reads only this rank's part and checks the full shape first.
Weights are [out_features, in_features] as in torch.nn.Linear.

Quantization (`quantize_model`, after the weights are loaded): the tensor-parallel layers (column,
QKV, row) replace their weight with this rank's int8 (per output channel) or int4 (per group of
inputs) copy and multiply through native/ops (the extension, or its torch twin). int8 and int4 are
weight-only; "w8a8" stores the int8 weights of "int8" and also quantizes each token's activations
to int8 at run time (per-row scale), multiplying in int32 (ops.w8a8_linear).
Embeddings, the LM head and ReplicatedLinear stay in the load dtype. A partition made with
`--quantize` stores those tensors per rank (`quantize_weight`, the same function); the worker gives
the layers their quantized structure (`prepare_quantized`) and loads them by name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from native import ops
from worker.distributed import divide, tp_all_gather_last_dim, tp_all_reduce, tp_rank, tp_size

log = logging.getLogger(__name__)

QUANTIZE_METHODS = ("int8", "int4", "w8a8")
INT4_GROUP_SIZES = (128, 64, 32)  # the first that divides in_features; else the one padding least


QUANT_BUFFERS = ("qweight", "scales", "zeros")  # a quantized layer's tensors, in place of `weight`


def int4_group_size(in_features: int) -> int:
    """The int4 group size for a layer with `in_features` inputs: the first of INT4_GROUP_SIZES that
    divides it, else the one whose last group needs the fewest zero-padded inputs (larger on ties)."""
    exact = next((g for g in INT4_GROUP_SIZES if in_features % g == 0), 0)
    return exact or min(INT4_GROUP_SIZES, key=lambda g: (-in_features % g, -g))


def quantize_weight(w: torch.Tensor, method: str, group: int = 0) -> tuple[dict[str, torch.Tensor | None], int]:
    """This rank's weight [out, in] -> ({qweight, scales, zeros}, int4 group size or 0). Every shape
    quantizes (int4 pads the last group with zero weights). On the meta device it gives the shapes
    and dtypes only.

    int8 and w8a8: qweight [out, in] int8, scales [out] fp32. int4: qweight [out, in_p/2] uint8
    (packed; in_p = in rounded up to the group), scales and zeros [out, in_p/group] fp32 (zeros may
    be None: symmetric, 8); group = `group`, else int4_group_size(in) (so group = 2 * qweight.shape[1]
    / scales.shape[1], derivable from the shapes)."""
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"quantize={method!r}: expected one of {', '.join(QUANTIZE_METHODS)}")
    if method in ("int8", "w8a8"):
        qw, scales = ops.quantize_int8(w)
        return {"qweight": qw.contiguous(), "scales": scales.contiguous(), "zeros": None}, 0
    group = group or int4_group_size(w.shape[1])
    packed, scales, zeros = ops.quantize_int4(w, group)
    return {"qweight": packed.contiguous(), "scales": scales.contiguous(),
            "zeros": None if zeros is None else zeros.contiguous()}, group


PACK_BATCH_HINT = 32  # rows oneDNN lays a packed weight out for; any row count still works
CALIBRATE_MAX_NUMEL = 1 << 21  # weights up to 8 MB fp32 time both layouts at load; larger ones take oneDNN's
CALIBRATE_ROWS = (1, 8)  # the decode batch sizes the layout choice is timed at (their times summed)


def can_prepack(w: torch.Tensor) -> bool:
    """fp32 CPU weights multiply faster with a layout chosen once at load (`prepack`)."""
    return w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _time(f, x) -> float:
    """Seconds of the fastest of 5 calls of f(x), after 2 warm-ups."""
    best = float("inf")
    for i in range(7):
        t0 = time.perf_counter()
        f(x)
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return best


LAYOUTS = ("onednn", "blas")  # the copies `prepack` makes; on equal times the first wins
_LAYOUTS: dict[tuple[int, int], str] = {}  # (out, in) -> the layout timed faster: one timing per shape per process


def choose_layout(w: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(layout, `prepack` copy of an fp32 CPU weight [out, in] in it): the copy that multiplies faster on
    this machine at decode batch sizes. "onednn" (oneDNN's blocked layout: 1.5-3x BLAS at 8-128 rows on
    weights of >= 8 MB, and on AVX2 EPYC at every size measured, bench/results/cpu-decode-*.json) or
    "blas" (the transposed [in, out] copy through torch.mm: on a 2-core AMX Xeon 1.2-2.4x oneDNN on the
    demo model's 0.1-4 MB weights, whose oneDNN call costs ~30 us of fixed overhead). Weights above
    CALIBRATE_MAX_NUMEL take oneDNN untimed; the first weight of each smaller shape is multiplied in
    both layouts (<= ~1 ms) and keeps the faster copy, later ones of its shape get that layout."""
    key = tuple(w.shape)
    layout = "onednn" if w.numel() > CALIBRATE_MAX_NUMEL else _LAYOUTS.get(key)
    if layout is not None:
        return layout, prepack(w, layout)
    copies = {name: prepack(w, name) for name in LAYOUTS}
    with torch.inference_mode():
        xs = [torch.randn(rows, w.shape[1], dtype=w.dtype) for rows in CALIBRATE_ROWS]
        times = {name: sum(_time(lambda a, c=c: prepacked_linear(a, c, None), x) for x in xs)
                 for name, c in copies.items()}
    layout = _LAYOUTS[key] = min(LAYOUTS, key=times.__getitem__)
    return layout, copies[layout]


def prepack(w: torch.Tensor, layout: str = "onednn") -> torch.Tensor:
    """[out, in] fp32 -> the copy `prepacked_linear` multiplies by: oneDNN's blocked copy (an opaque
    mkldnn tensor: no storage, no data_ptr), or ("blas") the transposed [in, out] contiguous copy."""
    if layout == "blas":
        return w.detach().t().contiguous()
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_BATCH_HINT)


def prepacked_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ W.T (+ bias) with W from `prepack` (either layout)."""
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.mm(x2, packed) if bias is None else torch.addmm(bias, x2, packed)
    return out.view(*x.shape[:-1], packed.shape[1])


def prepack_model(model: nn.Module) -> dict[str, int]:
    """Give every layer that can multiply by a packed weight (its class declares `packed`: the
    tensor-parallel linears, the LM head) and holds a full-precision CPU fp32 weight its copy in the
    layout `choose_layout` picks, dropping the module's own reference to the dense weight (a tied
    embedding keeps its own). Returns the layers per layout. Call after loading (and quantizing)."""
    done = {"onednn": 0, "blas": 0}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if hasattr(type(m), "packed") and getattr(m, "quant", None) is None and isinstance(w, torch.Tensor) \
                and can_prepack(w):
            layout, m.packed = choose_layout(w.detach())
            del m.weight
            done[layout] += 1
    return done


class QuantizableLinear(nn.Module):
    """`_matmul(x, bias)` = x @ W.T (+ bias) with W full precision, int8 or int4 (after quantize_
    or prepare_quantized). Quantized, the layer holds buffers qweight/scales/zeros instead of `weight`."""

    quant: str | None = None  # None | "int8" | "int4" | "w8a8"
    group_size: int = 0  # int4 only
    packed: torch.Tensor | None = None  # full precision on CPU after prepack_model: replaces `weight`

    def quantize_(self, method: str) -> bool:
        """Replace `weight` with its quantized form (in place); every shape quantizes (True)."""
        self._set_quantized(method, *quantize_weight(self.weight.data, method))
        return True

    def prepare_quantized(self, method: str, group: int = 0, zeros: bool = True) -> None:
        """Give the layer the structure of `method` (empty buffers of the right shapes and dtypes, on
        the weight's device) so a quantized partition's tensors can be loaded into it by name.
        `group`: the int4 group size the partition used; `zeros=False`: the partition stored none."""
        w = self.weight
        tensors, group = quantize_weight(torch.empty(w.shape, dtype=w.dtype, device="meta"), method, group)
        if not zeros:
            tensors["zeros"] = None
        self._set_quantized(method, {k: None if t is None else torch.empty(t.shape, dtype=t.dtype, device=w.device)
                                     for k, t in tensors.items()}, group)

    def _set_quantized(self, method: str, tensors: dict[str, torch.Tensor | None], group: int) -> None:
        for name in QUANT_BUFFERS:  # not in state_dict: checkpoints and partitions are named explicitly
            self.register_buffer(name, tensors[name], persistent=False)
        self.group_size = group
        del self.weight
        self.quant = method

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant is None:
            if self.packed is not None:
                return prepacked_linear(x, self.packed, bias)
            return F.linear(x, self.weight, bias)
        if self.quant == "int8":
            return ops.int8_linear(x, self.qweight, self.scales, bias)
        if self.quant == "w8a8":
            return ops.w8a8_linear(x, self.qweight, self.scales, bias)
        return ops.int4_linear(x, self.qweight, self.scales, self.zeros, bias, self.group_size)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def quantize_model(model: nn.Module, method: str) -> tuple[int, int, int]:
    """Quantize every tensor-parallel linear layer of a loaded model in place.

    Returns (bytes before, bytes after, layers quantized); bytes are all parameters and buffers."""
    before = tensor_bytes(model)
    done = sum(1 for m in list(model.modules()) if isinstance(m, QuantizableLinear) and m.quantize_(method))
    return before, tensor_bytes(model), done


def full_shape(loaded) -> tuple[int, ...]:
    shape = loaded.get_shape() if hasattr(loaded, "get_shape") else loaded.shape
    return tuple(int(s) for s in shape)


def materialize(loaded, index=None) -> torch.Tensor:
    """Read `loaded[index]` (a lazy slice or a tensor) as a torch tensor."""
    part = loaded if index is None else loaded[index]
    return part if isinstance(part, torch.Tensor) else torch.as_tensor(part)


def check_shape(name: str, loaded, expected: Sequence[int]) -> None:
    got = full_shape(loaded)
    if got != tuple(expected):
        raise ValueError(f"{name}: checkpoint shape {list(got)} but the model expects {list(expected)}")


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"shard shape {list(value.shape)} does not fit parameter {list(param.shape)}")
    param.data.copy_(value.to(param.dtype))


def replicated_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    check_shape(getattr(param, "ckpt_name", "parameter"), loaded, param.shape)
    copy_into(param, materialize(loaded, slice(None)))


class ReplicatedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = replicated_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = replicated_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(QuantizableLinear):
    """Output features split over ranks: y[..., rank part] = x @ W[rank rows].T.

    `output_sizes` lists the logical matrices packed along the output dim (e.g. gate and up);
    each one is split over ranks separately, so shard `i` of rank r is rows
    [r*size_i/tp, (r+1)*size_i/tp) of checkpoint matrix i.
    """

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False,
                 gather_output: bool = False):
        super().__init__()
        tp = tp_size()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.shard_sizes = [divide(s, tp, "output features") for s in self.output_sizes]
        self.gather_output = gather_output
        out = sum(self.shard_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def shard_range(self, shard_id) -> tuple[int, int, int]:
        """(offset in this rank's param, rows to read start, rows count) for one packed matrix."""
        idx = 0 if shard_id is None else int(shard_id)
        offset = sum(self.shard_sizes[:idx])
        n = self.shard_sizes[idx]
        return offset, tp_rank() * n, n

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        offset, start, n = self.shard_range(shard_id)
        idx = 0 if shard_id is None else int(shard_id)
        expected = (self.output_sizes[idx],) + tuple(param.shape[1:])
        check_shape(getattr(param, "ckpt_name", "parameter"), loaded, expected)
        copy_into(param.data[offset:offset + n], materialize(loaded, slice(start, start + n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, self.bias)
        return tp_all_gather_last_dim(y) if self.gather_output else y


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections packed; heads split over ranks. KV heads fewer than ranks are replicated."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp, "attention heads") * tp
        self.kv_replicas = max(1, tp // num_kv_heads) if num_kv_heads < tp else 1
        if num_kv_heads >= tp:
            divide(num_kv_heads, tp, "key/value heads")
        elif tp % num_kv_heads:
            raise ValueError(f"tensor_parallel={tp} is not a multiple of key/value heads={num_kv_heads}")
        self.num_kv_heads = num_kv_heads
        self.local_heads = num_heads // tp
        self.local_kv_heads = max(1, num_kv_heads // tp)
        super().__init__(hidden_size, [num_heads * head_dim, self.local_kv_heads * head_dim * tp,
                                       self.local_kv_heads * head_dim * tp], bias=bias)
        # checkpoint sizes (logical) differ from the split sizes when kv heads are replicated
        self.output_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]

    def shard_range(self, shard_id) -> tuple[int, int, int]:
        idx = {"q": 0, "k": 1, "v": 2}[shard_id]
        offset = sum(self.shard_sizes[:idx])
        n = self.shard_sizes[idx]
        if idx == 0:
            return offset, tp_rank() * n, n
        kv_head = tp_rank() // self.kv_replicas if self.kv_replicas > 1 else tp_rank() * self.local_kv_heads
        return offset, kv_head * self.head_dim, n

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        idx = {"q": 0, "k": 1, "v": 2}[shard_id]
        offset, start, n = self.shard_range(shard_id)
        expected = (self.output_sizes[idx],) + tuple(param.shape[1:])
        check_shape(getattr(param, "ckpt_name", "parameter"), loaded, expected)
        copy_into(param.data[offset:offset + n], materialize(loaded, slice(start, start + n)))


class RowParallelLinear(QuantizableLinear):
    """Input features split over ranks; partial products summed with an all-reduce; bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_per_rank = divide(in_features, tp_size(), "input features")
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = replicated_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        check_shape(getattr(param, "ckpt_name", "parameter"), loaded, (param.shape[0], self.in_features))
        start = tp_rank() * self.in_per_rank
        copy_into(param, materialize(loaded, (slice(None), slice(start, start + self.in_per_rank))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tp_all_reduce(self._matmul(x, None))
        return y if self.bias is None else y + self.bias
