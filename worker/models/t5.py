"""T5 / Flan-T5 / UL2 as an encoder-decoder in the same engine.

- encoder: runs once per request (the runner calls `encode` when the request first runs; the
  requests new to a step in one pass);
  bidirectional self-attention with a bucketed relative-position bias, no KV cache.
- cross-attention: keys/values of the encoder output, computed once per request for this
  stage's decoder layers (`encode` returns them) and laid out once in the runner's CrossCache
  (worker/layers/encdec.py), which every step reads without re-padding.
- relative-position bias: tabulated per distance once (RelativePositionBias.table); the encoder's
  bias is made once per request, the decoder's once per step, and shared by all layers.
- decoder: the `layers` of DecoderModel; self-attention over the paged cache with a causal
  relative-position bias; starts from decoder_start_token_id (the engine puts it first).
- no 1/sqrt(d) in attention scores (T5 folds it into the weights); RMS-style layer norm.
- feed-forward: relu (original T5: wi, wo) or gated (Flan / v1.1: wi_0, wi_1, wo; gelu_new), wi_0 and
  wi_1 packed into one column-parallel layer (wi_01: one GEMM).
- LM head: the checkpoint's `lm_head.weight` if it has one, else tied to `shared`; decoder
  output scaled by d_model**-0.5 when the config says so (original T5, tied embeddings).
- pipeline parallel: decoder layers are split over stages; the (smaller) encoder runs whole
  on every stage, so every stage can compute its own layers' cross keys/values.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.context import get_context
from worker.layers.attention import PagedAttention
from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.encdec import cross_attend, full_attend
from worker.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from worker.layers.norm import RMSNorm
from worker.layers.position import RelativePositionBias
from worker.models.base import DecoderModel, StageMissing, make_layers
from worker.models.common import activation

# T5 has relative positions only; this is the length it was trained on (inputs and targets),
# used as both the encoder (prompt) and the decoder (generated tokens) limit unless the config
# says otherwise (n_positions).
DEFAULT_MAX_LEN = 512


def max_encoder_len(config) -> int:
    return int(getattr(config, "n_positions", 0) or DEFAULT_MAX_LEN)


class T5SelfAttentionCore(nn.Module):
    """q/k/v/o of one T5 self-attention; heads split over tensor-parallel ranks."""

    def __init__(self, config, paged: bool):
        super().__init__()
        self.head_dim = config.d_kv
        self.qkv = QKVParallelLinear(config.d_model, config.d_kv, config.num_heads, config.num_heads, bias=False)
        self.o = RowParallelLinear(config.num_heads * config.d_kv, config.d_model, bias=False)
        self.num_heads = self.qkv.local_heads
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale=1.0) if paged else None

    def project(self, x: torch.Tensor):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (t.reshape(-1, self.num_heads, self.head_dim) for t in (q, k, v))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # x: [T, d_model]; decoder: bias [B, H, Q, L] over the paged cache; encoder: a list, per
        # sequence of the step (back to back in x) its [H, S_i, S_i]
        q, k, v = self.project(x)
        o = self.attn(q, k, v, bias=bias) if self.attn is not None else full_attend(q, k, v, bias, 1.0)
        return self.o(o.reshape(o.shape[0], -1))


class T5CrossAttentionCore(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.head_dim = config.d_kv
        self.q = ColumnParallelLinear(config.d_model, [inner], bias=False)
        self.kv = ColumnParallelLinear(config.d_model, [inner, inner], bias=False)
        self.o = RowParallelLinear(inner, config.d_model, bias=False)
        self.num_heads = self.q.shard_sizes[0] // config.d_kv

    def encoder_kv(self, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # enc: [S, d_model] -> k, v: [S, H_local, D]
        k, v = self.kv(enc).chunk(2, dim=-1)
        return k.reshape(-1, self.num_heads, self.head_dim), v.reshape(-1, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        q = self.q(x).reshape(-1, self.num_heads, self.head_dim)
        o = cross_attend(q, layer, scale=1.0)
        return self.o(o.reshape(o.shape[0], -1))


class T5FF(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gated = bool(config.is_gated_act)
        if self.gated:  # wi_0 (through the activation) and wi_1 packed: one GEMM
            self.wi_01 = ColumnParallelLinear(config.d_model, [config.d_ff, config.d_ff], bias=False)
        else:
            self.wi = ColumnParallelLinear(config.d_model, [config.d_ff], bias=False)
        self.wo = RowParallelLinear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.dense_act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, d_model] -> [T, d_model]
        if self.gated:
            h0, h1 = self.wi_01(x).chunk(2, dim=-1)  # [T, d_ff_local] each
            return self.wo(self.act(h0) * h1)
        return self.wo(self.act(self.wi(x)))


def fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """As transformers does after every T5 sub-layer: in fp16, keep activations finite."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit)


