"""Speculative decoding through a real server (`serve --speculative-model DIR`, the demo model as its own
draft, so proposals are made and accepted whatever the random weights write): greedy tokens equal the
engine's without speculation, streams equal unary answers, stop strings still cut the text, seeds
reproduce, and the worker's counters reach /metrics and /v1/stats. (n-gram proposals rarely fire on
the demo model's random output; they are checked in tests/parity/test_speculative.py.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from tests.integration.server import ServerProcess, with_demo

TEXT = "Licensed under the Apache License, Version 2.0; you may not use this file except in compliance"


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_cache):
    from controller.acquire.demo_model import demo_model_path

    cache = with_demo(tmp_path_factory.mktemp("cache"), demo_cache)
    draft = demo_model_path(cache)  # the demo model as its own draft; the server finds it in the same cache
    with ServerProcess("--max-batch-size", "8", "--speculative-model", str(draft), "--num-speculative-tokens", "4",
                       cache_dir=cache) as s:
        yield s, cache


def generate(server, **kw) -> gpb.GenerateOutput:
    stub = gpb_grpc.GenerationStub(server.channel)
    return stub.Generate(gpb.GenerateRequest(prompts=[TEXT], parameters=gpb.GenerationParameters(**kw))).outputs[0]


def scrape(server, name: str) -> float:
    total = 0.0
    for line in server.http("/metrics")[1].decode().splitlines():
        if line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_greedy_tokens_equal_the_engine_without_speculation_and_counters_reach_metrics(served):
    server, cache = served
    out = generate(server, max_new_tokens=40, ignore_eos=True)
    prompt = list(gpb_grpc.GenerationStub(server.channel).Tokenize(gpb.TokenizeRequest(text=TEXT)).token_ids)
    from controller.acquire.demo_model import demo_model_path
    from tests.parity.test_generation import ours
    from worker.engine.build import build_engine
    from worker.engine.engine import EngineConfig
    from worker.engine.sequence import Sampling

    engine = build_engine(EngineConfig(model_dir=Path(demo_model_path(cache)), kv_cache_bytes=64 << 20))
    (want, _, _, _), = ours(engine, [(prompt, Sampling(max_new_tokens=40))])
    assert list(out.token_ids) == want and out.generated_tokens == 40
    stream = gpb_grpc.GenerationStub(server.channel).GenerateStream(gpb.GenerateStreamRequest(
        prompt=TEXT, parameters=gpb.GenerationParameters(max_new_tokens=40, ignore_eos=True)))
    assert [m.token_id for m in stream] == want
    deadline = time.monotonic() + 10
    while scrape(server, "shardserve_spec_decode_proposed_tokens_total") == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    proposed = scrape(server, "shardserve_spec_decode_proposed_tokens_total")
    accepted = scrape(server, "shardserve_spec_decode_accepted_tokens_total")
    assert proposed > 0 and 0.9 * proposed <= accepted <= proposed  # the target is its own draft
    stats = json.loads(server.http("/v1/stats")[1])["demo"]["replicas"]
    (rep,) = stats.values()
    assert int(rep["stats"]["specDecodeProposedTokensTotal"]) >= proposed


def test_stop_strings_and_sampling_with_speculation(served):
    server, _ = served
    base = generate(server, max_new_tokens=30, ignore_eos=True)
    stop = base.text[len(base.text) // 2:][:3]
    assert stop.strip(), base.text
    out = generate(server, max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert out.finish_reason == gpb.FINISH_REASON_STOP and out.text == base.text[:base.text.find(stop)]
    a = generate(server, max_new_tokens=24, ignore_eos=True, do_sample=True, temperature=0.9, seed=3)
    b = generate(server, max_new_tokens=24, ignore_eos=True, do_sample=True, temperature=0.9, seed=3)
    assert list(a.token_ids) == list(b.token_ids) and a.generated_tokens == 24  # reproducible for its seed
