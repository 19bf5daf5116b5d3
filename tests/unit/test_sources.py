"""Source resolution (local, SageMaker, Hugging Face cache, serving.properties) and the download's pure helpers.

S3 itself is exercised against a real local S3 server in tests/integration/test_download.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from controller.acquire.download import DEFAULT_PATTERNS, select
from controller.acquire.paths import DownloadError, contained, unsafe_reason
from controller.acquire.resolver import (
    read_properties,
    resolve_model_source,
    s3_cache_path,
    s3_url_from_properties,
)
from controller.acquire.s3 import Access, RemoteObject, multipart_etag, parse_s3_url


def model_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    return path


def resolve(src, tmp_path: Path, **kw):
    kw.setdefault("sagemaker_dir", tmp_path / "no-sagemaker")
    kw.setdefault("hf_cache", tmp_path / "no-hf-cache")
    return resolve_model_source(src, tmp_path / "cache", **kw)


# ---- S3 URLs and keys ---------------------------------------------------------------------------


def test_parse_s3_url_treats_the_prefix_as_a_folder():
    assert str(parse_s3_url("s3://bucket/a/b")) == "s3://bucket/a/b/"
    assert parse_s3_url("s3://bucket/a/b/").prefix == "a/b/"
    assert parse_s3_url("s3://bucket").prefix == ""
    assert parse_s3_url("s3://bucket/").prefix == ""
    for bad in ("s3://", "s3:///x", "s3://a/x", "s3://../x", "gs://bucket/x"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)


@pytest.mark.parametrize(
    "rel, ok",
    [
        ("config.json", True),
        ("sub/dir/tokenizer.json", True),
        ("with space & 'quotes'.json", True),
        ("star*[x].json", True),
        ("../escape.json", False),
        ("../../x.json", False),
        ("a/../../x.json", False),
        ("a/./b.json", False),
        ("/etc/passwd", False),
        ("a//b.json", False),
        ("a\\..\\b.json", False),
        ("line\nbreak.json", False),
        ("", False),
        (".shardserve-partial/x.json", False),
        (".shardserve-download.json", False),
    ],
)
def test_unsafe_keys_are_named(rel, ok):
    assert (unsafe_reason(rel) is None) == ok


def test_contained_refuses_a_symlink_out(tmp_path):
    root = tmp_path / "dest"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert contained(root, "sub/x.json") == root / "sub" / "x.json"
    with pytest.raises(DownloadError, match="outside"):
        contained(root, "link/x.json")
    with pytest.raises(DownloadError):
        contained(root, "../x.json")


def objs(*rels: str) -> list[RemoteObject]:
    return [RemoteObject("p/" + r, r, 1, "") for r in rels]


def test_default_patterns_fetch_what_serving_needs():
    listed = objs(
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "tokenizer.json",
        "tokenizer.model",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "README.md",
        ".gitattributes",
        "original/consolidated.00.pth",
        "optimizer.pt",
        "modeling_custom.py",
    )
    got = [o.rel for o in select(listed, DEFAULT_PATTERNS)]
    assert got == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer.model",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
    ]
    # Without safetensors the .bin weights are what there is.
    assert "pytorch_model.bin" in [
        o.rel for o in select(objs("config.json", "pytorch_model.bin"), DEFAULT_PATTERNS)
    ]
    assert len(select(listed, ("*",), prefer_safetensors=False)) == len(listed)


def test_multipart_etag_matches_s3s_definition(tmp_path):
    data = bytes(range(256)) * 4096 * 11  # 11 MiB: parts of 5, 5, 1 MiB
    path = tmp_path / "blob"
    path.write_bytes(data)
    part = 5 << 20
    digests = b"".join(hashlib.md5(data[i : i + part]).digest() for i in range(0, len(data), part))
    assert multipart_etag(path, part) == hashlib.md5(digests).hexdigest() + "-3"


# ---- serving.properties -------------------------------------------------------------------------


def test_read_properties(tmp_path):
    f = tmp_path / "serving.properties"
    f.write_text(
        "# comment\n! also a comment\nengine=Python\noption.s3url = s3://bucket/m/\n"
        "option.dtype: fp16\noption.long=a \\\n   b\n\noption.tensor_parallel_degree 4\n"
    )
    assert read_properties(f) == {
        "engine": "Python",
        "option.s3url": "s3://bucket/m/",
        "option.dtype": "fp16",
        "option.long": "a b",
        "option.tensor_parallel_degree": "4",
    }
    assert s3_url_from_properties(f) == "s3://bucket/m/"
    assert s3_url_from_properties(tmp_path) == "s3://bucket/m/"


def test_properties_model_id_relative_to_its_folder(tmp_path):
    model = model_folder(tmp_path / "deploy" / "weights")
    props = tmp_path / "deploy" / "serving.properties"
    props.write_text("engine=Python\noption.model_id=weights\n")
    for src in (props, props.parent):
        r = resolve(src, tmp_path)
        assert (r.path, r.kind, r.properties_file) == (model, "local", props)


def test_properties_without_model_means_its_own_folder(tmp_path):
    model = model_folder(tmp_path / "m")
    (model / "serving.properties").write_text("option.tensor_parallel_degree=2\n")
    r = resolve(model / "serving.properties", tmp_path)
    assert (r.path, r.kind) == (model, "local")
    assert resolve(model, tmp_path).properties_file == model / "serving.properties"


def test_properties_with_unknown_scheme_or_loop(tmp_path):
    (tmp_path / "serving.properties").write_text("option.model_id=gs://bucket/m/\n")
    with pytest.raises(ValueError, match="gs://"):
        resolve(tmp_path, tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "serving.properties").write_text(f"option.model_id={b}\n")
    (b / "serving.properties").write_text(f"option.model_id={a}\n")
    with pytest.raises(ValueError, match="point at each other"):
        resolve(a, tmp_path)


# ---- local, SageMaker, errors -------------------------------------------------------------------


def test_local_folder_and_file_url(tmp_path):
    model = model_folder(tmp_path / "my model")
    for src in (str(model), model, f"file://{str(model).replace(' ', '%20')}"):
        r = resolve(src, tmp_path)
        assert (r.path, r.kind, r.download_seconds, r.downloaded_bytes) == (model, "local", 0.0, 0)


@pytest.mark.parametrize("src", ["gs://bucket/model", "http://example.com/m", "hdfs://x/y", "HTTPS://a/b"])
def test_unknown_scheme_names_it_and_the_accepted_forms(tmp_path, src):
    with pytest.raises(ValueError) as e:
        resolve(src, tmp_path)
    scheme = src.split("://")[0].lower()
    assert f"'{scheme}://'" in str(e.value) and "s3://bucket/prefix/" in str(e.value)


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        resolve(str(missing), tmp_path)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve(tmp_path / "empty", tmp_path)


def test_sagemaker_folder_when_no_source(tmp_path):
    with pytest.raises(ValueError, match="no model source"):
        resolve(None, tmp_path)
    sm = model_folder(tmp_path / "opt-ml-model")
    for src in (None, "", "  "):
        r = resolve(src, tmp_path, sagemaker_dir=sm)
        assert (r.path, r.kind) == (sm, "sagemaker")
    assert resolve(str(sm), tmp_path, sagemaker_dir=sm).kind == "sagemaker"


# ---- Hugging Face cache ---------------------------------------------------------------------------


def hf_cache_entry(root: Path, repo: str, revisions: list[str], main: str | None) -> Path:
    """The hub cache layout: blobs/ hold content, snapshots/<rev>/ hold symlinks to them."""
    entry = root / ("models--" + repo.replace("/", "--"))
    blob = entry / "blobs" / "abc123"
    blob.parent.mkdir(parents=True)
    blob.write_text(json.dumps({"model_type": "gpt2"}))
    for rev in revisions:
        snap = entry / "snapshots" / rev
        snap.mkdir(parents=True)
        (snap / "config.json").symlink_to(Path("../../blobs/abc123"))
    if main:
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text(main)
    return entry


def test_hf_cache_folder_snapshot_and_hub_id(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    entry = hf_cache_entry(cache, "org/tiny", ["1111", "2222"], main="1111")
    r = resolve(entry, tmp_path)
    assert (r.path, r.kind) == (entry / "snapshots" / "1111", "hf-cache")
    assert resolve(entry / "snapshots" / "2222", tmp_path).path == entry / "snapshots" / "2222"
    assert resolve("org/tiny", tmp_path, hf_cache=cache).path == entry / "snapshots" / "1111"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model_source("org/tiny", tmp_path / "cache").kind == "hf-cache"
    with pytest.raises(FileNotFoundError, match="models--org--absent"):
        resolve_model_source("org/absent", tmp_path / "cache")


def test_hf_cache_without_refs_uses_the_snapshot_there_is(tmp_path):
    entry = hf_cache_entry(tmp_path / "hub", "solo", ["abcd"], main=None)
    assert resolve("solo", tmp_path, hf_cache=tmp_path / "hub").path == entry / "snapshots" / "abcd"


def test_s3_cache_path(tmp_path):
    assert s3_cache_path(tmp_path, "s3://bucket/a/b/") == tmp_path / "s3" / "bucket" / "a" / "b"
    assert s3_cache_path(tmp_path, "s3://bucket") == tmp_path / "s3" / "bucket"
    with pytest.raises(ValueError, match="safe folder"):
        s3_cache_path(tmp_path, "s3://bucket/a/../../b/")


# ---- AWS settings -------------------------------------------------------------------------------


@pytest.fixture()
def bare_aws(tmp_path, monkeypatch):
    """No AWS settings at all but the files each test writes."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


