"""controller.metrics.prometheus: plain records in, correct Prometheus series out."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.metrics.prometheus import LATENCY_BUCKETS, LENGTH_BUCKETS, TPOT_BUCKETS, Metrics
from controller.metrics.stats import RequestRecord
from shardserve.v1.worker_pb2 import EngineStats

# The controller feeds the worker's EngineStats proto as it arrives in a Status reply.
Stats = EngineStats


def value(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def rec(**kw) -> RequestRecord:
    base = dict(
        model="m", replica="r0", status="ok", arrival_s=100.0, finished_s=102.0,
        queue_s=0.25, first_token_s=100.5, prompt_tokens=7, generated_tokens=4,
    )  # fmt: skip
    base.update(kw)
    return RequestRecord(**base)


def test_request_record_becomes_counters_and_histograms():
    m = Metrics()
    m.observe_request(rec())
    L = {"model": "m", "replica": "r0"}
    assert value(m, "shardserve_requests_total", status="ok", **L) == 1
    assert value(m, "shardserve_request_duration_seconds_sum", **L) == pytest.approx(2.0)
    assert value(m, "shardserve_queue_duration_seconds_sum", **L) == pytest.approx(0.25)
    assert value(m, "shardserve_time_to_first_token_seconds_sum", **L) == pytest.approx(0.5)
    # (102.0 - 100.5) / (4 - 1) = 0.5 s per output token after the first
    assert value(m, "shardserve_time_per_output_token_seconds_sum", **L) == pytest.approx(0.5)
    assert value(m, "shardserve_prompt_tokens_total", **L) == 7
    assert value(m, "shardserve_generated_tokens_total", **L) == 4
    assert value(m, "shardserve_prompt_length_tokens_bucket", le="8.0", **L) == 1
    assert value(m, "shardserve_prompt_length_tokens_bucket", le="4.0", **L) == 0
    assert value(m, "shardserve_generated_length_tokens_count", **L) == 1


def test_every_status_is_initialised_at_zero_and_unknown_status_counts_as_error():
    m = Metrics()
    m.observe_request(rec(status="something-new"))
    L = {"model": "m", "replica": "r0"}
    assert value(m, "shardserve_requests_total", status="error", **L) == 1
    assert value(m, "shardserve_requests_total", status="ok", **L) == 0
    assert value(m, "shardserve_requests_total", status="unavailable", **L) == 0
    assert value(m, "shardserve_requests_total", status="something-new", **L) is None


def test_failed_request_skips_duration_and_missing_times_skip_their_histograms():
    m = Metrics()
    m.observe_request(
        rec(
            status="resource_exhausted", queue_s=None, first_token_s=None, prompt_tokens=0, generated_tokens=0
        )
    )
    L = {"model": "m", "replica": "r0"}
    assert value(m, "shardserve_requests_total", status="resource_exhausted", **L) == 1
    for name in (
        "shardserve_request_duration_seconds_count",
        "shardserve_queue_duration_seconds_count",
        "shardserve_time_to_first_token_seconds_count",
        "shardserve_time_per_output_token_seconds_count",
        "shardserve_prompt_length_tokens_count",
        "shardserve_generated_length_tokens_count",
    ):
        assert value(m, name, **L) is None, name


def test_single_token_request_has_ttft_but_no_tpot():
    m = Metrics()
    m.observe_request(rec(generated_tokens=1))
    L = {"model": "m", "replica": "r0"}
    assert value(m, "shardserve_time_to_first_token_seconds_count", **L) == 1
    assert value(m, "shardserve_time_per_output_token_seconds_count", **L) is None


def test_engine_gauges_and_kv_ratio():
    m = Metrics()
    m.set_engine_stats("m", "r0", Stats(running=3, waiting=2, batch_size=3, batch_tokens=40,
                                        kv_blocks_total=200, kv_blocks_used=50))  # fmt: skip
    L = {"model": "m", "replica": "r0"}
    assert value(m, "shardserve_requests_running", **L) == 3
    assert value(m, "shardserve_requests_waiting", **L) == 2
    assert value(m, "shardserve_batch_size", **L) == 3
    assert value(m, "shardserve_batch_tokens", **L) == 40
    assert value(m, "shardserve_kv_cache_usage_ratio", **L) == pytest.approx(0.25)
    assert value(m, "shardserve_kv_cache_blocks", state="total", **L) == 200
    assert value(m, "shardserve_kv_cache_blocks", state="used", **L) == 50
    m.set_engine_stats("m", "r0", Stats(kv_blocks_total=0))  # no cache yet: ratio 0, not a division error
    assert value(m, "shardserve_kv_cache_usage_ratio", **L) == 0


def test_engine_totals_become_monotonic_counters_across_a_worker_restart():
    m = Metrics()
    L = {"model": "m", "replica": "r0"}
    steps = lambda: value(m, "shardserve_engine_steps_total", **L)  # noqa: E731
    m.set_engine_stats("m", "r0", Stats(steps_total=10, generated_tokens_total=100, preemptions_total=1))
    assert steps() == 10
    m.set_engine_stats("m", "r0", Stats(steps_total=15, generated_tokens_total=130, preemptions_total=1))
    assert steps() == 15
    assert value(m, "shardserve_engine_generated_tokens_total", **L) == 130
    # Worker restarted: its totals start again from zero; we add the new total, never go down.
    m.set_engine_stats("m", "r0", Stats(steps_total=4, generated_tokens_total=20, preemptions_total=0))
    assert steps() == 19
    assert value(m, "shardserve_engine_generated_tokens_total", **L) == 150
    assert value(m, "shardserve_preemptions_total", **L) == 1
    m.set_engine_stats("m", "r0", Stats(steps_total=6, generated_tokens_total=20, preemptions_total=2))
    assert steps() == 21
    assert value(m, "shardserve_preemptions_total", **L) == 3
    # An all-zero report (no stats in that status reply) neither adds nor hides a later restart.
    m.set_engine_stats("m", "r0", Stats())
    assert steps() == 21
    m.set_engine_stats("m", "r0", Stats(steps_total=7, generated_tokens_total=20, preemptions_total=2))
    assert steps() == 22
    m.set_engine_stats("m", "r0", Stats())
    m.set_engine_stats("m", "r0", Stats(steps_total=3, generated_tokens_total=1))  # restarted meanwhile
    assert steps() == 25
    assert value(m, "shardserve_engine_generated_tokens_total", **L) == 151
    # Replicas are tracked separately.
    m.set_engine_stats("m", "r1", Stats(steps_total=5))
    assert value(m, "shardserve_engine_steps_total", model="m", replica="r1") == 5
    assert steps() == 25


def test_speculative_decoding_counters():
    m = Metrics()
    L = {"model": "m", "replica": "r0"}
    m.set_engine_stats("m", "r0", Stats(steps_total=3, spec_decode_proposed_tokens_total=12,
                                        spec_decode_accepted_tokens_total=5))
    m.set_engine_stats("m", "r0", Stats(steps_total=4, spec_decode_proposed_tokens_total=20,
                                        spec_decode_accepted_tokens_total=9))
    assert value(m, "shardserve_spec_decode_proposed_tokens_total", **L) == 20
    assert value(m, "shardserve_spec_decode_accepted_tokens_total", **L) == 9


def test_workers_restarts_load_phases_and_download_bytes():
    m = Metrics()
    m.set_worker_up("m", "r0", 0, True)
    m.set_worker_up("m", "r0", 1, False)
    assert value(m, "shardserve_worker_up", model="m", replica="r0", rank="0") == 1
    assert value(m, "shardserve_worker_up", model="m", replica="r0", rank="1") == 0
    assert value(m, "shardserve_worker_restarts_total", model="m", replica="r0") == 0
    assert value(m, "shardserve_download_bytes_total", model="m") == 0
    m.inc_worker_restarts("m", "r0")
    m.inc_worker_restarts("m", "r0")
    assert value(m, "shardserve_worker_restarts_total", model="m", replica="r0") == 2
    m.observe_load_phase("m", "r0", "download", 12.5)
    m.observe_load_phase("m", "r0", "warmup", 0.5)
    assert value(m, "shardserve_model_load_seconds", model="m", replica="r0", phase="download") == 12.5
    with pytest.raises(ValueError, match="download, partition, load, warmup"):
        m.observe_load_phase("m", "r0", "compile", 1.0)
    m.add_download_bytes("m", 1000)
    m.add_download_bytes("m", 24)
    assert value(m, "shardserve_download_bytes_total", model="m") == 1024
    with pytest.raises(ValueError):
        m.add_download_bytes("m", -1)


def test_remove_model_and_replica_drop_only_their_series():
    m = Metrics()
    for model in ("a", "b"):
        for replica in ("r0", "r1"):
            m.observe_request(rec(model=model, replica=replica))
            m.set_engine_stats(model, replica, Stats(steps_total=3))
            m.set_worker_up(model, replica, 0, True)
        m.add_download_bytes(model, 5)
    m.remove_replica("a", "r1")
    assert value(m, "shardserve_requests_total", model="a", replica="r1", status="ok") is None
    assert value(m, "shardserve_requests_total", model="a", replica="r0", status="ok") == 1
    m.remove_model("b")
    body, _ = m.exposition()
    text = body.decode()
    assert 'model="b"' not in text
    assert 'model="a",replica="r0"' in text
    # A model that comes back starts its engine counters from a clean slate.
    m.set_engine_stats("b", "r0", Stats(steps_total=2))
    assert value(m, "shardserve_engine_steps_total", model="b", replica="r0") == 2


def test_exposition_is_parseable_and_uses_its_own_registry():
    a, b = Metrics(), Metrics()
    a.observe_request(rec())
    body, ctype = a.exposition()
    assert ctype.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "shardserve_requests" in names
    assert "shardserve_time_to_first_token_seconds" in names
    assert b"shardserve_requests_total{" not in b.exposition()[0]


def test_buckets_cover_llm_latencies_and_lengths():
    assert LATENCY_BUCKETS[0] <= 0.01 and LATENCY_BUCKETS[-1] >= 300
    assert TPOT_BUCKETS[0] <= 0.001 and TPOT_BUCKETS[-1] >= 1
    assert LENGTH_BUCKETS[0] == 1 and LENGTH_BUCKETS[-1] >= 100_000
    for b in (LATENCY_BUCKETS, TPOT_BUCKETS, LENGTH_BUCKETS):
        assert list(b) == sorted(set(b))


def test_concurrent_updates_are_not_lost():
    m = Metrics()

    def work(i: int) -> None:
        for k in range(200):
            m.observe_request(replace(rec(), replica=f"r{i % 2}"))
            m.set_engine_stats("m", f"r{i % 2}", Stats(steps_total=k))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(
        value(m, "shardserve_requests_total", model="m", replica=r, status="ok") for r in ("r0", "r1")
    )
    assert total == 800
