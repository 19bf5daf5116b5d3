"""Models served, their replicas, admission limits and replica choice (least outstanding work);
ServingRouter adds the gates: a server-wide drain and per-model reasons to refuse (loading, draining)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
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
        return [r for r in self.replicas if r.ready and r.alive()]


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

    def pick(self, entry: ModelEntry, exclude: Sequence[Replica] = ()) -> Replica:
        """The ready replica with the fewest outstanding requests, leaving out `exclude`."""
        ready = [r for r in entry.ready_replicas() if r not in exclude]
        if not ready:
            states = ", ".join(f"{r.name}: {r.state}" for r in entry.replicas)
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"model {entry.name}: no ready replica ({states})")
        return min(ready, key=lambda r: r.outstanding)

    def any_ready(self) -> bool:
        return any(e.ready_replicas() for e in self.models.values())


class ServingRouter(Router):
    """Router plus admission gates: a server-wide drain and per-model reasons to refuse."""

    def __init__(self):
        super().__init__()
        self.gate: dict[str, str] = {}  # model name -> why it takes no requests (loading, draining, ...)
        self.failed: set[str] = set()  # models that failed to load: never the default, not in readiness
        self.closed_reason = "server is shutting down"  # while accepting is False

    def names(self) -> list[str]:
        return sorted(set(self.models) | set(self.gate))

    def get(self, name: str) -> ModelEntry:
        if not self.accepting:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, self.closed_reason)
        names = [n for n in self.names() if n not in self.failed]
        if not name:
            if len(names) != 1:
                if not names:
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, "no model is loaded")
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"field model: required when several models are served ({', '.join(names)})")
            name = names[0]
        reason = self.gate.get(name)
        if reason is not None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, reason)
        return super().get(name)

    @contextmanager
    def admit(self, entry: ModelEntry, n: int = 1):
        if not self.accepting:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, self.closed_reason)
        with super().admit(entry, n):
            yield

    def all_ready(self) -> bool:
        """Readiness (/ping, /health/ready): admitting, and every model (but failed ones) has a ready replica."""
        names = [n for n in self.names() if n not in self.failed]
        return bool(self.accepting and names and not any(n in self.gate for n in names)
                    and all(self.models[n].ready_replicas() for n in names))
