"""The admin API and CLI against a real server over TLS: token, several models and replicas, routing
to the least-loaded replica, scale, drain, unload. One server process for the module."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.api.auth import bearer
from shardserve.v1 import admin_pb2 as apb
from shardserve.v1 import admin_pb2_grpc as apb_grpc
from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from tests.integration.processes import alive, wait_for
from tests.integration.s3_fixtures import TEST_ENV, MotoServer, upload_folder
from tests.integration.server import ROOT, ServerProcess, with_demo
from tests.integration.tls import make_cert

TOKEN = "test-admin-token-7f3a"
AUTH = bearer(TOKEN)


class TlsServer(ServerProcess):
    """ServerProcess speaking HTTPS and gRPC over TLS, trusting the test's own certificate."""

    def __init__(self, *args, ca: Path, **kw):
        self.ca = ca
        self.ssl = ssl.create_default_context(cafile=str(ca))
        super().__init__(*args, **kw)
        self.channel.close()
        self.channel = grpc.secure_channel(self.address, grpc.ssl_channel_credentials(ca.read_bytes()))

    def http(self, path, data=None, headers=None, scheme="https"):
        req = urllib.request.Request(f"{scheme}://127.0.0.1:{self.http_port}{path}", data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ssl if scheme == "https" else None) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return None, b""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with MotoServer(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        server.client().create_bucket(Bucket="models")
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3, demo_cache):
    cache = with_demo(tmp_path_factory.mktemp("cache"), demo_cache)
    cert, key = make_cert(tmp_path_factory.mktemp("tls"))
    env = {"SHARDSERVE_ADMIN_TOKEN": TOKEN, "AWS_ENDPOINT_URL": s3.url, **TEST_ENV}
    with TlsServer("--max-batch-size", "8", "--tls-cert", str(cert), "--tls-key", str(key), cache_dir=cache, ca=cert,
                   env=env) as s:
        yield s


def admin(server) -> apb_grpc.AdminStub:
    return apb_grpc.AdminStub(server.channel)


def gen(server) -> gpb_grpc.GenerationStub:
    return gpb_grpc.GenerationStub(server.channel)


def generate(server, model="", prompt="hello", n=6) -> gpb.GenerateOutput:
    return gen(server).Generate(gpb.GenerateRequest(model=model, prompts=[prompt],
                                                    parameters=gpb.GenerationParameters(max_new_tokens=n))).outputs[0]


