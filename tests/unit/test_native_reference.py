"""The plain-torch references (native/reference.py) against independent formulations:
dense attention, Hugging Face's own RMSNorm / rotary code, quantisation error bounds, and the
sampling contract (greedy, filters, per-row determinism, batch invariance). Always run."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_rotary
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rotary

from native import reference


def test_paged_attention_equals_dense_attention_gqa_alibi():
    g = torch.Generator().manual_seed(0)
    H, Hkv, D, bs, n = 8, 2, 32, 4, 10
    q = torch.randn(1, H, D, generator=g)
    k, v = torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)
    # scatter the n tokens into blocks 5, 2, 7 (3 blocks of 4 slots, last partly used)
    k_cache, v_cache = torch.zeros(8, bs, Hkv, D), torch.zeros(8, bs, Hkv, D)
    table = torch.tensor([[5, 2, 7]], dtype=torch.int32)
    for t in range(n):
        k_cache[table[0, t // bs], t % bs] = k[t]
        v_cache[table[0, t // bs], t % bs] = v[t]
    slopes = torch.rand(H, generator=g)
    got = reference.paged_attention_decode(
        q, k_cache, v_cache, table, torch.tensor([n], dtype=torch.int32), 0.3, slopes
    )
    for h in range(H):
        kh, vh = k[:, h // (H // Hkv)], v[:, h // (H // Hkv)]  # query head h reads kv head h // group
        scores = 0.3 * kh @ q[0, h] + slopes[h] * (torch.arange(n) - (n - 1))
        torch.testing.assert_close(got[0, h], torch.softmax(scores, 0) @ vh, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_hf_llama():
    g = torch.Generator().manual_seed(1)
    x, res = torch.randn(3, 64, generator=g).bfloat16(), torch.randn(3, 64, generator=g).bfloat16()
    norm = LlamaRMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
        out, r = reference.fused_add_rms_norm(x, res, norm.weight, 1e-6)
        assert torch.equal(r, x + res)
        assert torch.equal(out, norm(x + res))
        out, r = reference.fused_add_rms_norm(x, None, norm.weight, 1e-6)
        assert torch.equal(r, x) and torch.equal(out, norm(x))


def test_layer_norm_matches_torch():
    x, res = torch.randn(3, 64), torch.randn(3, 64)
    w, b = torch.randn(64), torch.randn(64)
    out, r = reference.fused_add_layer_norm(x, res, w, b, 1e-5)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x + res, (64,), w, b, 1e-5))
    torch.testing.assert_close(r, x + res)


def _cos_sin(max_pos: int, rot_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq  # [max_pos, rot_dim/2]
    return freqs.cos(), freqs.sin()


@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_matches_hf_and_writes_slots(is_neox):
    g = torch.Generator().manual_seed(2)
    T, H, Hkv, D, rot = 5, 4, 2, 16, 8
    q, k, v = (
        torch.randn(T, H, D, generator=g),
        torch.randn(T, Hkv, D, generator=g),
        torch.randn(T, Hkv, D, generator=g),
    )
    pos = torch.tensor([0, 7, 3, 3, 11])
    cos, sin = _cos_sin(16, rot)
    k_cache, v_cache = torch.zeros(3, 4, Hkv, D), torch.zeros(3, 4, Hkv, D)
    slots = torch.tensor([4, -1, 0, 11, 5])
    q_rot, k_rot = reference.rotary_cache_write(
        q, k, v, pos, torch.cat([cos, sin], 1), k_cache, v_cache, slots, is_neox, rot
    )
    if is_neox:  # HF Llama: cos/sin repeated over both halves, [T, rot]
        c, s = torch.cat([cos, cos], 1)[pos], torch.cat([sin, sin], 1)[pos]
        want_q, want_k = llama_rotary(q[..., :rot], k[..., :rot], c, s, unsqueeze_dim=1)
    else:  # HF GPT-J: [batch, seq, heads, dim] with sin/cos [batch, seq, rot/2]
        s, c = sin[pos][None], cos[pos][None]
        want_q = gptj_rotary(q[None, ..., :rot], s, c)[0]
        want_k = gptj_rotary(k[None, ..., :rot], s, c)[0]
    torch.testing.assert_close(q_rot[..., :rot], want_q)
    torch.testing.assert_close(k_rot[..., :rot], want_k)
    assert torch.equal(q_rot[..., rot:], q[..., rot:]) and torch.equal(k_rot[..., rot:], k[..., rot:])
    flat_k, flat_v = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k_rot[t]) and torch.equal(flat_v[slot], v[t])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [i for i in range(12) if i not in written]
    assert flat_k[untouched].abs().sum() == 0 and flat_v[untouched].abs().sum() == 0


def test_int8_quantisation_error_bound():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 256, generator=g)
    qw, scales = reference.quantize_int8(w)
    assert qw.dtype == torch.int8 and scales.shape == (64,)
    assert (qw.float() * scales[:, None] - w).abs().max() <= scales.max() / 2 + 1e-6
    x = torch.randn(3, 256, generator=g)
    # the reference scales after the dot product, this side before: fp32 rounding of ~256-term sums
    # (|y| ~ 16) differs by a few ulps, so the tolerance is absolute 1e-4 rather than the default 1e-5
    torch.testing.assert_close(reference.int8_linear(x, qw, scales), x @ (qw.float() * scales[:, None]).T,
                               rtol=1e-5, atol=1e-4)


def test_w8a8_reference_is_exact_integer_maths_and_close_to_fp32():
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(9, 300, generator=g) * 3, torch.randn(40, 300, generator=g)
    qx, xs = reference.quantize_rows_int8(x)
    assert qx.dtype == torch.int8 and int(qx.abs().max()) == 127  # each row's amax maps to +-127
    assert ((qx.float() * xs[:, None] - x).abs() <= xs[:, None] / 2 + 1e-6).all()  # half a step
    qw, ws = reference.quantize_int8(w)
    acc = reference.int8_gemm(qx, qw)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), qx.long() @ qw.long().T)
    y = reference.w8a8_linear(x, qw, ws)
    assert torch.equal(y, acc.float() * xs[:, None] * ws[None, :])
    err = (y - x @ w.T).abs().max() / (x @ w.T).abs().max()
    assert err < 0.03, err  # two int8 roundings
    zero = reference.quantize_rows_int8(torch.zeros(2, 8))
    assert not zero[0].any() and (zero[1] > 0).all()


def test_int4_pack_roundtrip_and_error_bound():
    q = torch.randint(0, 16, (8, 128), dtype=torch.uint8)
    packed = reference.pack_int4(q)
    assert packed.shape == (8, 64) and torch.equal(reference.unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 16] << 4)  # byte j: weight j low, weight j+16 high
    w = torch.randn(16, 256)
    packed, scales, zeros = reference.quantize_int4(w, 64)
    assert scales.shape == zeros.shape == (16, 4)
    deq = reference.int4_dequantize(packed, scales, zeros, 64)
    assert ((deq - w).abs().reshape(16, 4, 64) <= scales[..., None] * 0.5 + 1e-5).all()
    with pytest.raises(ValueError):
        reference.quantize_int4(w, 48)


def _logits(B=6, V=50, seed=3):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 2


def test_sampling_greedy_and_degenerate_filters_give_argmax():
    logits = _logits()
    B = logits.shape[0]
    u = torch.rand(B, dtype=torch.float64)
    argmax = logits.argmax(-1)
    ones, zeros = torch.ones(B), torch.zeros(B, dtype=torch.long)
    assert torch.equal(reference.sample_with_uniforms(logits, torch.zeros(B), zeros, ones, u), argmax)
    assert torch.equal(
        reference.sample_with_uniforms(logits, ones, torch.ones(B, dtype=torch.long), ones, u), argmax
    )
    assert torch.equal(reference.sample_with_uniforms(logits, ones, zeros, torch.full((B,), 1e-6), u), argmax)


def test_sampling_respects_top_k_and_top_p_sets():
    logits = _logits(B=1, V=40)
    order = logits[0].argsort(descending=True)
    probs = torch.softmax(logits[0].double(), 0)[order]
    nucleus = int((torch.cumsum(probs, 0) - probs < 0.6).sum())
    seen_k, seen_p = set(), set()
    for i in range(300):
        u = torch.tensor([i / 300], dtype=torch.float64)
        seen_k.add(
            int(reference.sample_with_uniforms(logits, torch.ones(1), torch.tensor([5]), torch.ones(1), u))
        )
        seen_p.add(
            int(
                reference.sample_with_uniforms(
                    logits, torch.ones(1), torch.tensor([0]), torch.tensor([0.6]), u
                )
            )
        )
    assert seen_k == set(order[:5].tolist())
    assert seen_p == set(order[:nucleus].tolist())


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    u = torch.arange(1000, dtype=torch.float64)[:, None] / 1000  # a fine grid of uniforms
    counts = torch.zeros(4)
    for ui in u:
        counts[
            int(
                reference.sample_with_uniforms(
                    logits, torch.ones(1), torch.zeros(1, dtype=torch.long), torch.ones(1), ui
                )
            )
        ] += 1
    torch.testing.assert_close(counts / 1000, torch.softmax(logits[0], 0), atol=1.5e-3, rtol=0)


def test_sampling_is_per_row_deterministic_and_batch_invariant():
    logits = _logits(B=4, V=100)
    params = (
        torch.tensor([0.7, 1.0, 0.0, 1.2]),
        torch.tensor([0, 20, 0, 3]),
        torch.tensor([0.9, 1.0, 1.0, 0.5]),
    )

    def run(rows, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return reference.sample_top_k_top_p(logits[rows], *(p[rows] for p in params), gens)

    full = run([0, 1, 2, 3], [10, 11, 12, 13])
    assert torch.equal(full, run([0, 1, 2, 3], [10, 11, 12, 13]))
    for i in range(4):  # the same row alone, or in another batch, gives the same token
        assert int(run([i], [10 + i])[0]) == int(full[i])
    assert torch.equal(run([3, 1], [13, 11]), full[[3, 1]])
    with pytest.raises(ValueError):
        reference.sample_top_k_top_p(logits, *params, [None])
