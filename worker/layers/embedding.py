"""Vocabulary-parallel embedding and LM head: each rank holds vocab rows [r*V/tp, (r+1)*V/tp)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.distributed import tp_all_gather_last_dim, tp_all_reduce, tp_rank, tp_size
from worker.layers.linear import check_shape, copy_into, materialize, prepacked_linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        tp = tp_size()
        self.vocab_size = vocab_size
        self.per_rank = (vocab_size + tp - 1) // tp  # the last rank may hold padding rows
        self.start = tp_rank() * self.per_rank
        self.end = min(self.start + self.per_rank, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        check_shape(getattr(param, "ckpt_name", "embedding"), loaded, (self.vocab_size, param.shape[1]))
        n = self.end - self.start
        param.data.zero_()
        copy_into(param.data[:n], materialize(loaded, slice(self.start, self.end)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, hidden]
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        mask = (input_ids >= self.start) & (input_ids < self.end)
        local = F.embedding(torch.where(mask, input_ids - self.start, 0), self.weight)
        return tp_all_reduce(local * mask.unsqueeze(-1).to(local.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [B, hidden] -> logits [B, vocab]; tied heads share the embedding's parameter."""

    packed: torch.Tensor | None = None  # CPU fp32 after linear.prepack_model: replaces `weight`

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool = False):
        super().__init__(vocab_size, hidden_size)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.per_rank), requires_grad=False)
            self.bias.weight_loader = self.bias_loader
        else:
            self.register_parameter("bias", None)

    def bias_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        check_shape("lm_head.bias", loaded, (self.vocab_size,))
        param.data.zero_()
        copy_into(param.data[: self.end - self.start], materialize(loaded, slice(self.start, self.end)))

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            logits = prepacked_linear(hidden, self.packed, self.bias)
        else:
            logits = F.linear(hidden, self.weight, self.bias)
        logits = tp_all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
