"""Models served, their replicas, admission limits and replica choice (least outstanding work)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from controller.api.params import RequestError
from controller.fleet.replica import Replica
from controller.tokenizer import Codec


@dataclass
class ModelEntry:
    name: str
    codec: Codec
    replicas: list[Replica]
    max_model_len: int
    vocab_size: int
    encoder_decoder: bool = False  # T5: max_model_len limits prompt and new tokens separately
    kv_blocks: int = 0  # KV-cache blocks of one replica, block_size tokens each (0: not known yet)
    block_size: int = 0
    # requests admitted beyond what the replicas' batches hold before RESOURCE_EXHAUSTED
    max_queued_requests: int = 256
    max_batch_size: int = 32
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def capacity(self) -> int:
        return self.max_batch_size * max(1, len(self.replicas)) + self.max_queued_requests

    def ready_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.ready]


class Router:
    def __init__(self):
        self.models: dict[str, ModelEntry] = {}
        self.accepting = True

    def add(self, entry: ModelEntry) -> None:
        self.models[entry.name] = entry

    def get(self, name: str) -> ModelEntry:
        if not name:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"field model: required when several models are served ({', '.join(self.models)})")
        entry = self.models.get(name)
        if entry is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model {name!r} is not served; served: {', '.join(self.models) or 'none'}")
        return entry

    @contextmanager
    def admit(self, entry: ModelEntry, n: int = 1):
        """Hold n admission slots of `entry` for the duration of a request (one per prompt).

        Never blocks: a request beyond `capacity` (what the replicas' batches hold plus
        max_queued_requests, DJLServing's job_queue_size) is refused at once with RESOURCE_EXHAUSTED.
        The slot is released when the request ends for any reason (done, error, client cancel or
        deadline: the worker call is cancelled too and the engine frees its batch row and KV blocks
        at its next step)."""
        if not self.accepting:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if n > entry.capacity:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"field prompts: {n} prompts in one request, more than model {entry.name} admits at "
                               f"once ({entry.capacity}); send fewer per request")
        with entry.lock:
            if entry.in_flight + n > entry.capacity:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"model {entry.name}: {entry.in_flight} requests in flight, the limit is "
                                   f"{entry.capacity} (batch {entry.max_batch_size} x {len(entry.replicas)} replicas "
                                   f"+ max_queued_requests {entry.max_queued_requests}); retry later")
            entry.in_flight += n
        try:
            yield
        finally:
            with entry.lock:
                entry.in_flight -= n

    def pick(self, entry: ModelEntry) -> Replica:
        ready = entry.ready_replicas()
        if not ready:
            states = ", ".join(f"{r.name}: {r.state}" for r in entry.replicas)
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"model {entry.name}: no ready replica ({states})")
        return min(ready, key=lambda r: r.outstanding)

    def any_ready(self) -> bool:
        return any(e.ready_replicas() for e in self.models.values())
