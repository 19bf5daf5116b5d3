"""The OpenAI-compatible routes over a real server, driven by the official `openai` package (and raw
sockets for the SSE framing): completions and chat, unary and streamed, usage, stop, n, logprobs,
errors in OpenAI's shape, greedy results equal to gRPC Generate's, 64 concurrent streams beside a
stalled reader, a client that leaves frees its slot. The package's shared server (chat_server in
tests/integration/conftest.py: demo model, batch 16, a test chat template)."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import socket
import time

import grpc
import openai
import pytest

from controller.acquire.demo_model import demo_model_path
from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from tests.integration.server import CHAT_TEMPLATE


@pytest.fixture(scope="module")
def server(chat_server):
    return chat_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def grpc_generate(server, prompts, **params) -> list[gpb.GenerateOutput]:
    stub = gpb_grpc.GenerationStub(server.channel)
    inputs = [gpb.Prompt(text=p) if isinstance(p, str) else gpb.Prompt(token_ids=gpb.TokenSequence(token_ids=p))
              for p in prompts]
    return list(stub.Generate(gpb.GenerateRequest(inputs=inputs, parameters=gpb.GenerationParameters(**params))).outputs)


def chat_ids(server, messages) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_model_path(server.cache)))
    text = tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"] and models.data[0].owned_by == "shardserve"


def test_greedy_completions_equal_grpc_generate_for_every_prompt_form(server, client):
    ids = list(gpb_grpc.GenerationStub(server.channel).Tokenize(gpb.TokenizeRequest(text="Licensed under")).token_ids)
    for prompt, grpc_prompts in [("Licensed under the", ["Licensed under the"]),
                                 (["one", "two words"], ["one", "two words"]),
                                 (ids, [ids]),
                                 ([ids, ids[:2]], [ids, ids[:2]])]:
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=10, temperature=0)
        want = grpc_generate(server, grpc_prompts, max_new_tokens=10)
        assert [c.text for c in r.choices] == [o.text for o in want]
        assert [c.index for c in r.choices] == list(range(len(want)))
        assert {c.finish_reason for c in r.choices} <= {"length", "stop"}
        assert r.usage.prompt_tokens == sum(o.prompt_tokens for o in want)
        assert r.usage.completion_tokens == sum(o.generated_tokens for o in want)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    echoed = client.completions.create(model="demo", prompt="Licensed under the", max_tokens=4, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "Licensed under the" + grpc_generate(server, ["Licensed under the"],
                                                                          max_new_tokens=4)[0].text


def test_chat_runs_the_template_and_equals_grpc_on_its_token_ids(server, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=12, temperature=0)
    want = grpc_generate(server, [chat_ids(server, messages)], max_new_tokens=12)[0]
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == want.generated_tokens
    legacy = client.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0)
    assert legacy.choices[0].message.content == want.text


def test_streams_carry_what_unary_answers_and_a_final_usage_chunk(client):
    kw = {"model": "demo", "max_tokens": 12, "temperature": 0}
    unary = client.completions.create(prompt="stream me", **kw)
    chunks = list(client.completions.create(prompt="stream me", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == unary.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == unary.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "hi"}]
    unary = client.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == unary.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == unary.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_n_samples_seeds_stop_and_logprobs(server, client):
    r = client.completions.create(model="demo", prompt="sampled", max_tokens=8, n=3, seed=11, temperature=0.9)
    again = client.completions.create(model="demo", prompt="sampled", max_tokens=8, n=3, seed=11, temperature=0.9)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in r.choices}) > 1  # samples differ (seeds seed, seed+1, ...)
    assert r.usage.prompt_tokens == grpc_generate(server, ["sampled"], max_new_tokens=1)[0].prompt_tokens
    streamed = list(client.completions.create(model="demo", prompt="sampled", max_tokens=8, n=3, seed=11,
                                              temperature=0.9, stream=True))
    for c in r.choices:
        assert "".join(x.choices[0].text for x in streamed if x.choices[0].index == c.index) == c.text

    full = client.completions.create(model="demo", prompt="Licensed under the", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = client.completions.create(model="demo", prompt="Licensed under the", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"

    lp = client.completions.create(model="demo", prompt="log", max_tokens=5, temperature=0, logprobs=0)
    got = lp.choices[0].logprobs
    assert len(got.tokens) == len(got.token_logprobs) == 5 and all(x <= 0 for x in got.token_logprobs)
    out = grpc_generate(server, ["log"], max_new_tokens=5, return_log_probs=True)[0]
    assert got.token_logprobs == pytest.approx(list(out.log_probs), abs=1e-5)
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                          temperature=0, logprobs=True)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(t.logprob <= 0 for t in content)


def test_top_logprobs_list_the_most_likely_tokens(server, client):
    """Greedy: the chosen token is the first alternative, with the same log-prob; alternatives are
    best first; completions' logprobs: N and chat's top_logprobs agree with gRPC's top_log_probs."""
    out = grpc_generate(server, ["Licensed under the"], max_new_tokens=4, top_log_probs=3)[0]
    assert len(out.top_log_probs) == 4
    for tok, lp, top in zip(out.token_ids, out.log_probs, out.top_log_probs):
        assert len(top.token_ids) == len(top.texts) == 3 and top.token_ids[0] == tok
        assert top.log_probs[0] == pytest.approx(lp, abs=1e-5) and list(top.log_probs) == sorted(top.log_probs)[::-1]
    comp = client.completions.create(model="demo", prompt="Licensed under the", max_tokens=4, temperature=0,
                                     logprobs=3).choices[0].logprobs
    assert [max(d.values()) for d in comp.top_logprobs] == pytest.approx([t.log_probs[0] for t in out.top_log_probs],
                                                                         abs=1e-5)
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
               for t in chat)
    sampled = list(client.completions.create(model="demo", prompt="x", max_tokens=3, temperature=0.8, logprobs=4, stream=True, extra_body={"top_k": 2}))
    tops = [c.choices[0].logprobs.top_logprobs[0] for c in sampled if c.choices[0].logprobs]
    assert tops and all(1 <= len(t) <= 2 for t in tops)  # top_k=2 leaves at most two tokens


