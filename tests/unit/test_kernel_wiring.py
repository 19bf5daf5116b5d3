"""The model path on both kernel paths: attention (rotary + cache write, decode rows through the
paged-attention kernel, prompt chunks through torch, in one mixed step), norms with a fused
residual add, and the sampler, give the same results with the native library as with torch.

Tolerance: fp32, 1e-5 relative to the output's scale (summation order only). Sampled tokens
must be identical: both paths implement native/reference.py's sampling specification.
"""

from __future__ import annotations

import pytest
import torch

from native import ops
from worker.context import StepContext, step_context
from worker.engine.sampler import sample
from worker.engine.sequence import Sampling, Sequence
from worker.layers.attention import PagedAttention
from worker.layers.norm import LayerNorm, RMSNorm
from worker.layers.rotary import RotaryEmbedding

TORCH = ops.Backend("cpu", None, "forced by test")


@pytest.fixture
def native_backend():
    chosen = ops.backend("cpu")
    if chosen.ops is None:
        pytest.skip(f"native CPU extension unavailable: {chosen.detail}")
    return chosen


@pytest.fixture
def on_path(native_backend, restore_backends):
    """Call on_path(backend) to pin the CPU kernel path; restored afterwards."""
    return lambda chosen: ops._force("cpu", chosen)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = max(b.abs().max().item(), 1e-6)
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def mixed_step(block_size: int = 4) -> tuple[StepContext, torch.Tensor]:
    """Two decoding sequences (contexts 9 and 3) and one 6-token prompt chunk after 5 cached tokens."""
    query_lens = torch.tensor([1, 6, 1])
    context_lens = torch.tensor([9, 11, 3])
    tables = torch.tensor([[3, 7, 1], [0, 2, 5], [6, 0, 0]])
    positions, slots = [], []
    for b in range(3):
        for p in range(int(context_lens[b] - query_lens[b]), int(context_lens[b])):
            positions.append(p)
            slots.append(int(tables[b, p // block_size]) * block_size + p % block_size)
    start = torch.zeros(4, dtype=torch.long)
    start[1:] = query_lens.cumsum(0)
    ctx = StepContext(slot_mapping=torch.tensor(slots), block_tables=tables, context_lens=context_lens,
                      query_lens=query_lens, query_start=start, max_query_len=6, max_context_len=11,
                      block_size=block_size)
    return ctx, torch.tensor(positions)


@pytest.mark.parametrize("neox,rot_dim,window,alibi", [(True, 16, None, False), (False, 8, None, False),
                                                       (True, 16, 10, False), (True, 16, None, True)])
def test_attention_mixed_step_native_equals_torch(on_path, native_backend, neox, rot_dim, window, alibi):
    H, Hkv, D, T = 4, 2, 16, 8
    g = torch.Generator().manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) if alibi else None
    rotary = None if alibi else RotaryEmbedding(inv_freq, 1.0, neox_style=neox)
    attn = PagedAttention(H, Hkv, D, sliding_window=window, alibi_slopes=slopes, rotary=rotary)
    cache_k = torch.randn(8, 4, Hkv, D, generator=g)
    cache_v = torch.randn(8, 4, Hkv, D, generator=g)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H, Hkv, Hkv))
    ctx, positions = mixed_step()
    outs = []
    for chosen in (native_backend, TORCH):
        on_path(chosen)
        attn.k_cache, attn.v_cache = cache_k.clone(), cache_v.clone()
        with step_context(ctx):
            outs.append((attn(q, k, v, positions), attn.k_cache, attn.v_cache))
    for a, b in zip(*outs):
        close(a, b)


def test_norms_fuse_the_residual_add_on_both_paths(on_path, native_backend):
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    for norm in (RMSNorm(64, 1e-5), LayerNorm(64, 1e-5)):
        norm.weight.data.normal_(1.0, 0.1, generator=g)
        results = []
        for chosen in (native_backend, TORCH):
            on_path(chosen)
            out, summed = norm(x, residual=r)
            close(summed, x + r)
            close(out, norm(x + r))
            results.append(out)
        close(*results)


def _seqs():
    seqs = []
    for i, s in enumerate([Sampling(temperature=0.8, top_k=40, top_p=0.9, seed=3, return_log_probs=True),
                           Sampling(temperature=0.0),
                           Sampling(temperature=1.2, repetition_penalty=1.3, seed=5),
                           Sampling(temperature=0.7, top_p=0.5, seed=8, return_log_probs=True)]):
        seq = Sequence(f"s{i}", [1, 2, 3, 7], s, emit=lambda *a: None)
        seq.generator = torch.Generator().manual_seed(s.seed)
        seqs.append(seq)
    return seqs


def test_sampler_gives_the_same_tokens_on_both_paths(on_path, native_backend):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(2)) * 3
    runs = []
    for chosen in (native_backend, TORCH):
        on_path(chosen)
        seqs = _seqs()
        runs.append([sample(logits, seqs) for _ in range(5)])  # each call draws again from each generator
    assert [t for t, _ in runs[0]] == [t for t, _ in runs[1]]
    for tokens, lps in runs[0]:
        assert tokens[1] == int(torch.argmax(logits[1]))
        assert lps[0] < 0 and lps[3] <= 0 and lps[2] == 0.0  # row 2 did not ask for log-probs


def test_half_precision_on_a_cpu_without_its_instructions_is_named_in_a_warning():
    from worker.engine.build import slow_half_precision

    note = slow_half_precision("cpu", torch.bfloat16, flags={"avx2", "avx512f"})
    assert note and "bf16" in note and "avx512_bf16" in note
    assert slow_half_precision("cpu", torch.bfloat16, flags={"avx512_bf16"}) is None
    assert slow_half_precision("cpu", torch.float16, flags={"amx_fp16"}) is None
    assert slow_half_precision("cpu", torch.float32, flags={"avx2"}) is None
    assert slow_half_precision("cuda", torch.bfloat16, flags={"avx2"}) is None