def cli(server, *argv, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "controller.cli", "admin", "--address", server.address, "--tls-ca", str(server.ca),
           "--token", TOKEN, *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def demo_path(server) -> str:
    return admin(server).DescribeModel(apb.DescribeModelRequest(name="demo"), metadata=AUTH).path


def test_gRPC_and_HTTP_are_served_over_TLS_only(server):
    assert server.http("/health/ready") == (200, b'{"ready": true}')
    assert server.http("/health/ready", scheme="http")[0] is None  # plaintext to the TLS port: no answer
    assert generate(server).generated_tokens == 6
    with grpc.insecure_channel(server.address) as plain, pytest.raises(grpc.RpcError) as err:
        gpb_grpc.GenerationStub(plain).ModelInfo(gpb.ModelInfoRequest(), timeout=10)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.mark.parametrize("metadata, needle", [((), "missing"), (bearer("wrong"), "wrong"),
                                              ((("authorization", TOKEN),), "wrong")])
def test_admin_calls_need_the_token(server, metadata, needle):
    with pytest.raises(grpc.RpcError) as err:
        admin(server).ListModels(apb.ListModelsRequest(), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and needle in err.value.details()
    r = cli(server, "list", "--token", "wrong", check=False)
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr


def test_cli_list_and_describe_tables_and_json(server):
    table = cli(server, "list").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "STATE", "READY"] and table[1].split()[:3] == ["demo", "ready", "1/1"]
    d = json.loads(cli(server, "describe", "demo", "--json").stdout)
    assert d["state"] == "ready" and d["layout"]["dtype"] == "fp32" and d["layout"]["device"] == "cpu"
    assert d["architecture"] == "LlamaForCausalLM" and d["max_context_length"] == 1024
    (rep,) = d["replicas"]
    assert rep["state"] == "ready" and rep["pid"] > 0
    assert rep["ranks"][0]["device"] == "cpu" and int(rep["ranks"][0]["parameter_bytes"]) > 0
    assert int(rep["ranks"][0]["kv_cache_bytes"]) > 0 and rep["load_phases"]
    assert rep["ranks"][0]["node"] == "local"  # the local executor; with Ray: the rank's node address and id
    human = cli(server, "describe", "demo").stdout
    assert "state:        ready" in human and "PARAMETERS" in human and "load phases demo-0" in human
    assert "NODE" in human


def test_bad_loads_are_refused_with_the_reason(server, tmp_path):
    a = admin(server)
    with pytest.raises(grpc.RpcError) as err:
        a.LoadModel(apb.LoadModelRequest(name="demo", source=demo_path(server), wait=True), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        a.LoadModel(apb.LoadModelRequest(name="x", source=str(tmp_path / "nope")), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        a.LoadModel(apb.LoadModelRequest(name="bad name!", source=str(tmp_path)), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "field name" in err.value.details()
    # not a model folder: fails in the background; wait=True reports it, and the model shows as failed
    r = cli(server, "load", "broken", str(tmp_path), check=False)
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr and "config.json" in r.stderr
    listed = {m.name: m.state for m in a.ListModels(apb.ListModelsRequest(), metadata=AUTH).models}
    assert listed == {"demo": "ready", "broken": "failed"}
    assert generate(server).generated_tokens == 6  # a failed model is never the default
    assert server.http("/health/ready")[0] == 200
    assert "unloaded broken" in cli(server, "unload", "broken").stdout
    assert [m.name for m in a.ListModels(apb.ListModelsRequest(), metadata=AUTH).models] == ["demo"]


def _stats(server) -> dict:
    return json.loads(server.http("/v1/stats")[1])


def test_second_model_two_replicas_least_loaded_routing_scale_down_and_unload(server):
    src = demo_path(server)
    d = json.loads(cli(server, "load", "demo2", src, "--no-wait", "--json").stdout)
    assert d["state"] in ("loading", "ready") and d["target_replicas"] == 1
    d = json.loads(cli(server, "scale", "demo2", "2", "--json").stdout)  # waits for both replicas
    assert d["state"] == "ready" and [r["state"] for r in d["replicas"]] == ["ready", "ready"]

    # a request names its model once several are served; same weights -> same greedy tokens
    with pytest.raises(grpc.RpcError) as err:
        generate(server)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "demo2" in err.value.details()
    assert list(generate(server, "demo2").token_ids) == list(generate(server, "demo").token_ids)

    # least-loaded: while one replica holds a long stream, a new request goes to the other one
    stream = gen(server).GenerateStream(gpb.GenerateStreamRequest(
        model="demo2", prompt="hold", parameters=gpb.GenerationParameters(max_new_tokens=900)))
    next(stream)
    before = _stats(server)["demo2"]["replicas"]
    busy = [n for n, r in before.items() if r["outstanding"] == 1]
    assert len(busy) == 1, before
    idle = next(n for n in before if n not in busy)
    generate(server, "demo2", prompt="one two three four five six", n=2)
    after = _stats(server)["demo2"]["replicas"]
    assert int(after[idle]["stats"]["promptTokensTotal"]) > int(before[idle]["stats"]["promptTokensTotal"])
    stream.cancel()

    d = json.loads(cli(server, "scale", "demo2", "1", "--json").stdout)
    assert len(d["replicas"]) == 1
    gone = ({"demo2-0", "demo2-1"} - {d["replicas"][0]["name"]}).pop()
    metrics = server.http("/metrics")[1].decode()
    assert 'model="demo2"' in metrics and f'replica="{gone}"' not in metrics

    # unload drains: a stream in flight when it starts still ends normally
    pid = d["replicas"][0]["pid"]
    with cf.ThreadPoolExecutor(1) as pool:
        call = gen(server).GenerateStream(gpb.GenerateStreamRequest(
            model="demo2", prompt="drain me", parameters=gpb.GenerationParameters(max_new_tokens=120)))
        first = next(call)
        rest = pool.submit(lambda: list(call))
        resp = admin(server).UnloadModel(apb.UnloadModelRequest(name="demo2", grace_seconds=120), metadata=AUTH)
        msgs = [first, *rest.result()]
    assert resp.cut_in_flight == 0 and len(msgs) == 120 and msgs[-1].finish_reason == gpb.FINISH_REASON_LENGTH
    assert 'model="demo2"' not in server.http("/metrics")[1].decode()
    with pytest.raises(grpc.RpcError) as err:
        generate(server, "demo2")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    wait_for(lambda: not alive(pid), 10, "the unloaded model's worker to exit")
    assert generate(server).generated_tokens == 6  # the only model again: the default


def test_load_from_s3_shows_the_download_phase(server, s3):
    upload_folder(s3.client(), Path(demo_path(server)), "models", "demo/")
    d = json.loads(cli(server, "load", "from-s3", "s3://models/demo/", "--json").stdout)
    assert d["state"] == "ready" and d["path"] != demo_path(server), d
    phases = [p["phase"] for p in d["replicas"][0]["load_phases"]]
    assert phases[0] == "download" and "load" in phases
    assert list(generate(server, "from-s3").token_ids) == list(generate(server, "demo").token_ids)
    metrics = server.http("/metrics")[1].decode()
    assert any(line.startswith('shardserve_download_bytes_total{model="from-s3"}') and float(line.split()[-1]) > 0
               for line in metrics.splitlines()), metrics
    cli(server, "unload", "from-s3")


def test_drain_and_resume(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    r = cli(server, "drain")
    assert "admitting no new requests; drained" in r.stdout
    assert server.http("/health/ready")[0] == 503 and server.http("/ping")[0] == 503
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        generate(server)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
    status, raw = server.http("/v1/completions", json.dumps({"model": "demo", "prompt": "x"}).encode(),
                              {"Content-Type": "application/json"})  # OpenAI's shape, over HTTPS
    assert status == 503 and "draining" in json.loads(raw)["error"]["message"]
    assert "(server drained" in cli(server, "list").stdout  # admin calls still work
    cli(server, "drain", "--resume")
    assert server.http("/ping")[0] == 200
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    # one model
    cli(server, "drain", "demo")
    with pytest.raises(grpc.RpcError) as err:
        generate(server, "demo")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
    assert json.loads(cli(server, "describe", "demo", "--json").stdout)["state"] == "draining"
    cli(server, "drain", "demo", "--resume")
    assert generate(server, "demo").generated_tokens == 6