def test_endpoint_comes_from_flag_then_standard_env(bare_aws, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert Access.resolve(None, 4).endpoint_url == "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    assert Access.resolve(None, 4).endpoint_url == "http://127.0.0.1:2"
    access = Access.resolve("http://127.0.0.1:3", 4)
    assert access.endpoint_url == "http://127.0.0.1:3"
    assert access.client().meta.endpoint_url == "http://127.0.0.1:3"
    flags = access.s5cmd_flags()
    assert flags[flags.index("--endpoint-url") + 1] == "http://127.0.0.1:3"


def test_credentials_from_a_profile_are_handed_to_s5cmd(bare_aws, monkeypatch):
    (bare_aws / "aws-credentials").write_text(
        "[dev]\naws_access_key_id = AKIDEV\naws_secret_access_key = s3cr3t\n"
    )
    (bare_aws / "aws-config").write_text("[profile dev]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_PROFILE", "dev")
    access = Access.resolve(None, 4)
    env = access.s5cmd_env()
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_REGION"]) == (
        "AKIDEV",
        "s3cr3t",
        "eu-west-3",
    )
    assert "--no-sign-request" not in access.s5cmd_flags()


def test_no_credentials_means_anonymous_requests(bare_aws):
    access = Access.resolve(None, 4)
    assert access.unsigned and "--no-sign-request" in access.s5cmd_flags()
