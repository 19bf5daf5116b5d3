"""Path selection: the native library is used only when built, current and passing its start-up
self-check; every failure becomes a warning and the torch path, never an exception."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from native import build, ops, reference, selfcheck


class FakeOps:
    """A stand-in library built from the references; `broken` names one kernel to corrupt."""

    def __init__(self, broken: str | None = None):
        self.broken = broken

    def _out(self, name, value):
        if name != self.broken:
            return value
        if isinstance(value, tuple):
            return tuple(v + 1 for v in value)
        return value + 1

    def paged_attention_decode(self, *a):
        return self._out("paged_attention_decode", reference.paged_attention_decode(*a))

    def fused_add_rms_norm(self, *a):
        return self._out("fused_add_rms_norm", reference.fused_add_rms_norm(*a))

    def fused_add_layer_norm(self, *a):
        return self._out("fused_add_layer_norm", reference.fused_add_layer_norm(*a))

    def rotary_cache_write(self, *a):
        return self._out("rotary_cache_write", reference.rotary_cache_write(*a))

    def int8_linear(self, *a):
        return self._out("int8_linear", reference.int8_linear(*a))

    def int4_linear(self, *a):
        return self._out("int4_linear", reference.int4_linear(*a))

    def w8a8_linear(self, *a):
        return self._out("w8a8_linear", reference.w8a8_linear(*a))

    def quantize_rows_int8(self, *a):
        return self._out("quantize_rows_int8", reference.quantize_rows_int8(*a))

    def int8_gemm(self, *a):
        return self._out("int8_gemm", reference.int8_gemm(*a))

    def sample_top_k_top_p(self, *a):
        return self._out("sample_top_k_top_p", reference.sample_with_uniforms(*a))

    def isa(self):
        return "fake"


def test_self_check_accepts_correct_and_rejects_each_broken_kernel():
    selfcheck.self_check(FakeOps(), torch.device("cpu"))
    for name in [
        "paged_attention_decode",
        "fused_add_rms_norm",
        "fused_add_layer_norm",
        "rotary_cache_write",
        "int8_linear",
        "int4_linear",
        "w8a8_linear",
        "quantize_rows_int8",
        "int8_gemm",
        "sample_top_k_top_p",
    ]:
        with pytest.raises(RuntimeError, match=name):
            selfcheck.self_check(FakeOps(broken=name), torch.device("cpu"))


def test_failing_self_check_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(ops, "_library_ops", lambda device_type: FakeOps(broken="int8_linear"))
    with caplog.at_level(logging.WARNING, logger="shardserve.native"):
        chosen = ops._resolve("cpu")
    assert chosen.path == "torch" and "int8_linear" in chosen.detail
    assert any("failed their start-up check" in r.getMessage() for r in caplog.records)


def test_library_that_raises_on_load_falls_back(monkeypatch, caplog):
    def boom(device_type):
        raise OSError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(ops, "_library_ops", boom)
    with caplog.at_level(logging.WARNING, logger="shardserve.native"):
        assert ops._resolve("cpu").path == "torch"
    assert any("undefined symbol" in r.getMessage() for r in caplog.records)


def test_good_library_is_chosen(monkeypatch):
    monkeypatch.setattr(ops, "_library_ops", lambda device_type: FakeOps())
    chosen = ops._resolve("cpu")
    assert chosen.path == "native" and chosen.detail == "fake"


def test_unbuilt_or_stale_library_and_opt_out_select_torch(monkeypatch):
    monkeypatch.setattr(build, "is_current", lambda kind: False)
    chosen = ops._resolve("cpu")
    assert chosen.path == "torch" and "make native" in chosen.detail
    monkeypatch.setenv("SHARDSERVE_NATIVE", "0")
    assert ops._resolve("cpu").detail == "disabled by SHARDSERVE_NATIVE"
    assert ops._resolve("meta").path == "torch"


def test_torch_path_runs_every_public_kernel(restore_backends):
    ops._force("cpu", ops.Backend("cpu", None, "test"))
    assert ops.kernel_path("cpu") == "torch"
    g = torch.Generator().manual_seed(0)
    q, kc, vc = (
        torch.randn(1, 2, 8, generator=g),
        torch.randn(2, 4, 1, 8, generator=g),
        torch.randn(2, 4, 1, 8, generator=g),
    )
    tables, lens = torch.tensor([[1, 0]], dtype=torch.int32), torch.tensor([6], dtype=torch.int32)
    assert torch.equal(
        ops.paged_attention_decode(q, kc, vc, tables, lens, 0.5),
        reference.paged_attention_decode(q, kc, vc, tables, lens, 0.5),
    )
    x, w = torch.randn(2, 8, generator=g), torch.randn(8, generator=g)
    assert torch.equal(
        ops.fused_add_rms_norm(x, x, w, 1e-6)[0], reference.fused_add_rms_norm(x, x, w, 1e-6)[0]
    )
    assert torch.equal(
        ops.fused_add_layer_norm(x, None, w, w, 1e-6)[0],
        reference.fused_add_layer_norm(x, None, w, w, 1e-6)[0],
    )
    k_cache, v_cache = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    k = torch.randn(1, 1, 8, generator=g)
    ops.rotary_cache_write(
        q[:1], k, k, torch.tensor([1]), torch.randn(4, 8), k_cache, v_cache, torch.tensor([5]), True, 8
    )
    assert torch.equal(v_cache.view(-1, 1, 8)[5], k[0])
    wq = torch.randn(16, 64, generator=g)
    xq = torch.randn(1, 64, generator=g)
    assert torch.equal(
        ops.int8_linear(xq, *ops.quantize_int8(wq)), reference.int8_linear(xq, *reference.quantize_int8(wq))
    )
    p, s, z = ops.quantize_int4(wq, 32)
    assert torch.equal(ops.int4_linear(xq, p, s, z, None, 32), reference.int4_linear(xq, p, s, z, None, 32))
    assert torch.equal(ops.w8a8_linear(xq, *ops.quantize_int8(wq)), reference.w8a8_linear(xq, *reference.quantize_int8(wq)))
    tokens = ops.sample_top_k_top_p(
        torch.randn(3, 10, generator=g),
        [0.0, 1.0, 1.0],
        [0, 3, 0],
        [1.0, 1.0, 0.5],
        [None, torch.Generator().manual_seed(1), None],
    )
    assert tokens.dtype == torch.int64 and tokens.shape == (3,)


def test_build_failure_warns_and_never_fails(monkeypatch, capsys):
    def broken_compiler(kind, verbose):
        raise RuntimeError("Error building extension\nc++: fatal error: no input files")

    monkeypatch.setattr(build, "is_current", lambda kind: False)
    monkeypatch.setattr(build, "_build", broken_compiler)
    assert build.build("cpu") is False
    assert "WARNING: native cpu extension not built" in capsys.readouterr().err
    monkeypatch.setattr(build, "cuda_wanted", lambda: False)
    assert build.main([]) == 0


def test_stamp_ties_the_library_to_sources_and_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "BUILD_DIR", tmp_path)
    assert not build.is_current("cpu")
    build.library_path("cpu").parent.mkdir(parents=True)
    build.library_path("cpu").write_bytes(b"")
    build.stamp_path("cpu").write_text(json.dumps({"info": build.stamp_info("cpu")}))
    assert build.is_current("cpu")
    stale = dict(build.stamp_info("cpu"), sources="0" * 64)
    build.stamp_path("cpu").write_text(json.dumps({"info": stale}))
    assert not build.is_current("cpu")
