"""What every decoder-only model provides, so that the runner (and pipeline stages) can drive it.

A model is: `embed(input_ids, positions) -> [T, hidden]`, `layers` (a ModuleList; each layer maps
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

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        # positions [T] are needed by models with learned absolute positions (GPT-2, OPT)
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden [T, hidden]
        x = self.embed(input_ids, positions)
        for layer in self.layers:
            x = layer(positions, x)
        return self.final_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def tie_head(self, config, head: nn.Module, embedding: nn.Module, default: bool) -> None:
        """Share the embedding's weight with the LM head when the config says so (`default`: the
        family's transformers default for `tie_word_embeddings`). Sets `self.tied`."""
        self.tied = bool(getattr(config, "tie_word_embeddings", default))
        if self.tied:
            head.tie(embedding)

    def attention_layers(self) -> list:
        from worker.layers.attention import PagedAttention

        return [m for m in self.modules() if isinstance(m, PagedAttention)]


def map_with_prefix(model: nn.Module, name: str, prefix: str, ignored: tuple[str, ...] = ()) -> tuple | None:
    """The usual checkpoint-name mapping: names without the model's prefix (older hub files, e.g.
    'h.0.attn...' for GPT-2) get it; deliberately unused buffers (`ignored` suffixes) map to None;
    separate q/k/v (or gate/up) tensors map to their packed parameter via `model.packed_modules`."""
    if any(name.endswith(s) for s in ignored):
        return None
    if not name.startswith(prefix) and not name.startswith("lm_head."):
        name = prefix + name
    for ckpt, (ours, shard) in getattr(model, "packed_modules", {}).items():
        if f".{ckpt}." in name:
            return name.replace(f".{ckpt}.", f".{ours}."), shard
    return name, None
