"""Every native kernel against its plain-torch reference (native/reference.py) on random inputs.

Tolerances: fp32 outputs within 1e-4 relative to the output's scale (int8/int4: 1e-4 of the
output scale, as the only difference is summation order); bf16 / fp16 outputs within 2 units in
the last place of the output scale (2**-7 / 2**-10 relative), since both sides round the same
fp32 value and can differ by one rounding step. Sampling must match exactly.
Skipped, with the reason, when the extension was not built (`make native`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from native import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2 * 2**-7, torch.float16: 2 * 2**-10}


@pytest.fixture(scope="module")
def nat():
    chosen = ops.backend("cpu")
    if chosen.ops is None:
        pytest.skip(f"native CPU extension unavailable: {chosen.detail}")
    return chosen.ops


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(want.float().abs().max().item(), 1e-6)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def rand(*shape, dtype=torch.float32, gen):
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,alibi", [(8, 8, False), (8, 2, False), (4, 1, True)])
@pytest.mark.parametrize("D", [64, 40, 32])  # fp32 with D % 16 == 0 (AVX-512) or % 8 (AVX2) has its own path
def test_paged_attention_decode(nat, dtype, heads, kv_heads, alibi, D):
    g = torch.Generator().manual_seed(1)
    B, bs, nb = 4, 16, 48
    q = rand(B, heads, D, dtype=dtype, gen=g)
    kc, vc = rand(nb, bs, kv_heads, D, dtype=dtype, gen=g), rand(nb, bs, kv_heads, D, dtype=dtype, gen=g)
    tables = torch.randperm(nb, generator=g)[: B * 12].reshape(B, 12).int()
    lens = torch.tensor([1, 17, 100, 192], dtype=torch.int32)  # 1 token, partial, full table
    slopes = torch.rand(heads, generator=g) if alibi else None
    got = nat.paged_attention_decode(q, kc, vc, tables, lens, D**-0.5, slopes)
    assert_close(got, reference.paged_attention_decode(q, kc, vc, tables, lens, D**-0.5, slopes), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_fused_add_norms(nat, dtype, with_residual):
    g = torch.Generator().manual_seed(2)
    x, res = rand(6, 1000, dtype=dtype, gen=g), rand(6, 1000, dtype=dtype, gen=g)
    w, b = rand(1000, dtype=dtype, gen=g), rand(1000, dtype=dtype, gen=g)
    r = res if with_residual else None
    for got, want in zip(
        nat.fused_add_rms_norm(x, r, w, 1e-6), reference.fused_add_rms_norm(x, r, w, 1e-6), strict=True
    ):
        assert_close(got, want, dtype)
    for got, want in zip(
        nat.fused_add_layer_norm(x, r, w, b, 1e-5),
        reference.fused_add_layer_norm(x, r, w, b, 1e-5),
        strict=True,
    ):
        assert_close(got, want, dtype)
    out, _ = nat.fused_add_layer_norm(x, r, w, None, 1e-5)
    assert_close(out, reference.fused_add_layer_norm(x, r, w, None, 1e-5)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [64, 32])
def test_rotary_cache_write(nat, dtype, is_neox, rot_dim):
    g = torch.Generator().manual_seed(3)
    T, H, Hkv, D, nb, bs = 9, 8, 2, 64, 6, 4
    q, k, v = (
        rand(T, H, D, dtype=dtype, gen=g),
        rand(T, Hkv, D, dtype=dtype, gen=g),
        rand(T, Hkv, D, dtype=dtype, gen=g),
    )
    positions = torch.randint(0, 50, (T,), generator=g)
    cos_sin = rand(50, rot_dim, gen=g)  # fp32 cache with low-precision activations is allowed
    slots = torch.tensor([0, 3, -1, 5, 23, 8, -1, 12, 1])
    caches = [torch.zeros(nb, bs, Hkv, D, dtype=dtype) for _ in range(4)]
    got = nat.rotary_cache_write(q, k, v, positions, cos_sin, caches[0], caches[1], slots, is_neox, rot_dim)
    want = reference.rotary_cache_write(
        q, k, v, positions, cos_sin, caches[2], caches[3], slots, is_neox, rot_dim
    )
    for a, b in zip([*got, caches[0], caches[1]], [*want, caches[2], caches[3]], strict=True):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 4, 7, 8, 13, 33, 70])  # tiles of 8 (AVX2 4), tails; > 64: dequant + GEMM
@pytest.mark.parametrize("in_features", [320, 200])  # 200: not a multiple of the 16-wide vectors
def test_int8_linear(nat, dtype, tokens, in_features):
    g = torch.Generator().manual_seed(4)
    w, bias = rand(203, in_features, gen=g), rand(203, gen=g)  # 203 rows: not a multiple of 4
    qw, scales = reference.quantize_int8(w)
    x = rand(tokens, in_features, dtype=dtype, gen=g)
    assert_close(nat.int8_linear(x, qw, scales, bias), reference.int8_linear(x, qw, scales, bias), dtype)
    assert_close(nat.int8_linear(x, qw, scales, None), reference.int8_linear(x, qw, scales, None), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 4, 6, 8, 13, 70])
@pytest.mark.parametrize("group_size,symmetric", [(128, False), (64, True), (32, False)])
def test_int4_linear(nat, dtype, tokens, group_size, symmetric):
    g = torch.Generator().manual_seed(5)
    w, bias = rand(133, 256, gen=g), rand(133, gen=g)
    packed, scales, zeros = reference.quantize_int4(w, group_size)
    if symmetric:
        zeros = None
    x = rand(tokens, 256, dtype=dtype, gen=g)
    want = reference.int4_linear(x, packed, scales, zeros, bias, group_size)
    assert_close(nat.int4_linear(x, packed, scales, zeros, bias, group_size), want, dtype)


W8A8_SHAPES = [(203, 320), (203, 200), (64, 1024), (37, 31), (5, 16), (9, 1)]  # rows % 4, in % 16 tails


@pytest.mark.parametrize("tokens", [1, 2, 3, 6, 7, 13, 32, 64, 70])  # tiles of 4 tokens (x 2 rows; 2 tokens x 4 rows), tails
@pytest.mark.parametrize("out_features,in_features", W8A8_SHAPES)
def test_w8a8_matches_reference_bit_for_bit(nat, tokens, out_features, in_features):
    """Integer codes and int32 accumulators are exact, so the fp32 result is identical too."""
    g = torch.Generator().manual_seed(8)
    w, bias = rand(out_features, in_features, gen=g), rand(out_features, gen=g)
    qw, scales = reference.quantize_int8(w)
    x = rand(tokens, in_features, gen=g) * 4
    x[0, : in_features // 2] = 0.0  # a half-zero row; zero rows below
    if tokens > 2:
        x[2] = 0.0
    qx, xs = nat.quantize_rows_int8(x)
    want_q, want_s = reference.quantize_rows_int8(x)
    assert torch.equal(qx, want_q) and torch.equal(xs, want_s)
    assert torch.equal(nat.int8_gemm(qx, qw), reference.int8_gemm(qx, qw))
    for b in (bias, None):
        assert torch.equal(nat.w8a8_linear(x, qw, scales, b), reference.w8a8_linear(x, qw, scales, b))


def test_w8a8_extremes_do_not_saturate(nat):
    """Every code at +-127 on both sides: the largest int32 sums, exact (no int16 saturation)."""
    n_in = 2816
    qx = torch.full((3, n_in), 127, dtype=torch.int8)
    qx[1] = -127
    qx[2, ::2] = -127
    qw = torch.full((5, n_in), -127, dtype=torch.int8)
    qw[1] = 127
    assert torch.equal(nat.int8_gemm(qx, qw), reference.int8_gemm(qx, qw))
    assert nat.int8_gemm(qx, qw)[0, 1].item() == 127 * 127 * n_in


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w8a8_half_activations(nat, dtype):
    g = torch.Generator().manual_seed(9)
    qw, scales = reference.quantize_int8(rand(40, 96, gen=g))
    x = rand(5, 3, 96, dtype=dtype, gen=g)  # [..., in] with two leading dims
    got = nat.w8a8_linear(x, qw, scales, None)
    assert got.dtype == dtype and got.shape == (5, 3, 40)
    assert torch.equal(got, reference.w8a8_linear(x, qw, scales))


def test_w8a8_rows_are_batch_invariant(nat):
    """A token's output does not depend on the other tokens of the call (per-row scales)."""
    g = torch.Generator().manual_seed(10)
    qw, scales = reference.quantize_int8(rand(50, 128, gen=g))
    x = rand(19, 128, gen=g)
    whole = nat.w8a8_linear(x, qw, scales, None)
    for t in (0, 5, 18):
        assert torch.equal(nat.w8a8_linear(x[t : t + 1], qw, scales, None), whole[t : t + 1])


