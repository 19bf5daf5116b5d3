"""What every decoder-only model provides, so that the runner (and pipeline stages) can drive it.

A model is: `embed(input_ids) -> [T, hidden]`, `layers` (a ModuleList; each layer maps
(positions [T], x [T, hidden]) -> x), `final_norm(x)`, `compute_logits(h [B, hidden]) -> [B, vocab]`
and `attention_layers()`. Layers outside this rank's pipeline stage are `StageMissing` placeholders
(see `make_layers`), so a stage holds only its own weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from worker.distributed import get_parallel_state


class StageMissing(nn.Module):
    """A layer that lives on another pipeline stage: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer belongs to another pipeline stage")


def stage_range(num_layers: int) -> tuple[int, int]:
    """[start, end) of the layers owned by this rank's pipeline stage (balanced, earlier stages
    take the remainder, unless the parallel state carries an explicit split)."""
    return get_parallel_state().layer_range(num_layers)


def make_layers(num_layers: int, factory: Callable[[int], nn.Module]) -> nn.ModuleList:
    start, end = stage_range(num_layers)
    return nn.ModuleList(factory(i) if start <= i < end else StageMissing() for i in range(num_layers))


class DecoderModel(nn.Module):
    """Base for decoder-only models: the generic forward over the layers this stage owns."""

    layers: nn.ModuleList

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden [T, hidden]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(positions, x)
        return self.final_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list:
        return [m for m in self.modules() if m.__class__.__name__ == "PagedAttention"]
