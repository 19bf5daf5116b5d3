"""Prometheus series for shardserve: the one module that turns plain stats into metrics.

Inputs are data recorded elsewhere: `controller.metrics.stats.RequestRecord` (one finished request), the
worker leader's `EngineStats` (any object with the proto's attribute names), worker up/down and
restart events, and model-load phase timings. `Metrics` owns its own `CollectorRegistry`, so
several servers (or tests) in one process never share series.

Series (all labelled `model`; `replica` where a replica applies):
  requests       shardserve_requests_total{status}, shardserve_request_duration_seconds (status ok),
                 shardserve_queue_duration_seconds, shardserve_time_to_first_token_seconds (from
                 arrival at the controller), shardserve_time_per_output_token_seconds,
                 shardserve_prompt_tokens_total, shardserve_generated_tokens_total (tokens of finished
                 requests), shardserve_prompt_length_tokens, shardserve_generated_length_tokens
  engine         shardserve_requests_running, shardserve_requests_waiting, shardserve_batch_size,
                 shardserve_batch_tokens, shardserve_kv_cache_usage_ratio,
                 shardserve_kv_cache_blocks{state=used|total|cached}, shardserve_preemptions_total,
                 shardserve_engine_steps_total, shardserve_engine_prompt_tokens_total,
                 shardserve_engine_generated_tokens_total, shardserve_prefix_cache_queries_total and
                 shardserve_prefix_cache_hits_total (prompt tokens looked up at admission / found in the
                 prefix cache), shardserve_kv_cache_blocks{state=cached} (live counts from the worker),
                 shardserve_spec_decode_proposed_tokens_total and
                 shardserve_spec_decode_accepted_tokens_total (speculative draft tokens verified /
                 accepted by the target)
  workers        shardserve_worker_up{rank}, shardserve_worker_restarts_total,
                 shardserve_model_load_seconds{phase} (last load), shardserve_download_bytes_total

Engine counters arrive as running totals from the worker. They are exported as true counters by
adding the delta since the previous report; a total that went down means the worker restarted, and
the new total (counted since the restart) is added whole; an all-zero report (a proto without stats)
adds nothing. So our counters never decrease and a restart loses at most what happened between the
last poll and the crash.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controller.metrics.stats import RequestRecord

log = logging.getLogger(__name__)

STATUSES = (
    "ok",
    "cancelled",
    "invalid_argument",
    "resource_exhausted",
    "unavailable",
    "deadline_exceeded",
    "error",
)
LOAD_PHASES = ("download", "partition", "load", "warmup")

# Seconds. Latency of a whole LLM request spans ~10 ms (one token, warm) to minutes (long outputs).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# Seconds per output token: ~1 ms (small model, GPU) to seconds (huge model on CPU, preemptions).
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
# Tokens per request, prompt or generated: powers of two up to 128k context.
LENGTH_BUCKETS = tuple(float(2**i) for i in range(18))  # 1 .. 131072

# EngineStats attribute -> our counter name; these arrive as totals.
_ENGINE_TOTALS = {
    "preemptions_total": "preemptions",
    "steps_total": "engine_steps",
    "prompt_tokens_total": "engine_prompt_tokens",
    "generated_tokens_total": "engine_generated_tokens",
    "prefix_cache_queries_total": "prefix_cache_queries",
    "prefix_cache_hits_total": "prefix_cache_hits",
    "spec_decode_proposed_tokens_total": "spec_decode_proposed",
    "spec_decode_accepted_tokens_total": "spec_decode_accepted",
}


@dataclass
class _Family:
    """One metric plus every label tuple it has children for (so remove_model can find them)."""

    metric: Counter | Gauge | Histogram
    children: set[tuple[str, ...]] = field(default_factory=set)

    def labels(self, *values: str):
        self.children.add(values)
        return self.metric.labels(*values)


class Metrics:
    """Thread-safe: the controller's request threads and its status poller may call concurrently."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        # (model, replica) -> last totals reported by that replica's worker, for delta tracking.
        self._last_totals: dict[tuple[str, str], dict[str, int]] = {}
        self._seen: set[tuple[str, str]] = set()
        self._families: list[_Family] = []
        mr = ("model", "replica")
        r = self.registry

        def fam(kind, name: str, doc: str, labels: Iterable[str], **kw) -> _Family:
            f = _Family(kind(name, doc, list(labels), registry=r, **kw))
            self._families.append(f)
            return f

        # requests
        self.requests = fam(
            Counter, "shardserve_requests", "Finished requests by final status.", (*mr, "status")
        )
        self.request_duration = fam(
            Histogram, "shardserve_request_duration_seconds",
            "Arrival to last token of successful requests, seconds.", mr, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue_duration = fam(
            Histogram, "shardserve_queue_duration_seconds",
            "Time a request waited before its first engine step, seconds.", mr, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.ttft = fam(
            Histogram, "shardserve_time_to_first_token_seconds",
            "Arrival at the controller to first token back at the controller, seconds.", mr,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.tpot = fam(
            Histogram, "shardserve_time_per_output_token_seconds",
            "Mean time per output token after the first, per request, seconds.", mr, buckets=TPOT_BUCKETS,
        )  # fmt: skip
        self.prompt_tokens = fam(
            Counter, "shardserve_prompt_tokens", "Prompt tokens of finished requests.", mr
        )
        self.generated_tokens = fam(
            Counter, "shardserve_generated_tokens", "Generated tokens of finished requests.", mr
        )
        self.prompt_length = fam(
            Histogram, "shardserve_prompt_length_tokens", "Prompt length per request, tokens.", mr,
            buckets=LENGTH_BUCKETS,
        )  # fmt: skip
        self.generated_length = fam(
            Histogram, "shardserve_generated_length_tokens", "Generated tokens per request.", mr,
            buckets=LENGTH_BUCKETS,
        )  # fmt: skip
        # engine (last report of the replica's leader)
        self.running = fam(Gauge, "shardserve_requests_running", "Sequences in the running batch.", mr)
        self.waiting = fam(Gauge, "shardserve_requests_waiting", "Sequences waiting to be scheduled.", mr)
        self.batch_size = fam(Gauge, "shardserve_batch_size", "Sequences in the last engine step.", mr)
        self.batch_tokens = fam(Gauge, "shardserve_batch_tokens", "Tokens in the last engine step.", mr)
        self.kv_usage = fam(
            Gauge, "shardserve_kv_cache_usage_ratio", "Used / total KV-cache blocks, 0..1.", mr
        )
        self.kv_blocks = fam(
            Gauge, "shardserve_kv_cache_blocks",
            "KV-cache blocks per replica by state (used|total|cached: known to the prefix cache).",
            (*mr, "state"),
        )  # fmt: skip
        self.preemptions = fam(
            Counter, "shardserve_preemptions", "Sequences preempted to free KV-cache blocks.", mr
        )
        self.engine_steps = fam(Counter, "shardserve_engine_steps", "Engine steps executed.", mr)
        self.prefix_cache_queries = fam(
            Counter, "shardserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache at admission.", mr
        )
        self.prefix_cache_hits = fam(
            Counter, "shardserve_prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled).", mr
        )
        self.spec_decode_proposed = fam(
            Counter, "shardserve_spec_decode_proposed_tokens", "Speculative draft tokens verified by the target.", mr
        )
        self.spec_decode_accepted = fam(
            Counter, "shardserve_spec_decode_accepted_tokens", "Speculative draft tokens the target accepted.", mr
        )
        self.engine_prompt_tokens = fam(
            Counter, "shardserve_engine_prompt_tokens", "Prompt tokens prefilled by the engine.", mr
        )
        self.engine_generated_tokens = fam(
            Counter, "shardserve_engine_generated_tokens", "Tokens generated by the engine.", mr
        )
        # workers and loading
        self.worker_up = fam(
            Gauge, "shardserve_worker_up", "1 while the worker process of this rank is alive.", (*mr, "rank")
        )
        self.worker_restarts = fam(
            Counter, "shardserve_worker_restarts", "Worker-group restarts by the supervisor.", mr
        )
        self.load_seconds = fam(
            Gauge, "shardserve_model_load_seconds", "Seconds spent in each phase of the last load.",
            (*mr, "phase"),
        )  # fmt: skip
        self.download_bytes = fam(
            Counter, "shardserve_download_bytes", "Bytes of model files downloaded.", ("model",)
        )

    # -- requests ---------------------------------------------------------------------------------

    def _touch(self, model: str, replica: str) -> None:
        """First sight of a (model, replica): create zero-valued children so rate() has a baseline."""
        key = (model, replica)
        if key in self._seen:
            return
        self._seen.add(key)
        for status in STATUSES:
            self.requests.labels(model, replica, status)
        for f in (self.prompt_tokens, self.generated_tokens, self.worker_restarts):
            f.labels(model, replica)
        self.download_bytes.labels(model)  # a model loaded from a local folder downloads 0 bytes

    def observe_request(self, rec: RequestRecord) -> None:
        status = rec.status if rec.status in STATUSES else "error"
        if status != rec.status:
            log.warning("unknown request status %r counted as 'error'", rec.status)
        m, r = rec.model, rec.replica
        with self._lock:
            self._touch(m, r)
            self.requests.labels(m, r, status).inc()
            if status == "ok":
                self.request_duration.labels(m, r).observe(max(0.0, rec.duration_s))
            if rec.queue_s is not None:
                self.queue_duration.labels(m, r).observe(max(0.0, rec.queue_s))
            if rec.ttft_s is not None:
                self.ttft.labels(m, r).observe(max(0.0, rec.ttft_s))
            if rec.tpot_s is not None:
                self.tpot.labels(m, r).observe(max(0.0, rec.tpot_s))
            # A request rejected before tokenization has no prompt length worth a histogram sample.
            if rec.prompt_tokens > 0:
                self.prompt_tokens.labels(m, r).inc(rec.prompt_tokens)
                self.prompt_length.labels(m, r).observe(rec.prompt_tokens)
            if rec.generated_tokens > 0 or status == "ok":
                self.generated_tokens.labels(m, r).inc(rec.generated_tokens)
                self.generated_length.labels(m, r).observe(rec.generated_tokens)

    # -- engine -----------------------------------------------------------------------------------

    def set_engine_stats(self, model: str, replica: str, stats) -> None:
        """One status report from the replica's leader (EngineStats or anything with its attributes)."""
        m, r = model, replica
        used, total = int(stats.kv_blocks_used), int(stats.kv_blocks_total)
        with self._lock:
            self._touch(m, r)
            self.running.labels(m, r).set(stats.running)
            self.waiting.labels(m, r).set(stats.waiting)
            self.batch_size.labels(m, r).set(stats.batch_size)
            self.batch_tokens.labels(m, r).set(stats.batch_tokens)
            self.kv_blocks.labels(m, r, "used").set(used)
            self.kv_blocks.labels(m, r, "total").set(total)
            self.kv_blocks.labels(m, r, "cached").set(int(getattr(stats, "kv_blocks_cached", 0)))
            self.kv_usage.labels(m, r).set(used / total if total > 0 else 0.0)
            totals = {attr: int(getattr(stats, attr, 0)) for attr in _ENGINE_TOTALS}
            # All zero: a fresh worker or a report without stats (proto default); either way nothing
            # to add, and keeping the previous totals means a restart is still seen as one next time.
            if not any(totals.values()):
                return
            last = self._last_totals.get((m, r), {})
            now: dict[str, int] = {}
            for attr, fam_name in _ENGINE_TOTALS.items():
                value = totals[attr]
                prev = last.get(attr)
                # value < prev: the worker restarted and counts from zero again.
                delta = value if prev is None or value < prev else value - prev
                getattr(self, fam_name).labels(m, r).inc(delta)
                now[attr] = value
            self._last_totals[(m, r)] = now

    # -- workers and loading ----------------------------------------------------------------------

    def set_worker_up(self, model: str, replica: str, rank: int, up: bool) -> None:
        with self._lock:
            self._touch(model, replica)
            self.worker_up.labels(model, replica, str(int(rank))).set(1 if up else 0)

    def inc_worker_restarts(self, model: str, replica: str) -> None:
        with self._lock:
            self._touch(model, replica)
            self.worker_restarts.labels(model, replica).inc()

    def observe_load_phase(self, model: str, replica: str, phase: str, seconds: float) -> None:
        if phase not in LOAD_PHASES:
            raise ValueError(f"load phase {phase!r} is not one of {', '.join(LOAD_PHASES)}")
        with self._lock:
            self.load_seconds.labels(model, replica, phase).set(max(0.0, float(seconds)))

    def add_download_bytes(self, model: str, n: int) -> None:
        if n < 0:
            raise ValueError(f"downloaded bytes must be >= 0, got {n}")
        with self._lock:
            self.download_bytes.labels(model).inc(n)

    def remove_replica(self, model: str, replica: str) -> None:
        """Drop every series of one replica (after scale-down), so it stops showing as stale data."""
        self._remove(lambda labels: labels[:2] == (model, replica), lambda key: key == (model, replica))

    def remove_model(self, model: str) -> None:
        """Drop every series of `model` (after unload)."""
        self._remove(lambda labels: labels[0] == model, lambda key: key[0] == model)

    def _remove(self, match_labels, match_key) -> None:
        with self._lock:
            for f in self._families:
                for labels in [lv for lv in f.children if match_labels(lv)]:
                    f.metric.remove(*labels)
                    f.children.discard(labels)
            for key in [k for k in self._seen if match_key(k)]:
                self._seen.discard(key)
            for key in [k for k in self._last_totals if match_key(k)]:
                del self._last_totals[key]

    # -- exposition -------------------------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The /metrics body and its Content-Type (Prometheus text format)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