@pytest.mark.parametrize("out_features,in_features", W8A8_SHAPES)
def test_w8a8_gemm_path_is_bit_identical_and_batch_invariant(nat, out_features, in_features):
    """From W8A8_GEMM_MIN_ROWS rows ops.w8a8_linear multiplies through oneDNN's int8 GEMM (where the
    CPU has VNNI/AMX and the GEMM is exact): same bits as the reference, and a row's output is the
    same whichever path its batch size picked."""
    if not ops.onednn_int8_exact():
        pytest.skip("oneDNN int8 GEMM not used on this CPU (no VNNI / not exact): the native kernel runs")
    g = torch.Generator().manual_seed(11)
    qw, scales = reference.quantize_int8(rand(out_features, in_features, gen=g))
    bias = rand(out_features, gen=g)
    x = rand(ops.W8A8_GEMM_MIN_ROWS + 9, in_features, gen=g) * 4
    x[1] = 0.0
    for b in (bias, None):
        whole = ops.w8a8_linear(x, qw, scales, b)
        assert torch.equal(whole, reference.w8a8_linear(x, qw, scales, b))
        for t in (0, 1, 7):
            assert torch.equal(ops.w8a8_linear(x[t : t + 1], qw, scales, b), whole[t : t + 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 8, 70])
