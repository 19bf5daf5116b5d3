"""Plain per-request and per-replica facts, recorded by the controller.

These are data, not metrics: `controller/metrics/prometheus.py` alone turns them into Prometheus series.
Times are `time.monotonic()` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRecord:
    """One finished request (one prompt), whatever its outcome."""

    model: str
    replica: str
    # ok | cancelled | invalid_argument | resource_exhausted | unavailable | deadline_exceeded | error
    status: str
    arrival_s: float
    finished_s: float
    queue_s: float | None = None  # waiting before its first engine step (reported by the worker)
    first_token_s: float | None = None  # absolute time the first token reached the controller
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def duration_s(self) -> float:
        return self.finished_s - self.arrival_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.first_token_s is None or self.generated_tokens < 2:
            return None
        return (self.finished_s - self.first_token_s) / (self.generated_tokens - 1)