def _sub(config, name: str, module: nn.Module) -> nn.Module:
    """One 'layer.N' entry of a T5 block: the module under its checkpoint name, plus layer_norm."""
    m = nn.Module()
    setattr(m, name, module)
    m.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
    return m


class T5EncoderBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([_sub(config, "SelfAttention", T5SelfAttentionCore(config, paged=False)),
                                    _sub(config, "DenseReluDense", T5FF(config))])

    def forward(self, x: torch.Tensor, bias: list[torch.Tensor]) -> torch.Tensor:
        # x: [E, d_model], sequences back to back; bias: per sequence [H, S_i, S_i]
        sa, ff = self.layer
        x = fp16_clamp(x + sa.SelfAttention(sa.layer_norm(x), bias))
        return fp16_clamp(x + ff.DenseReluDense(ff.layer_norm(x)))


class T5DecoderBlock(nn.Module):
    def __init__(self, config, layer_idx: int, rel_bias: RelativePositionBias):
        super().__init__()
        self.layer_idx = layer_idx
        self.rel_bias = [rel_bias]  # shared with the model; a list so it is not registered twice
        self.layer = nn.ModuleList([_sub(config, "SelfAttention", T5SelfAttentionCore(config, paged=True)),
                                    _sub(config, "EncDecAttention", T5CrossAttentionCore(config)),
                                    _sub(config, "DenseReluDense", T5FF(config))])

    def self_bias(self) -> torch.Tensor:
        """Causal relative-position bias of this step [B, H_local, Q, L]: made by the stage's first
        layer (one gather from the per-distance table), shared by all its layers."""
        ctx = get_context()
        if ctx.extras is None:
            ctx.extras = {}
        if "t5_self_bias" not in ctx.extras:
            q_start = ctx.context_lens - ctx.query_lens  # [B] position of each sequence's first query
            ctx.extras["t5_self_bias"] = self.rel_bias[0].span(q_start, ctx.max_query_len, ctx.max_context_len)
        return ctx.extras["t5_self_bias"]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sa, ca, ff = self.layer
        x = fp16_clamp(x + sa.SelfAttention(sa.layer_norm(x), self.self_bias()))
        x = fp16_clamp(x + ca.EncDecAttention(ca.layer_norm(x), self.layer_idx))
        return fp16_clamp(x + ff.DenseReluDense(ff.layer_norm(x)))