@pytest.mark.parametrize("in_features,group_size", [(200, 32), (200, 128), (48, 64), (1000, 128), (20, 32)])
def test_int4_linear_padded_last_group(nat, dtype, tokens, in_features, group_size):
    """in_features not a multiple of the group (nor of 32): the last group is padded with zero
    weights, and the result equals x . W^T with W the dequantized unpadded weight."""
    g = torch.Generator().manual_seed(12)
    w, bias = rand(37, in_features, gen=g), rand(37, gen=g)
    packed, scales, zeros = reference.quantize_int4(w, group_size)
    padded = -(-in_features // group_size) * group_size
    assert packed.shape == (37, padded // 2) and scales.shape == (37, padded // group_size)
    deq = reference.int4_dequantize(packed, scales, zeros, group_size)
    assert torch.equal(deq[:, in_features:], torch.zeros(37, padded - in_features))  # padding is exactly 0
    x = rand(tokens, in_features, dtype=dtype, gen=g)
    want = reference.int4_linear(x, packed, scales, zeros, bias, group_size)
    assert_close(want, (torch.nn.functional.linear(x.float(), deq[:, :in_features]) + bias).to(dtype), dtype)
    assert_close(nat.int4_linear(x, packed, scales, zeros, bias, group_size), want, dtype)
    assert_close(nat.int4_linear(x, packed, scales, None, None, group_size),
                 reference.int4_linear(x, packed, scales, None, None, group_size), dtype)
    wide = rand(tokens, padded + 1, dtype=dtype, gen=g)  # wider than the packed weights
    with pytest.raises(RuntimeError, match="in_features"):
        nat.int4_linear(wide, packed, scales, zeros, bias, group_size)


def test_sampling_matches_reference_exactly(nat):
    g = torch.Generator().manual_seed(6)
    B, V = 96, 3000
    logits = torch.randn(B, V, generator=g) * 3
    logits[5, 10:20] = logits[5].max() + 1  # ties at the top
    temperature = torch.rand(B, generator=g) * 1.5
    temperature[::6] = 0.0  # greedy rows
    top_k = torch.randint(0, 60, (B,), generator=g)
    top_k[::4] = 0
    top_p = torch.rand(B, generator=g)
    top_p[::3] = 1.0
    top_p[1::7] = 0.999  # nucleus wider than the first 1024 sorted candidates
    uniforms = torch.rand(B, generator=g, dtype=torch.float64)
    got = nat.sample_top_k_top_p(logits, temperature, top_k, top_p, uniforms)
    want = reference.sample_with_uniforms(logits, temperature, top_k, top_p, uniforms)
    assert torch.equal(got, want)


ISA_SCRIPT = """
import torch
from native import ops, reference as R
n = ops.backend("cpu").ops
assert n is not None and n.isa() == "{isa}", n and n.isa()
g = torch.Generator().manual_seed(0)
w = torch.randn(37, 200, generator=g)
qw, s = R.quantize_int8(w)
p, s4, z4 = R.quantize_int4(torch.randn(37, 256, generator=g), 64)
for T in (1, 5, 8):
    x = torch.randn(T, 200, generator=g)
    assert (n.int8_linear(x, qw, s, None) - R.int8_linear(x, qw, s)).abs().max() < 1e-3
    x = torch.randn(T, 256, generator=g)
    assert (n.int4_linear(x, p, s4, z4, None, 64) - R.int4_linear(x, p, s4, z4, None, 64)).abs().max() < 1e-3
for D, H, Hkv, alibi in ((32, 8, 4, False), (40, 4, 1, True), (64, 8, 2, False), (20, 2, 2, False)):
    q = torch.randn(4, H, D, generator=g)
    kc, vc = torch.randn(40, 16, Hkv, D, generator=g), torch.randn(40, 16, Hkv, D, generator=g)
    tables = torch.randperm(40, generator=g)[:40].reshape(4, 10).int()
    lens = torch.tensor([1, 13, 100, 160], dtype=torch.int32)  # tails of every length class
    slopes = torch.rand(H, generator=g) if alibi else None
    want = R.paged_attention_decode(q, kc, vc, tables, lens, D**-0.5, slopes)
    got = n.paged_attention_decode(q, kc, vc, tables, lens, D**-0.5, slopes)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (D, (got - want).abs().max())
from native.selfcheck import self_check
for T, I in ((1, 200), (7, 31), (13, 64)):
    x = torch.randn(T, I, generator=g)
    qw8, s8 = R.quantize_int8(torch.randn(11, I, generator=g))
    assert torch.equal(n.w8a8_linear(x, qw8, s8, None), R.w8a8_linear(x, qw8, s8))
self_check(n, torch.device("cpu"))
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_lower_isa_paths_match_reference(nat, isa):
    """The AVX2 and portable code paths, forced with SHARDSERVE_ISA in a fresh process."""
    import os
    import subprocess
    import sys

    if nat.isa() == "generic" or (isa == "avx2" and nat.isa() == "avx2"):
        pytest.skip(f"this CPU runs {nat.isa()}: covered by the other tests")
    root = str(Path(__file__).resolve().parents[2])
    env = dict(
        os.environ, SHARDSERVE_ISA=isa, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", ISA_SCRIPT.format(isa=isa)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_public_api_uses_native_and_matches(nat):
    """ops.* on CPU tensors goes through the extension and agrees with reference.*."""
    assert ops.KERNEL_PATH == "native" and ops.kernel_path("cpu") == "native"
    g = torch.Generator().manual_seed(7)
    w, x = rand(64, 128, gen=g), rand(2, 128, gen=g)
    qw, s = ops.quantize_int8(w)
    assert_close(ops.int8_linear(x, qw, s), reference.int8_linear(x, qw, s), torch.float32)
    logits = torch.randn(4, 100, generator=g)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    ref_gens = [torch.Generator().manual_seed(i) for i in range(4)]
    args = ([0.0, 0.7, 1.0, 1.3], [0, 10, 0, 5], [1.0, 0.8, 0.5, 1.0])
    assert torch.equal(
        ops.sample_top_k_top_p(logits, *args, gens),
        reference.sample_top_k_top_p(logits, *[torch.tensor(a) for a in args], ref_gens),
    )
