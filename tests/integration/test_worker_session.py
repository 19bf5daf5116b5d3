"""Worker.Session, the controller's one call per replica launch (worker/stream.py Session, controller/
fleet/session.py): a real worker process on a tiny random Llama. One message per engine step for all
of the call's requests, tokens identical to the per-request Generate, and each request's own ending
(refused, cancelled, past its deadline, its call gone) leaves the others running and frees its slot."""

from __future__ import annotations

import queue
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from controller.fleet.replica import Replica, ReplicaSpec
from shardserve.v1 import worker_pb2 as wpb
from tests.oracle import make_random_model

VOCAB = 128


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = make_random_model(cfg, tmp_path_factory.mktemp("session") / "llama")
    spec = ReplicaSpec(model_dir=model, max_model_len=128, num_kv_blocks=64, threads=1, max_restarts=0)
    r = Replica("session", spec, Path(tempfile.mkdtemp(prefix="shardserve-test-")))
    r.start()
    yield r
    r.stop()


def request(rid: str, prompt: list[int], new: int) -> wpb.WorkerGenerateRequest:
    return wpb.WorkerGenerateRequest(request_id=rid, prompt_token_ids=prompt,
                                     sampling=wpb.SamplingParams(max_new_tokens=new, min_new_tokens=new))


def tokens(call) -> list[int]:
    return [t for msg in call for t in msg.token_ids]


def wait_idle(replica) -> None:
    deadline = time.monotonic() + 30
    while (st := replica.refresh_status().stats).running or st.waiting:
        assert time.monotonic() < deadline, f"slots not freed: {st}"
        time.sleep(0.05)


def test_one_message_per_step_carries_every_request(replica):
    reqs = [request(f"r{i}", [1 + i, 2, 3, 4 + i], 8) for i in range(6)]
    want = {r.request_id: tokens(replica.stub.Generate(r, timeout=60, metadata=replica.metadata)) for r in reqs}
    up: queue.SimpleQueue = queue.SimpleQueue()
    for r in reqs:
        up.put(wpb.WorkerSessionRequest(generate=r))
    call = replica.stub.Session(iter(up.get, None), metadata=replica.metadata, timeout=60)
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    messages, finished = 0, set()
    for step in call:
        messages += 1
        for ev in step.events:
            assert not ev.status_code, ev.status_message
            got[ev.request_id] += ev.response.token_ids
            if ev.response.finish_reason != wpb.WORKER_FINISH_NONE:
                assert ev.response.finish_reason == wpb.WORKER_FINISH_LENGTH
                finished.add(ev.request_id)
        if len(finished) == len(reqs):
            break
    up.put(None)
    call.cancel()
    assert got == want
    # 48 tokens: per-request calls send 48 messages; one call sends one per step, at most
    # (one step per admission) + 8 decode steps
    assert messages <= len(reqs) + 8, messages


def test_each_request_ends_on_its_own_and_frees_its_slot(replica):
    long = replica.generate(request("long", [5, 6, 7], 60), timeout=60)
    bad = replica.generate(request("bad", [1, VOCAB + 3], 4), timeout=60)
    with pytest.raises(grpc.RpcError) as e:
        tokens(bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_token_ids" in e.value.details()
    cancelled = replica.generate(request("cancelled", [9, 9, 9], 100), timeout=60)
    assert next(cancelled).token_ids
    cancelled.cancel()
    with pytest.raises(grpc.RpcError) as e:
        tokens(cancelled)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    late = replica.generate(request("late", [4, 4], 100), timeout=0.005)
    with pytest.raises(grpc.RpcError) as e:
        tokens(late)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(tokens(long)) == 60
    wait_idle(replica)


def test_a_session_that_ends_fails_its_requests_and_the_next_request_opens_another(replica):
    calls = [replica.generate(request(f"s{i}", [3, 1, 4, 1, 5], 100), timeout=60) for i in range(3)]
    first = next(calls[0])
    assert first.prompt_tokens == 5
    errors = []

    def read(c):
        try:
            tokens(c)
        except grpc.RpcError as e:
            errors.append(e.code())

    readers = [threading.Thread(target=read, args=(c,)) for c in calls]
    for t in readers:
        t.start()
    replica.session.close()  # as when the channel closes or the worker's host vanishes
    for t in readers:
        t.join(30)
    assert errors == [grpc.StatusCode.UNAVAILABLE] * 3
    wait_idle(replica)  # the worker aborted what ran on the ended call
    assert len(tokens(replica.generate(request("after", [2, 7], 5), timeout=60))) == 5
