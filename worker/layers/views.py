"""Lazy views of checkpoint tensors whose layout differs from ours, and loaders for fused weights.

A view behaves like the `loaded` argument of a weight_loader (it has `get_shape()` and can be
indexed), but presents a *logical* tensor: a transposed Conv1D weight, or one of q/k/v out of a
fused projection. Indexing a view reads only the rows this rank needs from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.layers.linear import full_shape, materialize


class View:
    """A logical tensor of `shape`; `read(index)` returns `tensor[index]` for that logical tensor."""

    def __init__(self, shape: tuple[int, ...], read: Callable[[object], torch.Tensor]):
        self.shape = tuple(int(s) for s in shape)
        self._read = read

    def get_shape(self) -> tuple[int, ...]:
        return self.shape

    def __getitem__(self, index) -> torch.Tensor:
        return self._read(index)


def _split_index(index, ndim: int) -> tuple:
    if not isinstance(index, tuple):
        index = (index,)
    return tuple(index) + (slice(None),) * (ndim - len(index))


def _bounds(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError("views support contiguous slices only")
    return start, stop


def transposed(loaded) -> object:
    """A 2-D checkpoint tensor stored [in, out] (GPT-2 Conv1D) seen as [out, in]; 1-D passes through."""
    shape = full_shape(loaded)
    if len(shape) != 2:
        return loaded

    def read(index):
        rows, cols = _split_index(index, 2)
        return materialize(loaded, (cols, rows)).T

    return View((shape[1], shape[0]), read)


def row_block(loaded, offset: int, size: int) -> View:
    """Rows [offset, offset + size) of a checkpoint tensor (e.g. q out of a [q; k; v] concat)."""
    shape = full_shape(loaded)

    def read(index):
        rows, *rest = _split_index(index, len(shape))
        start, stop = _bounds(rows, size)
        return materialize(loaded, (slice(offset + start, offset + stop), *rest))

    return View((size, *shape[1:]), read)


def per_head_part(loaded, num_heads: int, parts: int, which: int) -> View:
    """Part `which` of a per-head fused tensor laid out [num_heads, parts, head_dim, ...]
    (BLOOM / GPT-NeoX query_key_value), seen as [num_heads * head_dim, ...]. Row slices must
    start and end on head boundaries (they do: ranks own whole heads)."""
    shape = full_shape(loaded)
    if shape[0] % (num_heads * parts):
        raise ValueError(f"fused tensor of {shape[0]} rows does not split into {num_heads} heads x {parts}")
    head_dim = shape[0] // (num_heads * parts)

    def read(index):
        rows, *rest = _split_index(index, len(shape))
        start, stop = _bounds(rows, num_heads * head_dim)
        if start % head_dim or stop % head_dim:
            raise ValueError(f"rows [{start}, {stop}) do not align with heads of {head_dim}")
        h0, h1 = start // head_dim, stop // head_dim
        raw = materialize(loaded, (slice(h0 * parts * head_dim, h1 * parts * head_dim), *rest))
        raw = raw.reshape(h1 - h0, parts, head_dim, *raw.shape[1:])
        return raw[:, which].reshape((h1 - h0) * head_dim, *raw.shape[3:])

    return View((num_heads * head_dim, *shape[1:]), read)


def set_loader(linear, wrap: Callable[[object], object] | None = None, split=None) -> None:
    """Re-point a layer's weight (and bias) loaders: `wrap` turns each checkpoint tensor into a
    view first; `split` fans one fused tensor out to the layer's packed shards."""
    for name in ("weight", "bias"):
        param = getattr(linear, name, None)
        if param is None:
            continue
        base = param.weight_loader
        if split is not None:
            def base(p, loaded, shard_id=None, _split=split):
                for sid, view in _split(loaded):
                    linear.weight_loader(p, view, sid)
        if wrap is not None:
            param.weight_loader = (lambda p, loaded, shard_id=None, _b=base: _b(p, wrap(loaded), shard_id))
        else:
            param.weight_loader = base