@pytest.mark.parametrize("call, status, param, needle", [
    (lambda c: c.completions.create(model="nope", prompt="x"), 404, None, "nope"),
    (lambda c: c.completions.create(model="demo", prompt="x", top_p=1.5), 400, "top_p", "top_p"),
    (lambda c: c.completions.create(model="demo", prompt="x", max_tokens=5000), 400, "max_tokens", "1024"),
    (lambda c: c.completions.create(model="demo", prompt="x", logprobs=6), 400, "logprobs", "5"),
    (lambda c: c.completions.create(model="demo", prompt="", max_tokens=3), 400, "prompt", "empty"),
    (lambda c: c.completions.create(model="demo", prompt=[[5, 99999]], max_tokens=3), 400, "prompt", "token ids"),
    (lambda c: c.completions.create(model="demo", prompt="x", extra_body={"bogus": 1}), 400, "bogus", "unknown"),
    (lambda c: c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}],
                                         top_logprobs=2), 400, "top_logprobs", "logprobs: true"),
    (lambda c: c.chat.completions.create(model="demo", messages=[]), 400, "messages", "messages"),
    (lambda c: c.chat.completions.create(model="demo", messages=[{"role": "wizard", "content": "x"}]), 400,
     "messages.0.role", "role"),
])
def test_errors_come_in_openai_shape_naming_the_field(client, call, status, param, needle):
    with pytest.raises(openai.APIStatusError) as err:
        call(client)
    body = err.value.body
    assert err.value.status_code == status and needle in body["message"], body
    assert body["param"] == param and set(body) == {"message", "type", "param", "code"}


