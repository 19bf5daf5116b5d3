"""Start-up check of a native library: every kernel once on small inputs against reference.py.

Raises on the first mismatch or error; ops.py turns that into a warning and the torch path.
Takes a few milliseconds on CPU.
"""

from __future__ import annotations

import torch

from native import reference


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise RuntimeError(f"{name}: got {got.dtype}{tuple(got.shape)}, want {want.dtype}{tuple(want.shape)}")
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    if not err <= tol:  # also catches NaN
        raise RuntimeError(f"{name}: max abs error {err:.3g} > {tol}")


def self_check(ops, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    # paged attention: 2 sequences, GQA 4 -> 2, blocks of 4, shuffled block table
    q, kc, vc = rnd(2, 4, 16), rnd(6, 4, 2, 16), rnd(6, 4, 2, 16)
    tables = torch.tensor([[5, 0, 3], [1, 4, 2]], dtype=torch.int32, device=device)
    lens = torch.tensor([9, 3], dtype=torch.int32, device=device)
    _close(
        "paged_attention_decode",
        ops.paged_attention_decode(q, kc, vc, tables, lens, 0.25, None),
        reference.paged_attention_decode(q, kc, vc, tables, lens, 0.25),
        1e-4,
    )

    x, r, w, b = rnd(3, 40), rnd(3, 40), rnd(40), rnd(40)
    for got, want in zip(
        ops.fused_add_rms_norm(x, r, w, 1e-6), reference.fused_add_rms_norm(x, r, w, 1e-6), strict=True
    ):
        _close("fused_add_rms_norm", got, want, 1e-4)
    for got, want in zip(
        ops.fused_add_layer_norm(x, r, w, b, 1e-5),
        reference.fused_add_layer_norm(x, r, w, b, 1e-5),
        strict=True,
    ):
        _close("fused_add_layer_norm", got, want, 1e-4)

    q, k, v = rnd(3, 4, 16), rnd(3, 2, 16), rnd(3, 2, 16)
    pos = torch.tensor([0, 5, 2], device=device)
    cs = rnd(8, 8)
    slots = torch.tensor([3, -1, 7], device=device)
    caches = [torch.zeros(2, 4, 2, 16, device=device) for _ in range(4)]
    got = ops.rotary_cache_write(q, k, v, pos, cs, caches[0], caches[1], slots, True, 8)
    want = reference.rotary_cache_write(q, k, v, pos, cs, caches[2], caches[3], slots, True, 8)
    for a, b_ in zip(list(got) + caches[:2], list(want) + caches[2:], strict=True):
        _close("rotary_cache_write", a, b_, 1e-5)

    w = rnd(12, 64)
    x = rnd(2, 64)
    qw, s = reference.quantize_int8(w)
    _close("int8_linear", ops.int8_linear(x, qw, s, None), reference.int8_linear(x, qw, s), 1e-3)
    if device.type == "cpu":  # w8a8 has a CPU kernel only: exact integer codes and accumulators
        x5 = rnd(3, 70)
        w5 = rnd(9, 70)
        qw5, s5 = reference.quantize_int8(w5)
        for got, want in zip(ops.quantize_rows_int8(x5), reference.quantize_rows_int8(x5), strict=True):
            _close("quantize_rows_int8", got, want, 0.0)
        qx5 = reference.quantize_rows_int8(x5)[0]
        _close("int8_gemm", ops.int8_gemm(qx5, qw5), reference.int8_gemm(qx5, qw5), 0.0)
        _close("w8a8_linear", ops.w8a8_linear(x5, qw5, s5, None), reference.w8a8_linear(x5, qw5, s5), 1e-4)
    p, s4, z4 = reference.quantize_int4(w, 32)
    _close(
        "int4_linear",
        ops.int4_linear(x, p, s4, z4, None, 32),
        reference.int4_linear(x, p, s4, z4, None, 32),
        1e-3,
    )
    p, s4, z4 = reference.quantize_int4(w[:, :40], 32)  # 40 inputs: the last group padded to 64
    _close(
        "int4_linear",
        ops.int4_linear(x[:, :40], p, s4, z4, None, 32),
        reference.int4_linear(x[:, :40], p, s4, z4, None, 32),
        1e-3,
    )

    logits = rnd(3, 50)
    temp = torch.tensor([0.0, 0.8, 1.0])
    top_k = torch.tensor([0, 5, 0])
    top_p = torch.tensor([1.0, 0.9, 0.5])
    u = torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)
    got = ops.sample_top_k_top_p(logits, temp.to(device), top_k.to(device), top_p.to(device), u.to(device))
    want = reference.sample_with_uniforms(logits, temp, top_k, top_p, u)
    if not torch.equal(got.cpu(), want.cpu()):
        raise RuntimeError(f"sample_top_k_top_p: got {got.tolist()}, want {want.tolist()}")
