"""Admission control, deadlines and every generation parameter over a real server (one server:
batch size 1, queue limit 2). Batch invariance: tests/parity/test_generation.py."""

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

import grpc
import pytest

from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from tests.integration.server import ROOT, ServerProcess, with_demo


@pytest.fixture(scope="module")
def cache(tmp_path_factory, demo_cache):
    return with_demo(tmp_path_factory.mktemp("cache-admission"), demo_cache)


@pytest.fixture(scope="module")
def busy(cache):
    """A server that can hold little: one sequence per step, two more queued."""
    with ServerProcess("--max-batch-size", "1", "--max-queued-requests", "2", cache_dir=cache) as s:
        yield s


def generate(server, prompt, timeout=None, **params):
    stub = gpb_grpc.GenerationStub(server.channel)
    req = gpb.GenerateRequest(prompts=[prompt], parameters=gpb.GenerationParameters(**params))
    return stub.Generate(req, timeout=timeout).outputs[0]


def wait_idle(server, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        st = server.stats()["demo"]
        rep = st["replicas"]["demo-0"]["stats"]
        if st["in_flight"] == 0 and rep["running"] == 0 and rep["waiting"] == 0 and rep["kvBlocksUsed"] == 0:
            return
        assert time.monotonic() < deadline, f"server did not free its slots: {st}"
        time.sleep(0.1)


def test_overload_every_request_completes_or_is_refused_at_once(busy):
    def one(i):
        try:
            out = generate(busy, f"request number {i}", max_new_tokens=24)
            return "ok", out
        except grpc.RpcError as e:
            return e.code(), e.details()

    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    kinds = [k for k, _ in results]
    assert set(kinds) <= {"ok", grpc.StatusCode.RESOURCE_EXHAUSTED}, results
    assert kinds.count("ok") >= 1 and kinds.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, kinds
    for kind, detail in results:
        if kind == "ok":
            assert detail.generated_tokens == 24 and detail.finish_reason == gpb.FINISH_REASON_LENGTH
        else:
            assert "max_queued_requests 2" in detail and "retry later" in detail
    wait_idle(busy)
    assert generate(busy, "still alive", max_new_tokens=3).generated_tokens == 3


def test_deadline_exceeded_frees_the_slot(busy):
    with pytest.raises(grpc.RpcError) as err:
        generate(busy, "a long one", timeout=0.5, max_new_tokens=1000, ignore_eos=True)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(busy)
    assert generate(busy, "next", max_new_tokens=2).generated_tokens == 2


def test_context_overflow_names_the_numbers(busy):
    with pytest.raises(grpc.RpcError) as err:
        generate(busy, "three word prompt", max_new_tokens=1023)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_new_tokens (1023)" in err.value.details() and "1024" in err.value.details()


@pytest.mark.parametrize("params, needle", [
    (dict(repetition_penalty=1.2, presence_penalty=0.5), "exclusive"),
    (dict(num_beams=99), "num_beams"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=100000), "top_k"),
    (dict(frequency_penalty=7.0), "frequency_penalty"),
])
def test_out_of_range_parameters(busy, params, needle):
    with pytest.raises(grpc.RpcError) as err:
        generate(busy, "x", **params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


def test_beam_search_and_log_probs_over_grpc(busy):
    out = generate(busy, "beam me", max_new_tokens=10, num_beams=4, length_penalty=1.0, return_log_probs=True,
                   return_cum_log_probs=True)
    assert 1 <= out.generated_tokens <= 10 and len(out.log_probs) == out.generated_tokens
    assert out.cum_log_prob == pytest.approx(sum(out.log_probs), abs=1e-3)
    greedy = generate(busy, "beam me", max_new_tokens=10, return_cum_log_probs=True)
    assert out.cum_log_prob >= greedy.cum_log_prob - 1e-4 or out.finish_reason == gpb.FINISH_REASON_EOS
    stub = gpb_grpc.GenerationStub(busy.channel)
    msgs = list(stub.GenerateStream(gpb.GenerateStreamRequest(
        prompt="beam me", parameters=gpb.GenerationParameters(max_new_tokens=10, num_beams=4, length_penalty=1.0))))
    assert [m.token_id for m in msgs] == list(out.token_ids)
    assert "".join(m.text for m in msgs) == out.text


def test_cli_accepts_every_parameter_name(busy):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    params = ["beam_width=2", "len_penalty=1.0", "beam_search_diversity_rate=0.5", "max_seq_len=6",
              "repetition_penalty=1.1", "min_length=2", "random_seed=3", "is_return_output_log_probs=true",
              "is_return_cum_log_probs=true", 'bad_words_list=["zzz"]', 'stop_words_list=[[4095]]',
              "top_k=1", "top_p=0.0", "temperature=1.0"]
    cmd = [sys.executable, "-m", "controller.cli", "generate", "--address", busy.address, "--json"]
    for p in params:
        cmd += ["--param", p]
    out = subprocess.run(cmd + ["hello"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout)
    assert 1 <= len(obj["token_ids"]) <= 6 and "cum_log_prob" in obj
    hf = ["num_beams=1", "length_penalty=1.0", "max_new_tokens=4", "do_sample=true", "seed=5", "stop=[\"\\n\"]",
          "min_new_tokens=1", "frequency_penalty=0.2", "presence_penalty=0.1"]
    cmd = [sys.executable, "-m", "controller.cli", "generate", "--address", busy.address, "--json"]
    for p in hf:
        cmd += ["--param", p]
    out = subprocess.run(cmd + ["hello"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr


def test_openai_route_refused_with_429_when_admission_is_full(busy):
    """Capacity 3 (batch 1 + queue 2): three held streams, then a fourth request gets OpenAI's 429."""
    import socket

    body = json.dumps({"model": "demo", "prompt": "hold", "max_tokens": 500, "ignore_eos": True,
                       "stream": True}).encode()
    held = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", busy.http_port), timeout=60)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # admitted: the status line comes after admission
        held.append(sock)
    try:
        status, raw = busy.http("/v1/completions", json.dumps({"model": "demo", "prompt": "x", "max_tokens": 2}).encode(),
                                {"Content-Type": "application/json"})
        err = json.loads(raw)["error"]
        assert status == 429 and err["type"] == "rate_limit_error" and "limit is 3" in err["message"], err
    finally:
        for sock in held:
            sock.close()
    wait_idle(busy)