def test_malformed_json_and_oversized_bodies(server):
    status, raw = server.http("/v1/completions", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in json.loads(raw)["error"]["message"]
    status, raw = server.http("/v1/chat/completions", b"[1]", {"Content-Type": "application/json"})
    assert status == 400 and "JSON object" in json.loads(raw)["error"]["message"]
    big = json.dumps({"model": "demo", "prompt": "x" * (5 << 20)}).encode()
    status, raw = server.http("/v1/completions", big, {"Content-Type": "application/json"})
    assert status == 413 and "4194304" in json.loads(raw)["error"]["message"]


def _raw_post(port: int, path: str, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return sock


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
        if out.endswith(b"0\r\n\r\n"):
            break
    return out


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return out
        out, body = out + rest[:n], rest[n + 2:]


def test_sse_framing_on_the_wire(server):
    sock = _raw_post(server.http_port, "/v1/completions",
                     {"model": "demo", "prompt": "frames", "max_tokens": 5, "temperature": 0, "stream": True})
    raw = _read_all(sock)
    sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0] == "http/1.1 200 ok" and "content-type: text/event-stream; charset=utf-8" in lines
    assert "transfer-encoding: chunked" in lines
    events = _dechunk(body).decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert {p["object"] for p in payloads} == {"text_completion"} and payloads[-1]["choices"][0]["finish_reason"]


def test_64_concurrent_streams_complete_while_one_reader_stalls(server):
    stalled = _raw_post(server.http_port, "/v1/completions",
                        {"model": "demo", "prompt": "stalled", "max_tokens": 64, "temperature": 0, "stream": True,
                         "logprobs": 0, "ignore_eos": True})  # sends, then reads nothing until the others are done

    def one(i: int) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=300)
        conn.request("POST", "/v1/completions", json.dumps({"model": "demo", "prompt": f"stream {i}", "max_tokens": 4,
                                                            "temperature": 0, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read().decode()
        conn.close()
        assert resp.status == 200, data
        return data

    with cf.ThreadPoolExecutor(64) as pool:
        bodies = list(pool.map(one, range(64)))
    assert all(b.endswith("data: [DONE]\n\n") for b in bodies)
    rest = _dechunk(_read_all(stalled).partition(b"\r\n\r\n")[2]).decode()
    stalled.close()
    assert rest.endswith("data: [DONE]\n\n") and rest.count("data: {") >= 64


def test_a_client_that_leaves_a_stream_frees_its_slot(server):
    def cancelled() -> float:
        for line in server.http("/metrics")[1].decode().splitlines():
            if line.startswith('shardserve_requests_total{model="demo",replica="demo-0",status="cancelled"}'):
                return float(line.split()[-1])
        return 0.0

    before = cancelled()
    sock = _raw_post(server.http_port, "/v1/chat/completions",
                     {"model": "demo", "messages": [{"role": "user", "content": "leave"}], "max_tokens": 900,
                      "ignore_eos": True, "stream": True})
    got = b""
    while b"data: {" not in got:  # the headers, then the first chunk (the role)
        got += sock.recv(65536)
    sock.close()
    deadline = time.monotonic() + 60  # generous: reaching it means the slot leaked, not slowness
    while time.monotonic() < deadline:
        st = server.stats()["demo"]
        if st["in_flight"] == 0 and st["replicas"]["demo-0"]["stats"]["running"] == 0 and cancelled() > before:
            break
        time.sleep(0.2)
    assert st["in_flight"] == 0 and st["replicas"]["demo-0"]["stats"]["running"] == 0, st
    assert cancelled() == before + 1


def test_grpc_n_samples_token_id_prompts_tokenize_load_and_health(server):
    stub = gpb_grpc.GenerationStub(server.channel)
    ids = list(stub.Tokenize(gpb.TokenizeRequest(text="Licensed under the")).token_ids)
    assert stub.Detokenize(gpb.DetokenizeRequest(token_ids=ids)).text == "Licensed under the"
    by_text = grpc_generate(server, ["Licensed under the"], max_new_tokens=6)[0]
    by_ids = grpc_generate(server, [ids], max_new_tokens=6)[0]
    assert by_ids.token_ids == by_text.token_ids
    params = gpb.GenerationParameters(max_new_tokens=6, do_sample=True, temperature=0.9, seed=3)
    three = stub.Generate(gpb.GenerateRequest(prompts=["a"], parameters=params, n=3)).outputs
    assert len(three) == 3 and len({tuple(o.token_ids) for o in three}) > 1
    streamed: dict[int, list[int]] = {}
    req = gpb.GenerateStreamRequest(prompt_token_ids=gpb.TokenSequence(token_ids=stub.Tokenize(
        gpb.TokenizeRequest(text="a")).token_ids), parameters=params, n=3)
    for msg in stub.GenerateStream(req):
        streamed.setdefault(msg.sample, []).append(msg.token_id)
    assert [streamed[i] for i in range(3)] == [list(o.token_ids) for o in three]
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(gpb.GenerateRequest(prompts=["a"], inputs=[gpb.Prompt(text="b")]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    load = stub.Load(gpb.LoadRequest()).models
    assert [m.name for m in load] == ["demo"] and load[0].capacity > 0 and load[0].ready_replicas == 1
    rep = load[0].replicas[0]
    assert rep.name == "demo-0" and rep.state == "ready" and rep.kv_blocks_total > 0 and 0 <= rep.kv_usage <= 1

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(server.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
    deadline = time.monotonic() + 10  # per-model statuses are refreshed every second
    while health.Check(health_pb2.HealthCheckRequest(service="demo")).status != serving:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_legacy_routes_still_answer_on_the_same_port(server):
    assert server.http("/health/live") == (200, b'{"status":"live"}')
    assert server.http("/ping") == (200, b'{"status": "ready"}')
    status, raw = server.http("/v1/nothing")
    assert status == 404 and json.loads(raw)["error"]["type"] == "invalid_request_error"
