"""The SageMaker contract over real HTTP: the container's `serve` command, a model folder standing in for
/opt/ml/model with its serving.properties, /ping, /invocations (JSON and jsonlines) answering exactly
what gRPC Generate answers, and malformed bodies -> 4xx with a JSON error. One server for the module."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from controller.acquire.demo_model import demo_model_path
from controller.fleet.placement import free_port
from shardserve.v1 import admin_pb2 as apb
from shardserve.v1 import admin_pb2_grpc as apb_grpc
from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from tests.integration.server import ROOT, ServerProcess, with_demo

SERVE_SCRIPT = ROOT / "deploy" / "sagemaker" / "serve"
JSON = {"Content-Type": "application/json"}


class ContainerServer(ServerProcess):
    """`serve` (the container command) with a `shardserve` on PATH that runs this checkout."""

    def __init__(self, workdir: Path, env: dict, timeout: float = 180.0):
        self.port, self.http_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        bindir = workdir / "bin"
        bindir.mkdir()
        shim = bindir / "shardserve"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m controller.cli "$@"\n')
        shim.chmod(0o755)
        self.log_path = workdir / "server.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["sh", str(SERVE_SCRIPT), "--host", "127.0.0.1", "--port", str(self.port), "--http-port",
             str(self.http_port)], cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{bindir}:{os.environ['PATH']}", **env})
        self.pings: list[int | None] = []  # /ping answers while starting: None (not listening) or status
        deadline = time.monotonic() + timeout
        while not self.pings or self.pings[-1] != 200:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")
            self.pings.append(self.http("/ping")[0])
            time.sleep(0.1)
        self.channel = grpc.insecure_channel(self.address)


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_cache):
    cache = with_demo(tmp_path_factory.mktemp("cache"), demo_cache)
    demo = demo_model_path(cache)
    sm = tmp_path_factory.mktemp("opt-ml-model")  # stands in for /opt/ml/model
    for f in demo.iterdir():
        (sm / f.name).symlink_to(f)
    (sm / "serving.properties").write_text(
        "engine=FasterTransformer\noption.entryPoint=djl_python.fastertransformer\n"
        "option.tensor_parallel_degree=1\noption.dtype=fp32\noption.max_rolling_batch_size=8\n")
    env = {"SHARDSERVE_SAGEMAKER_MODEL_DIR": str(sm), "SHARDSERVE_CACHE_DIR": str(cache),
           "SHARDSERVE_ADMIN_TOKEN": ""}
    with ContainerServer(tmp_path_factory.mktemp("run"), env) as s:
        yield s


def invoke(server, body, headers=JSON):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, raw = server.http("/invocations", data=data, headers=headers)
    return status, json.loads(raw)


def grpc_texts(server, prompts, **params) -> list[str]:
    stub = gpb_grpc.GenerationStub(server.channel)
    resp = stub.Generate(gpb.GenerateRequest(prompts=prompts, parameters=gpb.GenerationParameters(**params)))
    return [o.text for o in resp.outputs]


def test_container_command_serves_the_sagemaker_model_folder_with_its_properties(server):
    seen = [p for p in server.pings if p is not None]
    assert set(seen) <= {503, 200} and seen[-1] == 200 and 503 not in seen[seen.index(200):]  # never back
    assert server.http("/ping") == (200, b'{"status": "ready"}')
    info = gpb_grpc.GenerationStub(server.channel).ModelInfo(gpb.ModelInfoRequest())
    assert [m.name for m in info.models] == ["model"]
    out = server.output()
    assert "engine=FasterTransformer accepted" in out and "option.entryPoint=djl_python.fastertransformer" in out


def test_invocations_answer_what_grpc_generate_answers(server):
    status, body = invoke(server, {"inputs": "Licensed under the", "parameters": {"max_new_tokens": 12}})
    assert status == 200 and body == {"outputs": grpc_texts(server, ["Licensed under the"], max_new_tokens=12)}
    prompts = ["one", "two words"]
    status, body = invoke(server, {"inputs": prompts, "parameters": {"max_seq_len": 8}, "padding": True})
    assert status == 200 and body["outputs"] == grpc_texts(server, prompts, max_new_tokens=8)
    sampled = {"max_seq_len": 10, "do_sample": True, "temperature": 0.8, "top_p": 0.9, "random_seed": 5}
    status, body = invoke(server, {"inputs": ["sampled"], "parameters": sampled})
    assert body["outputs"] == grpc_texts(server, ["sampled"], max_new_tokens=10, do_sample=True, temperature=0.8,
                                         top_p=0.9, seed=5)


def test_jsonlines_streams_one_token_a_line(server):
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/invocations",
                                 data=json.dumps({"inputs": "stream me", "parameters": {"max_new_tokens": 10}}).encode(),
                                 headers={**JSON, "Accept": "application/jsonlines"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/jsonlines"
        lines = [json.loads(line) for line in r]
    assert [x["index"] for x in lines] == list(range(10))
    text = "".join(x["token"]["text"] for x in lines)
    assert lines[-1]["finish_reason"] == "length" and lines[-1]["generated_text"] == text
    assert "finish_reason" not in lines[0]
    assert text == grpc_texts(server, ["stream me"], max_new_tokens=10)[0]


def test_a_client_that_leaves_a_stream_frees_its_slot(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request("POST", "/invocations", json.dumps({"inputs": "leave", "parameters": {"max_new_tokens": 900}}),
                 {**JSON, "Accept": "application/jsonlines"})
    resp = conn.getresponse()
    assert resp.status == 200 and b"token" in resp.fp.readline() + resp.fp.readline()
    conn.sock.close()
    resp.close()
    deadline = time.monotonic() + 60  # generous: reaching it means the slot leaked, not slowness
    while time.monotonic() < deadline:
        st = json.loads(server.http("/v1/stats")[1])["model"]
        if st["in_flight"] == 0 and st["replicas"]["model-0"]["stats"]["running"] == 0:
            break
        time.sleep(0.2)
    assert st["in_flight"] == 0 and st["replicas"]["model-0"]["stats"]["running"] == 0, st
    metrics = server.http("/metrics")[1].decode()
    assert 'shardserve_requests_total{model="model",replica="model-0",status="cancelled"} 1.0' in metrics


@pytest.mark.parametrize("body, headers, status, needle", [
    (b"{not json", JSON, 400, "not valid JSON"),
    (b"", JSON, 400, "JSON object"),
    (["a"], JSON, 400, "JSON object"),
    ({"parameters": {}}, JSON, 400, "inputs"),
    ({"inputs": 5}, JSON, 400, "inputs"),
    ({"inputs": []}, JSON, 400, "inputs"),
    ({"inputs": ["ok", 3]}, JSON, 400, "inputs"),
    ({"inputs": ""}, JSON, 400, "prompt"),
    ({"inputs": "x", "parameters": "fast"}, JSON, 400, "parameters"),
    ({"inputs": "x", "parameters": {"nonsense": 1}}, JSON, 400, "nonsense"),
    ({"inputs": "x", "parameters": {"top_p": 1.5}}, JSON, 400, "top_p"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 5000}}, JSON, 400, "1024"),
    ({"inputs": "x", "extra": 1}, JSON, 400, "extra"),
    ({"inputs": ["a", "b"]}, {**JSON, "Accept": "application/jsonlines"}, 400, "one input"),
    ({"inputs": "x"}, {"Content-Type": "text/csv"}, 415, "text/csv"),
    ({"inputs": "x"}, {**JSON, "X-Amzn-SageMaker-Target-Model": "other"}, 404, "other"),
])
def test_malformed_requests_get_4xx_with_a_json_error(server, body, headers, status, needle):
    got, err = invoke(server, body, headers)
    assert got == status and needle in err["error"], err
    assert invoke(server, {"inputs": "still here", "parameters": {"max_new_tokens": 2}})[0] == 200


def test_wrong_method_is_405_json(server):
    status, raw = server.http("/invocations")
    assert status == 405 and "error" in json.loads(raw)


def test_admin_api_is_refused_when_no_token_is_configured(server):
    with pytest.raises(grpc.RpcError) as err:
        apb_grpc.AdminStub(server.channel).ListModels(apb.ListModelsRequest(), metadata=(("authorization", "Bearer x"),))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "without an admin token" in err.value.details() and "--admin-token" in err.value.details()


def test_unknown_properties_key_refuses_to_start(tmp_path):
    props = tmp_path / "serving.properties"
    props.write_text("engine=Python\noption.model_idd=/models/x\n")
    r = subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--properties", str(props), "--port", "0",
                        "--http-port", "0"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "SHARDSERVE_SAGEMAKER_MODEL_DIR": str(tmp_path)})
    assert r.returncode == 2 and "option.model_idd" in r.stderr and "option.model_id" in r.stderr


def test_a_startup_model_that_cannot_load_ends_the_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--model", str(tmp_path), "--port",
                        str(free_port()), "--http-port", str(free_port()), "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and "config.json is missing" in r.stderr


def runtime(server):
    import boto3
    from botocore.config import Config

    return boto3.client("sagemaker-runtime", endpoint_url=f"http://127.0.0.1:{server.http_port}",
                        region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing",
                        config=Config(retries={"max_attempts": 1}))  # fake credentials: loopback only


def test_boto3_invoke_endpoint(server):
    body = {"inputs": ["Licensed under the", "two"], "parameters": {"max_new_tokens": 8}}
    resp = runtime(server).invoke_endpoint(EndpointName="any", ContentType="application/json", Body=json.dumps(body),
                                           TargetModel="model")
    assert resp["ContentType"] == "application/json"
    assert json.loads(resp["Body"].read()) == {"outputs": grpc_texts(server, body["inputs"], max_new_tokens=8)}
    import botocore.exceptions

    with pytest.raises(botocore.exceptions.ClientError) as err:
        runtime(server).invoke_endpoint(EndpointName="any", ContentType="application/json",
                                        Body=json.dumps({"inputs": "x", "parameters": {"top_p": 7}}))
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400 and "top_p" in str(err.value)


def test_boto3_invoke_endpoint_with_response_stream(server):
    body = {"inputs": "stream me", "parameters": {"max_new_tokens": 10}}
    resp = runtime(server).invoke_endpoint_with_response_stream(EndpointName="any", ContentType="application/json",
                                                                Body=json.dumps(body))
    assert resp["ContentType"] == "application/jsonlines"
    events = list(resp["Body"])
    assert events and all(set(e) == {"PayloadPart"} for e in events)
    lines = [json.loads(line) for line in b"".join(e["PayloadPart"]["Bytes"] for e in events).splitlines()]
    assert [x["index"] for x in lines] == list(range(10)) and lines[-1]["finish_reason"] == "length"
    assert lines[-1]["generated_text"] == grpc_texts(server, ["stream me"], max_new_tokens=10)[0]


def test_openai_chat_on_a_model_without_a_chat_template_is_400(server):
    status, raw = server.http("/v1/chat/completions", json.dumps(
        {"model": "model", "messages": [{"role": "user", "content": "hi"}]}).encode(), JSON)
    err = json.loads(raw)["error"]
    assert status == 400 and "no chat template" in err["message"] and "--chat-template" in err["message"]
    assert err["param"] == "messages"