class T5ForConditionalGeneration(DecoderModel):
    """Checkpoint names follow transformers' T5ForConditionalGeneration."""

    is_encoder_decoder = True
    # our packed parameters and the shard ids each needs (read by the loader)
    packed_modules = {"q": ("qkv", "q"), "k": ("qkv", "k"), "v": ("qkv", "v"),
                      "EncDecAttention.k": ("kv", 0), "EncDecAttention.v": ("kv", 1),
                      "wi_0": ("wi_01", 0), "wi_1": ("wi_01", 1)}

    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.d_model
        buckets, dist = config.relative_attention_num_buckets, config.relative_attention_max_distance
        self.shared = VocabParallelEmbedding(config.vocab_size, d)
        self.encoder = nn.Module()
        self.encoder.rel_bias = RelativePositionBias(buckets, config.num_heads, dist, bidirectional=True)
        self.encoder.block = nn.ModuleList(T5EncoderBlock(config) for _ in range(config.num_layers))
        self.encoder.final_layer_norm = RMSNorm(d, config.layer_norm_epsilon)
        self.decoder = nn.Module()
        self.decoder.rel_bias = RelativePositionBias(buckets, config.num_heads, dist, bidirectional=False)
        self.decoder.block = make_layers(config.num_decoder_layers,
                                         lambda i: T5DecoderBlock(config, i, self.decoder.rel_bias))
        self.layers = self.decoder.block
        self.decoder.final_layer_norm = RMSNorm(d, config.layer_norm_epsilon)
        self.lm_head = ParallelLMHead(config.vocab_size, d)
        self.lm_head.weight.required_shards = {"tied"}
        self.lm_head.weight.weight_loader = self._lm_head_loader
        self.output_scale = d ** -0.5 if _scale_outputs(config) else 1.0

    @staticmethod
    def max_positions(config) -> int:
        return max_encoder_len(config)

    def _lm_head_loader(self, param, loaded, shard_id=None) -> None:
        # "own": the checkpoint's lm_head.weight (Flan-T5, untied); "tied": shared.weight, used
        # only when the checkpoint has no lm_head of its own (whichever order they come in)
        if shard_id == "tied" and getattr(param, "has_own", False):
            return
        self.lm_head.weight_loader(param, loaded)
        param.has_own = shard_id == "own"

    def map_checkpoint_name(self, name: str):
        if name == "shared.weight":
            return [("shared.weight", None), ("lm_head.weight", "tied")]
        if name == "lm_head.weight":
            return "lm_head.weight", "own"
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            return None  # copies of shared.weight
        for stack in ("encoder", "decoder"):
            if name == f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                return f"{stack}.rel_bias.weight", None
        for part in ("q", "k", "v"):
            if name.endswith(f".SelfAttention.{part}.weight"):
                return name.replace(f".SelfAttention.{part}.", ".SelfAttention.qkv."), part
        for i, part in enumerate(("k", "v")):
            if name.endswith(f".EncDecAttention.{part}.weight"):
                return name.replace(f".EncDecAttention.{part}.", ".EncDecAttention.kv."), i
        for i, part in enumerate(("wi_0", "wi_1")):
            if name.endswith(f".DenseReluDense.{part}.weight"):
                return name.replace(f".DenseReluDense.{part}.", ".DenseReluDense.wi_01."), i
        return name, None

    # ---- encoder: once per request ---------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, lens: list[int]) -> list[list]:
        """input_ids: [E] of the requests encoded this step, back to back (lens[i] tokens each, one
        pass for all: row-wise layers see E rows, attention stays within each request) -> per
        request, per decoder layer (k, v) [S_i, H_local, D] for the cross-attention of layers on
        this stage (None elsewhere)."""
        x = self.shared(input_ids)
        bias = [self.encoder.rel_bias.square(n) for n in lens]  # [H, S_i, S_i], shared by every encoder layer
        for block in self.encoder.block:
            x = block(x, bias)
        enc = self.encoder.final_layer_norm(x)
        kv = [None if isinstance(b, StageMissing) else b.layer[1].EncDecAttention.encoder_kv(enc)
              for b in self.decoder.block]  # per layer (k, v) [E, H_local, D]
        starts = [sum(lens[:i]) for i in range(len(lens))]
        return [[None if p is None else (p[0][a:a + n], p[1][a:a + n]) for p in kv] for a, n in zip(starts, lens)]

    # ---- decoder: the DecoderModel interface --------------------------------------------------
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.shared(input_ids)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder.final_layer_norm(x) * self.output_scale


def _scale_outputs(config) -> bool:
    """transformers >= 5 keeps this as `scale_decoder_outputs`; older configs said it with
    tie_word_embeddings (original T5: tied and scaled; v1.1 / Flan: untied, not scaled)."""
    scale = getattr(config, "scale_decoder_outputs", None)
    return bool(getattr(config, "tie_word_embeddings", True) if scale is None else scale)
