"""Structured output through the real server (demo model, random weights): JSON schemas of every
shape the issue names (nested objects, arrays with bounds, enums, integer ranges, patterned
strings), regex, choice and Lark grammars over gRPC; constrained and unconstrained requests in
one batch (the unconstrained ones keep their greedy tokens); invalid constraints refused with
INVALID_ARGUMENT naming the field; response_format and guided_* through the `openai` client.

Every schema here is bounded (maxLength, maxItems, ranges, enums, additionalProperties false), so
the grammar itself forces the output to close and a random-weight model finishes with STOP well
within max_new_tokens; every such output must parse and validate with `jsonschema`. The package's
shared server (chat_server in tests/integration/conftest.py: demo model, batch 16, a test chat template)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re

import grpc
import jsonschema
import openai
import pytest

from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


SCHEMAS = {
    "nested": obj({"user": obj({"name": {"type": "string", "maxLength": 12},
                                "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
                   "ok": {"type": "boolean"}}),
    "arrays": obj({"tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2,
                            "maxItems": 4},
                   "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                              "minItems": 1, "maxItems": 3}}),
    "enums": obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "XL"]},
                  "count": {"const": 3}}),
    "ranges": obj({"year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                   "month": {"type": "integer", "minimum": 1, "maximum": 12},
                   "delta": {"type": "integer", "minimum": -1000, "maximum": -10}}),
    "patterns": obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                     "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
                     "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    "list_of_objects": {"type": "array", "minItems": 1, "maxItems": 3,
                        "items": obj({"id": {"type": "integer", "minimum": 1, "maximum": 9}, "done": {"type": "boolean"}})},
    "optional_and_anyof": obj({"kind": {"enum": ["a", "b"]},
                               "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"}]},
                               "note": {"type": "string", "maxLength": 8}}, required=["kind", "value"]),
}
PROMPTS = ["Licensed under the", "The following JSON:"]


@pytest.fixture(scope="module")
def server(chat_server):
    return chat_server


@pytest.fixture(scope="module")
def stub(server):
    return gpb_grpc.GenerationStub(server.channel)


def generate(stub, prompts, n=1, **params) -> list[gpb.GenerateOutput]:
    req = gpb.GenerateRequest(prompts=prompts, n=n, parameters=gpb.GenerationParameters(**params))
    return list(stub.Generate(req, timeout=300).outputs)


def constrained_jobs() -> list[tuple[str, int, dict]]:
    """(schema name, n, parameters): each schema greedy, and sampled (two seeded samples per prompt)."""
    jobs = []
    for name, schema in SCHEMAS.items():
        text = json.dumps(schema)
        jobs.append((name, 1, dict(json_schema=text, max_new_tokens=160)))
        jobs.append((name, 2, dict(json_schema=text, max_new_tokens=160, do_sample=True, temperature=1.0,
                                   seed=len(jobs))))
    return jobs


def test_every_schema_output_parses_and_validates_in_a_shared_batch(stub):
    plain = dict(max_new_tokens=24)
    alone = generate(stub, PROMPTS, **plain)
    jobs = constrained_jobs()
    with cf.ThreadPoolExecutor(len(jobs) + 3) as pool:
        futures = [(name, pool.submit(generate, stub, PROMPTS, n, **p)) for name, n, p in jobs]
        beside = [pool.submit(generate, stub, PROMPTS, **plain) for _ in range(3)]  # unconstrained, same batch
        results = [(name, f.result()) for name, f in futures]
        mixed = [f.result() for f in beside]
    for outs in mixed:  # batch invariance: the constrained rows beside them change nothing
        assert [list(o.token_ids) for o in outs] == [list(o.token_ids) for o in alone]
    for name, outs in results:
        for o in outs:
            assert o.finish_reason == gpb.FINISH_REASON_STOP, (name, o.text, o.finish_reason)
            jsonschema.validate(json.loads(o.text), SCHEMAS[name])
            assert "  " not in o.text and "\n" not in o.text  # whitespace fixed: ", " and ": " only


def test_regex_choice_and_lark_grammar(stub):
    for o in generate(stub, PROMPTS, n=2, regex=r"[0-9]{3}-[a-z]{2,4}!", do_sample=True, seed=3, max_new_tokens=32):
        assert o.finish_reason == gpb.FINISH_REASON_STOP and re.fullmatch(r"[0-9]{3}-[a-z]{2,4}!", o.text), o.text
    choices = ["yes", "no", "maybe not"]
    outs = generate(stub, PROMPTS, n=3, choice=gpb.Choices(choices=choices), do_sample=True, seed=1,
                    max_new_tokens=16)
    assert all(o.text in choices and o.finish_reason == gpb.FINISH_REASON_STOP for o in outs), [o.text for o in outs]
    lark = 'start: "(" num (" + " num){1,3} ")"\nnum: /[1-9][0-9]?/'
    stream = list(stub.GenerateStream(gpb.GenerateStreamRequest(
        prompt=PROMPTS[0], parameters=gpb.GenerationParameters(grammar=lark, max_new_tokens=48)), timeout=120))
    assert stream[-1].finish_reason == gpb.FINISH_REASON_STOP
    assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?){1,3}\)", "".join(m.text for m in stream))
    for o in generate(stub, PROMPTS, grammar=lark, max_new_tokens=48):
        assert o.finish_reason == gpb.FINISH_REASON_STOP
        assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?){1,3}\)", o.text), o.text


def test_json_object_outputs_that_finish_are_objects(stub):
    for o in generate(stub, PROMPTS, n=2, json_object=True, do_sample=True, seed=5, max_new_tokens=96):
        if o.finish_reason == gpb.FINISH_REASON_STOP:  # a free-form object may run to max_new_tokens
            assert isinstance(json.loads(o.text), dict)
        else:
            assert o.finish_reason == gpb.FINISH_REASON_LENGTH and o.text.startswith("{")


@pytest.mark.parametrize("params, field", [
    (dict(json_schema='{"type": "nope"}'), "json_schema"),
    (dict(json_schema="{not json"), "json_schema"),
    (dict(json_schema=json.dumps({"type": "string", "pattern": "(["})), "json_schema"),
    (dict(regex="a{3"), "regex"),
    (dict(grammar="start: undefined_rule"), "grammar"),
    (dict(choice=gpb.Choices(choices=[])), "choice"),
    (dict(regex="[a-z]+", num_beams=2), "regex"),
])
def test_invalid_constraints_are_invalid_argument_naming_the_field(stub, params, field):
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, PROMPTS[:1], max_new_tokens=8, **params)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"parameter {field}" in e.value.details(), e.value.details()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0,
                         timeout=300)


def test_response_format_json_schema_and_json_object_through_the_openai_client(client):
    schema = SCHEMAS["nested"]
    msgs = [{"role": "user", "content": "a user, as JSON"}]
    r = client.chat.completions.create(model="demo", messages=msgs, max_tokens=160, temperature=0.8, seed=2, n=2,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "user", "schema": schema,
                                                                        "strict": True}})
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)
    r = client.chat.completions.create(model="demo", messages=msgs, max_tokens=96, temperature=0,
                                       response_format={"type": "json_object"})
    c = r.choices[0]
    assert c.message.content.startswith("{") and (c.finish_reason == "length"
                                                  or isinstance(json.loads(c.message.content), dict))
    r = client.completions.create(model="demo", prompt="Licensed under the", max_tokens=24, temperature=0,
                                  extra_body={"guided_regex": "[A-Z][a-z]{2,5} [0-9]{2}"})
    assert re.fullmatch("[A-Z][a-z]{2,5} [0-9]{2}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="demo", prompt="Licensed under the", max_tokens=8, temperature=0,
                                  extra_body={"guided_choice": ["MIT", "Apache-2.0"]})
    assert r.choices[0].text in ("MIT", "Apache-2.0")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_regex": "(["}, "guided_regex"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
])
def test_a_bad_constraint_is_a_400_in_openai_shape_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       extra_body=body)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body


def test_sagemaker_invocations_take_the_same_constraint_names(server):
    schema = SCHEMAS["enums"]
    body = {"inputs": PROMPTS, "parameters": {"json_schema": schema, "max_new_tokens": 64}}
    status, raw = server.http("/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert status == 200, raw
    for text in json.loads(raw)["outputs"]:
        jsonschema.validate(json.loads(text), schema)
    bad = {"inputs": "x", "parameters": {"guided_regex": "(["}}
    status, raw = server.http("/invocations", json.dumps(bad).encode(), {"Content-Type": "application/json"})
    assert status == 400 and "regex" in json.loads(raw)["error"], raw
