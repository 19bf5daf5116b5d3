"""Position information that is not rotary: learned absolute embeddings (GPT-2, OPT), ALiBi
slopes (BLOOM) and T5's bucketed relative-position bias. Head-indexed tensors are sliced to the
heads of this tensor-parallel rank (ranks own contiguous blocks of heads)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from worker.distributed import divide, tp_rank, tp_size
from worker.layers.linear import check_shape, copy_into, materialize, replicated_loader


def local_heads(num_heads: int) -> slice:
    """Heads [start, stop) owned by this tensor-parallel rank."""
    n = divide(num_heads, tp_size(), "attention heads")
    return slice(tp_rank() * n, (tp_rank() + 1) * n)


class ReplicatedEmbedding(nn.Module):
    """A small lookup table held whole on every rank (absolute positions): ids [T] -> [T, dim]."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num, dim), requires_grad=False)
        self.weight.weight_loader = replicated_loader

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slope per head [num_heads] fp32, as BLOOM computes them (non powers of two included)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
    return slopes


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5 (Mesh TensorFlow) bucket of `relative` = key position - query position (int64)."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative, large)


class RelativePositionBias(nn.Module):
    """T5's learned bias table [num_buckets, num_heads] (checkpoint layout), this rank's heads only.

    The bias depends on the relative position alone, so it is tabulated once per distance
    ([H_local, 2n-1] for relative positions -(n-1)..n-1, grown on demand, dropped when weights
    load): a step's or a request's bias is then one gather, with no bucket arithmetic."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.num_buckets, self.num_heads = num_buckets, num_heads
        self.max_distance, self.bidirectional = max_distance, bidirectional
        self.heads = local_heads(num_heads)
        n = self.heads.stop - self.heads.start
        self.weight = nn.Parameter(torch.zeros(num_buckets, n), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self._table: torch.Tensor | None = None  # [H_local, 2n-1]: bias of relative position r at r + n-1

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        check_shape(getattr(param, "ckpt_name", "relative_attention_bias"), loaded, (self.num_buckets, self.num_heads))
        copy_into(param.data, materialize(loaded, (slice(None), self.heads)))
        self._table = None

    def table(self, n: int) -> torch.Tensor:
        """[H_local, 2m-1] with m >= n: the bias of every relative position in (-m, m)."""
        if self._table is None or self._table.shape[1] < 2 * n - 1:
            m = max(n, 64, 0 if self._table is None else self._table.shape[1])  # grow at least twofold
            rel = torch.arange(-(m - 1), m, device=self.weight.device)
            b = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
            self._table = F.embedding(b, self.weight).t().contiguous()
        return self._table

    def forward(self, relative: torch.Tensor) -> torch.Tensor:
        # relative: [..., Q, K] key - query positions -> bias [..., H_local, Q, K]
        b = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return F.embedding(b, self.weight).movedim(-1, -3)

    def span(self, q_start: torch.Tensor, Q: int, K: int) -> torch.Tensor:
        """Bias of queries at positions q_start[b] + i (i < Q) over keys 0..K-1 -> [B, H_local, Q, K]."""
        n = int(max(K, Q + int(q_start.max()) if q_start.numel() else Q))
        t = self.table(n)
        c = (t.shape[1] - 1) // 2  # index of relative position 0
        qi = torch.arange(Q, device=q_start.device)
        rel = torch.arange(K, device=q_start.device)[None, None, :] - (q_start[:, None] + qi[None, :])[:, :, None]
        return t[:, rel + c].movedim(0, 1).contiguous()  # [B, H, Q, K]

    def square(self, S: int) -> torch.Tensor:
        """Bias of a whole sequence of S tokens over itself (the encoder) -> [H_local, S, S]."""
        t = self.table(S)
        c = (t.shape[1] - 1) // 2
        pos = torch.arange(S, device=t.device)
        return t[:, pos[None, :] - pos[:, None] + c]
