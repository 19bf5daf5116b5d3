"""Partition manifests carry the family's tensor layout: a stale partition is re-made or refused, never
loaded into a model whose rank files changed shape."""

from __future__ import annotations

import json

import pytest

from controller.acquire.partition import partition_key
from worker.manifest import FORMAT, MANIFEST, check_layout, tensor_layout


def write(tmp_path, model_type: str, layout: int | None) -> None:
    m = {"format": FORMAT, "layout": {"tp": 1, "pp": 1}, "dtype": "fp32", "quantize": None,
         "config": {"model_type": model_type}, "ranks": []}
    if layout is not None:
        m["tensor_layout"] = layout
    (tmp_path / MANIFEST).write_text(json.dumps(m))


def test_a_t5_partition_of_the_old_layout_is_refused_with_the_fix(tmp_path):
    write(tmp_path, "t5", None)  # written before wi_0 / wi_1 were packed
    with pytest.raises(ValueError, match=r"tensor layout 1 of 't5'; this one reads 2\): partition it again"):
        check_layout(tmp_path, 1, 1)
    write(tmp_path, "t5", tensor_layout({"model_type": "t5"}))
    assert check_layout(tmp_path, 1, 1)["tensor_layout"] == 2


def test_families_without_a_layout_change_keep_their_manifests_and_cache_keys(tmp_path):
    write(tmp_path, "llama", None)
    check_layout(tmp_path, 1, 1)
    assert partition_key("ab" * 16, 2, 1, "fp32") == "abababababababab-tp2-pp1-fp32"
    assert partition_key("ab" * 16, 2, 1, "fp32", "int8", layout=2) == "abababababababab-tp2-pp1-fp32-int8-l2"
