"""controller/acquire/verify.py: safetensors headers and sizes checked without torch."""

import json
import struct

import pytest

from controller.acquire.verify import CorruptWeightsError, check_safetensors, check_weights


def write(path, tensors: dict, data: bytes, header_len=None, raw_header=None):
    header = raw_header if raw_header is not None else json.dumps(tensors).encode()
    path.write_bytes(struct.pack("<Q", len(header) if header_len is None else header_len) + header + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}, "__metadata__": {"format": "pt"}}


def test_a_good_file_and_folder_pass(tmp_path):
    write(tmp_path / "model.safetensors", GOOD, bytes(22))
    (tmp_path / "rank1").mkdir()
    write(tmp_path / "rank1" / "model.safetensors", GOOD, bytes(22))
    assert check_weights(tmp_path) == 2


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b"\x01\x02"), "shorter than the 8-byte header"),
    (lambda p: write(p, GOOD, bytes(22), header_len=10_000), "runs past the end"),
    (lambda p: write(p, GOOD, bytes(22), header_len=1 << 40), "implausible"),
    (lambda p: write(p, {}, b"", raw_header=b"{not json"), "not valid JSON"),
    (lambda p: write(p, {}, b"", raw_header=b"[1, 2]"), "not a JSON object"),
    (lambda p: write(p, GOOD, bytes(12)), "truncated"),
    (lambda p: write(p, GOOD, bytes(30)), "trailing or missing"),
    (lambda p: write(p, {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, bytes(16)), "do not match"),
    (lambda p: write(p, {"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, bytes(1)), "unknown dtype"),
    (lambda p: write(p, {"a": {"shape": [1]}}, bytes(1)), "malformed"),
])
def test_a_bad_file_is_refused_naming_it_and_the_reason_in_one_line(tmp_path, make, reason):
    path = tmp_path / "sub" / "model-00001-of-00002.safetensors"
    path.parent.mkdir()
    make(path)
    with pytest.raises(CorruptWeightsError) as e:
        check_weights(tmp_path)
    msg = str(e.value)
    assert str(path) in msg and reason in msg and "\n" not in msg, msg


def test_a_truncated_real_checkpoint_is_refused(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": np.zeros((64, 64), np.float32), "b": np.ones(64, np.float16)}, str(path))
    check_safetensors(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptWeightsError, match="truncated"):
        check_safetensors(path)
