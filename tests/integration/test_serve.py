"""The walking skeleton end to end: a real controller and worker process, real gRPC clients (on the
package's shared server, chat_server in tests/integration/conftest.py; a server of its own, default
flags, for SIGTERM)."""

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from tests.integration.processes import alive, wait_for, workers
from tests.integration.server import ROOT, ServerProcess, with_demo


@pytest.fixture(scope="module")
def server(chat_server):
    return chat_server


def stub(server):
    return gpb_grpc.GenerationStub(server.channel)


def params(**kw):
    return gpb.GenerationParameters(**kw)


def test_stream_concatenation_equals_unary_text(server):
    p = params(max_new_tokens=40)
    unary = stub(server).Generate(gpb.GenerateRequest(prompts=["Licensed under the"], parameters=p)).outputs[0]
    msgs = list(stub(server).GenerateStream(gpb.GenerateStreamRequest(prompt="Licensed under the", parameters=p)))
    assert [m.token_id for m in msgs] == list(unary.token_ids)
    assert "".join(m.text for m in msgs) == unary.text
    assert [m.index for m in msgs] == list(range(len(msgs)))
    assert all(m.finish_reason == gpb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    assert msgs[-1].finish_reason == unary.finish_reason != gpb.FINISH_REASON_UNSPECIFIED
    assert msgs[-1].generated_tokens == len(msgs) and msgs[-1].prompt_tokens == unary.prompt_tokens


def test_multiple_prompts_one_output_each_in_order(server):
    prompts = ["one", "two words", "three words here"]
    batch = stub(server).Generate(gpb.GenerateRequest(prompts=prompts, parameters=params(max_new_tokens=8)))
    assert len(batch.outputs) == 3
    for prompt, out in zip(prompts, batch.outputs):
        alone = stub(server).Generate(gpb.GenerateRequest(prompts=[prompt], parameters=params(max_new_tokens=8)))
        assert list(out.token_ids) == list(alone.outputs[0].token_ids)
        assert out.generated_tokens == 8 and out.finish_reason == gpb.FINISH_REASON_LENGTH


def test_concurrent_clients_get_the_tokens_they_get_alone(server):
    def run(prompt, seed=None):
        kw = dict(max_new_tokens=24)
        if seed is not None:
            kw.update(do_sample=True, temperature=0.9, top_p=0.95, seed=seed)
        return list(stub(server).Generate(gpb.GenerateRequest(prompts=[prompt], parameters=params(**kw))).outputs[0].token_ids)

    jobs = [("alpha beta", None), ("the software", 7), ("GNU General Public", None), ("copyright", 11)]
    alone = [run(p, s) for p, s in jobs]
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda j: run(*j), jobs * 2))
    assert together == alone * 2


def test_cancelled_stream_frees_its_slot_and_blocks(server):
    call = stub(server).GenerateStream(gpb.GenerateStreamRequest(prompt="cancel me", parameters=params(max_new_tokens=900)))
    for i, _ in enumerate(call):
        if i == 3:
            break
    call.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = server.stats()["demo"]["replicas"]["demo-0"]["stats"]
        if st["kvBlocksUsed"] == 0 and st["running"] == 0:
            break
        time.sleep(0.1)
    assert st["kvBlocksUsed"] == 0 and st["running"] == 0, st
    assert server.stats()["demo"]["in_flight"] == 0


@pytest.mark.parametrize("request_kw, code, needle", [
    (dict(prompts=[""]), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(prompts=[]), grpc.StatusCode.INVALID_ARGUMENT, "prompts"),
    (dict(prompts=["x"], parameters=params(max_new_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (dict(prompts=["x"], parameters=params(max_new_tokens=5000)), grpc.StatusCode.INVALID_ARGUMENT, "1024"),
    (dict(prompts=["x"], parameters=params(top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(prompts=["x"], model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
])
def test_bad_requests_get_a_clear_status_and_the_server_keeps_serving(server, request_kw, code, needle):
    with pytest.raises(grpc.RpcError) as err:
        stub(server).Generate(gpb.GenerateRequest(**request_kw))
    assert err.value.code() == code and needle in err.value.details()
    ok = stub(server).Generate(gpb.GenerateRequest(prompts=["still here"], parameters=params(max_new_tokens=2)))
    assert ok.outputs[0].generated_tokens == 2


def test_stop_string_cuts_the_text(server):
    base = stub(server).Generate(gpb.GenerateRequest(prompts=["stop test"], parameters=params(max_new_tokens=30))).outputs[0]
    stop = base.text[len(base.text) // 2:][:3]
    assert stop.strip(), base.text
    out = stub(server).Generate(gpb.GenerateRequest(prompts=["stop test"],
                                                    parameters=params(max_new_tokens=30, stop=[stop]))).outputs[0]
    assert out.finish_reason == gpb.FINISH_REASON_STOP
    assert out.text == base.text[: base.text.find(stop)]


def test_health_reflection_and_model_info(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    info = stub(server).ModelInfo(gpb.ModelInfoRequest())
    assert [m.name for m in info.models] == ["demo"]
    assert info.models[0].max_context_length == 1024 and info.models[0].ready_replicas == 1
    assert server.http("/health/live")[0] == 200
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    services = ProtoReflectionDescriptorDatabase(server.channel).get_services()
    assert "shardserve.v1.Generation" in services


def test_the_worker_reads_the_model_config_the_controller_resolved(server):
    """The demo model is a plain checkpoint: its worker waits for the controller's resolved config
    (worker/model_config.py) instead of importing transformers for it."""
    out = server.output()
    assert "model config: resolved by the controller" in out
    assert "with transformers" not in out


def test_cli_generate_json_and_stream(server):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "controller.cli", "generate", "--address", server.address]
    out = subprocess.run(cli + ["--json", "--max-new-tokens", "6", "one", "two"], capture_output=True, text=True,
                         env=env, check=True).stdout.splitlines()
    objs = [json.loads(line) for line in out]
    assert len(objs) == 2 and all(len(o["token_ids"]) == 6 and o["finish_reason"] == "length" for o in objs)
    streamed = subprocess.run(cli + ["--stream", "--max-new-tokens", "6", "one"], capture_output=True, text=True,
                              env=env, check=True).stdout
    assert streamed.rstrip("\n") == objs[0]["text"]
    bad = subprocess.run(cli + ["--param", "nonsense=1", "x"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr and "nonsense" in bad.stderr


def test_sigterm_exits_zero_and_leaves_no_worker(demo_cache, tmp_path):
    s = ServerProcess(cache_dir=with_demo(tmp_path, demo_cache))
    st = s.stats()
    assert st["demo"]["replicas"]["demo-0"]["state"] == "ready"
    pids = list(workers(s.proc.pid))
    assert pids, "no worker child found"
    assert s.stop("term") == 0
    wait_for(lambda: not any(alive(p) for p in pids), 10, "no worker left after SIGTERM")


def test_a_taken_port_ends_the_start_at_once_and_starts_no_worker(tmp_path):
    """Another process holds --port: exit 2 naming the flag and the address, before any worker starts
    (the initial model launches before the servers bind, so the check comes first)."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--port", str(port), "--http-port", "0",
                            "--cache-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"cannot listen on --port 127.0.0.1:{port}" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing resolved, built or launched
