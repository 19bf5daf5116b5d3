"""Property-based requests over the public gRPC surface against ONE real server (the demo model):
every request ends OK or with a specific status, never INTERNAL/UNKNOWN or a hang (deadlines), the
worker neither dies nor restarts, and a bystander's request keeps working. Also: the outstanding
count of a multi-prompt Generate is released whatever happens, and the input limits (api/limits.py)."""

import json
import math
import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardserve.v1 import admin_pb2 as apb
from shardserve.v1 import admin_pb2_grpc as apb_grpc
from shardserve.v1 import generate_pb2 as gpb
from tests.fuzz.serving import AUTH, idle, stub, worker_state

EXAMPLES = int(os.environ.get("SHARDSERVE_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("SHARDSERVE_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.ALREADY_EXISTS}
VOCAB = 4096  # the demo model's
U32, U64 = (1 << 32) - 1, (1 << 64) - 1


def call(fn, *args, timeout=60.0, **kw):
    """Run one RPC; returns "ok" or (code, details); fails on a status outside the contract."""
    try:
        fn(*args, timeout=timeout, **kw)
        return "ok"
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, f"{e.code()}: {e.details()}"
        return e.code(), e.details()


# ---- the known leak: outstanding released exactly once ----------------------------------------

def test_multi_prompt_generate_with_an_invalid_later_prompt_leaks_nothing(server):
    req = gpb.GenerateRequest(inputs=[gpb.Prompt(text="hello"), gpb.Prompt(token_ids=gpb.TokenSequence(
        token_ids=[1, VOCAB + 7]))], parameters=gpb.GenerationParameters(max_new_tokens=4))
    code, details = call(stub(server).Generate, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "inputs" in details or "prompt" in details
    idle(server)


def test_multi_prompt_generate_whose_runs_end_early_leaks_nothing(server):
    # the first run's deadline ends the request while the later runs are started and unread
    req = gpb.GenerateRequest(prompts=["one", "two", "three"],
                              parameters=gpb.GenerationParameters(max_new_tokens=1000, ignore_eos=True))
    assert call(stub(server).Generate, req, timeout=0.5)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    idle(server)
    req = gpb.GenerateRequest(prompts=["a", "b"], n=3, parameters=gpb.GenerationParameters(max_new_tokens=3))
    assert call(stub(server).Generate, req) == "ok"
    idle(server)


# ---- limits -----------------------------------------------------------------------------------

@pytest.mark.parametrize("req, field, limit", [
    (gpb.GenerateRequest(prompts=["x" * 70000]), "prompts[0]", "65536"),  # --max-prompt-bytes
    (gpb.GenerateRequest(prompts=["x"] * 65), "prompts", "64"),  # --max-prompts over option.max_prompts
    (gpb.GenerateRequest(prompts=["x"] * 8, n=9), "n", "64"),
    (gpb.GenerateRequest(prompts=["x"], n=U32), "n", "64"),
    (gpb.GenerateRequest(prompts=["x"], parameters=gpb.GenerationParameters(stop=["s"] * 17)), "stop",
     "16"),  # SERVING_MAX_STOP_STRINGS
    (gpb.GenerateRequest(prompts=["x"], parameters=gpb.GenerationParameters(stop=["s" * 2000])), "stop", "1024"),
    (gpb.GenerateRequest(prompts=["x"], parameters=gpb.GenerationParameters(bad_words=["b"] * 33)), "bad_words",
     "32"),  # option.max_bad_words in serving.properties
    (gpb.GenerateRequest(prompts=["x"], parameters=gpb.GenerationParameters(bad_words=["b" * 2000])), "bad_words",
     "1024"),
])
def test_each_limit_is_refused_naming_the_field_and_the_limit(server, req, field, limit):
    code, details = call(stub(server).Generate, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details and f"limit of {limit}" in details, details


def test_a_message_past_the_grpc_size_limit_is_resource_exhausted(server):
    code, _ = call(stub(server).Generate, gpb.GenerateRequest(prompts=["y" * (5 << 20)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stream_and_tokenize_have_the_same_limits(server):
    code, details = call(lambda r, **kw: list(stub(server).GenerateStream(r, **kw)),
                         gpb.GenerateStreamRequest(prompt="x", n=U32))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit" in details
    code, details = call(stub(server).Tokenize, gpb.TokenizeRequest(text="z" * 70000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "text" in details


def test_http_routes_have_the_same_limits(server):
    """OpenAI and SageMaker requests are checked against the same limits before tokenizing: a 400
    whose message names the field and the limit, nothing started."""
    def post(path, body):
        status, data = server.http(path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        return status, data.decode()

    status, text = post("/v1/completions", {"prompt": "x" * 70000, "max_tokens": 1})
    assert status == 400 and "prompt" in text and "limit" in text, text
    status, text = post("/v1/completions", {"prompt": ["x"] * 8, "n": 9, "max_tokens": 1})
    assert status == 400 and "limit" in text, text
    status, text = post("/invocations", {"inputs": ["x"] * 65, "parameters": {"max_new_tokens": 1}})
    assert status == 400 and "inputs" in text and "limit" in text, text
    status, text = post("/invocations", {"inputs": "x" * 70000})
    assert status == 400 and "limit" in text, text


# ---- fuzzing ----------------------------------------------------------------------------------

floats = st.one_of(st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, -1.0, 1e30, -1e30, 1e-30]),
                   st.floats(width=32, allow_nan=True, allow_infinity=True))
u32 = st.one_of(st.sampled_from([0, 1, 2, VOCAB - 1, VOCAB, U32]), st.integers(0, U32))
u64 = st.one_of(st.sampled_from([0, U64]), st.integers(0, U64))
token_ids = st.lists(st.one_of(st.integers(0, VOCAB + 10), st.just(U32)), max_size=6)
words = st.lists(st.text(max_size=12), max_size=40)
sequences = st.lists(st.builds(gpb.TokenSequence, token_ids=token_ids), max_size=40)
text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Mn", "Zs", "Co"]), max_size=40),
    st.sampled_from(["\u0301", "\u0300\u0301\u0302" * 50, "\x00", "\ufeff", "\U0010ffff", "a\r\n\t\x1b[0m",
                     "é" * 3000, "🙂" * 500]),
)


@st.composite
def parameters(draw):
    p = gpb.GenerationParameters()
    choices = {
        "max_new_tokens": st.one_of(st.sampled_from([0, 1, 2, 1023, 1024, U32]), st.integers(0, 8)),
        "temperature": floats, "top_k": u32, "top_p": floats, "do_sample": st.booleans(), "seed": u64,
        "repetition_penalty": floats, "presence_penalty": floats, "frequency_penalty": floats,
        "min_new_tokens": u32, "num_beams": st.one_of(st.integers(0, 4), st.sampled_from([16, 17, U32])),
        "length_penalty": floats, "beam_search_diversity_rate": floats,
        "return_log_probs": st.booleans(), "return_cum_log_probs": st.booleans(), "ignore_eos": st.booleans(),
    }
    for name in draw(st.sets(st.sampled_from(sorted(choices)))):
        setattr(p, name, draw(choices[name]))
    p.stop.extend(draw(words))
    p.bad_words.extend(draw(words))
    p.stop_token_sequences.extend(draw(sequences))
    p.bad_word_token_sequences.extend(draw(sequences))
    if p.max_new_tokens > 8 and draw(st.booleans()):
        p.max_new_tokens = 8  # keep most requests short; the extremes above still come through
    return p


prompts = st.one_of(st.builds(gpb.Prompt, text=text),
                    st.builds(gpb.Prompt, token_ids=st.builds(gpb.TokenSequence, token_ids=token_ids)))


@FUZZ
@given(params=parameters(), inputs=st.lists(prompts, max_size=5), n=st.sampled_from([0, 1, 2, 3, U32]))
def test_fuzz_generate(server, params, inputs, n):
    req = gpb.GenerateRequest(inputs=inputs, n=n, parameters=params)
    call(stub(server).Generate, req, timeout=60)


@FUZZ
@given(params=parameters(), prompt=text, ids=st.one_of(st.none(), token_ids), n=st.sampled_from([0, 1, 2, U32]))
def test_fuzz_generate_stream(server, params, prompt, ids, n):
    req = gpb.GenerateStreamRequest(prompt=prompt, n=n, parameters=params)
    if ids is not None:
        req.prompt_token_ids.token_ids.extend(ids)
    call(lambda r, **kw: list(stub(server).GenerateStream(r, **kw)), req, timeout=60)


@FUZZ
@given(model=st.one_of(st.just(""), st.just("demo"), st.text(max_size=20)), t=text,
       ids=st.lists(st.integers(0, U32), max_size=20), special=st.booleans())
def test_fuzz_tokenize_detokenize_and_info(server, model, t, ids, special):
    s = stub(server)
    call(s.Tokenize, gpb.TokenizeRequest(model=model, text=t, add_special_tokens=special))
    call(s.Detokenize, gpb.DetokenizeRequest(model=model, token_ids=ids, skip_special_tokens=special))
    call(s.ModelInfo, gpb.ModelInfoRequest(model=model))
    call(s.Load, gpb.LoadRequest(model=model))


names = st.one_of(st.text(max_size=30), st.sampled_from(["", ".", "..", "../x", "/", "a/b", "demo", "x" * 300]))
sources = st.one_of(st.text(max_size=40), st.sampled_from(
    ["/", "/etc", "../../etc/passwd", "s3://", "s3://b/../../x", "file:///etc", "\x00", "hf://x", "~root"]))


@FUZZ
@given(name=names, source=sources)
def test_fuzz_admin_names_and_sources(server, name, source):
    if not source.strip() or source.strip() == "demo":
        source = "/nonexistent/" + source  # "" and "demo" name the demo model: a real load, not fuzz
    a = apb_grpc.AdminStub(server.channel)
    call(a.DescribeModel, apb.DescribeModelRequest(name=name), metadata=AUTH)
    if name != "demo":
        call(a.LoadModel, apb.LoadModelRequest(name=name, source=source, wait=True), metadata=AUTH, timeout=60)
        call(a.UnloadModel, apb.UnloadModelRequest(name=name), metadata=AUTH, timeout=60)
    call(a.ScaleModel, apb.ScaleModelRequest(name=name + "-nope", replicas=1), metadata=AUTH)


def test_after_fuzzing_the_worker_is_the_same_and_serves(server):
    idle(server)
    assert worker_state(server) == server.before
    out = stub(server).Generate(gpb.GenerateRequest(prompts=["after"],
                                                    parameters=gpb.GenerationParameters(max_new_tokens=3)),
                                timeout=60)
    assert out.outputs[0].generated_tokens == 3
    assert server.bystander.ok > 0 and not server.bystander.failures, server.bystander.failures


def test_admin_load_of_a_truncated_checkpoint_is_failed_naming_the_file(server, tmp_path):
    import shutil

    a = apb_grpc.AdminStub(server.channel)
    demo = a.DescribeModel(apb.DescribeModelRequest(name="demo"), metadata=AUTH).path
    model = tmp_path / "cut"
    shutil.copytree(demo, model)
    (model / "DEMO_MODEL").unlink(missing_ok=True)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    call(a.LoadModel, apb.LoadModelRequest(name="cut", source=str(model), wait=True), metadata=AUTH, timeout=120)
    d = a.DescribeModel(apb.DescribeModelRequest(name="cut"), metadata=AUTH)
    assert d.state == "failed" and str(weights) in d.error and "truncated" in d.error, d
    assert all(r.pid == 0 for r in d.replicas)  # no rank was started
    a.UnloadModel(apb.UnloadModelRequest(name="cut"), metadata=AUTH, timeout=60)


def test_the_worker_socket_is_private_and_refuses_callers_without_the_launch_token(server):
    import json
    import stat
    from pathlib import Path

    from shardserve.v1 import worker_pb2 as wpb
    from shardserve.v1 import worker_pb2_grpc as wpb_grpc

    pid = worker_state(server)[0][1]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    config = json.loads(argv[argv.index(b"--config") + 1])
    assert "auth_token" not in config  # the token is not on the command line (ps shows it to every user)
    sock = Path(config["socket"])
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700 and sock.parent.stat().st_uid == os.getuid()
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        w = wpb_grpc.WorkerStub(ch)
        for metadata in ((), (("x-shardserve-worker-token", "guess"),)):
            with pytest.raises(grpc.RpcError) as e:
                w.Status(wpb.WorkerStatusRequest(), timeout=10, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                list(w.Generate(wpb.WorkerGenerateRequest(request_id="x", prompt_token_ids=[1],
                                                          sampling=wpb.SamplingParams(max_new_tokens=1)),
                                timeout=10, metadata=metadata))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    idle(server)


def test_prompt_plus_new_tokens_beyond_the_context_is_refused_not_cut_to_one_token(server):
    """Through the controller and straight to the worker (with its launch token): INVALID_ARGUMENT
    naming max_new_tokens and the context, never a LENGTH finish after the first token."""
    import json
    from pathlib import Path

    from shardserve.v1 import worker_pb2 as wpb
    from shardserve.v1 import worker_pb2_grpc as wpb_grpc
    from worker.config import TOKEN_ENV, TOKEN_METADATA

    prompt = [(7 * i) % 4000 + 5 for i in range(1000)]  # the demo model's context is 1024 tokens
    req = gpb.GenerateStreamRequest(parameters=gpb.GenerationParameters(max_new_tokens=100))
    req.prompt_token_ids.token_ids.extend(prompt)
    code, details = call(lambda r, **kw: list(stub(server).GenerateStream(r, **kw)), req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens (100)" in details and "1024" in details
    pid = worker_state(server)[0][1]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    sock = json.loads(argv[argv.index(b"--config") + 1])["socket"]
    env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
    metadata = ((TOKEN_METADATA, env[TOKEN_ENV.encode()].decode()),)
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(wpb_grpc.WorkerStub(ch).Generate(wpb.WorkerGenerateRequest(
                request_id="too-long", prompt_token_ids=prompt, sampling=wpb.SamplingParams(max_new_tokens=100)),
                timeout=30, metadata=metadata))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert "max_new_tokens (100)" in e.value.details() and "1024" in e.value.details(), e.value.details()
    idle(server)
