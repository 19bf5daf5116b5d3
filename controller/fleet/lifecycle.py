"""Model lifecycle behind the admin API: load, scale, drain, unload, and what each model is doing now.

One `ModelRecord` per model name, from LoadModel until UnloadModel. Launching a replica blocks until its
worker is ready (minutes for a large model), so it always runs on a background thread; callers that want
to block poll `wait_settled`. Routing state lives in `ServingRouter`: a model is routable once its first
replica is ready and while it is not draining; otherwise `gate` holds the reason a request is refused.

Model states (derived, see `ModelRecord.state`):
  loading   no replica ready yet, some starting       draining   admits nothing new (admin Drain)
  ready     every wanted replica ready                unloading  draining, then its workers stop
  scaling   some ready, more starting                 failed     nothing ready and nothing starting
  degraded  some ready, others restarting or failed
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from controller.acquire.prepare import prepare_resolved
from controller.acquire.rank_fetch import plan
from controller.acquire.verify import check_weights
from controller.api.params import RequestError
from controller.fleet.placement import Layout
from controller.fleet.replica import Replica, ReplicaSpec
from controller.fleet.router import ModelEntry, ServingRouter
from controller.metrics.prometheus import LOAD_PHASES
from controller.tokenizer import Codec
from worker.manifest import is_partition, read_manifest
from worker.model_config import read_resolved_config, write_resolved_file

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
POLL_S = 0.1  # how often waits look at replica states
# Workers set PR_SET_PDEATHSIG, which fires when the *thread* that spawned them exits, so replicas are
# launched from a pool whose threads live as long as the process (idle executor threads never exit).
_LAUNCHER = ThreadPoolExecutor(max_workers=64, thread_name_prefix="launch")
_CONFIG_FILES = itertools.count()  # names of the resolved-config files in the runtime folder


def _logged(fn, *args) -> None:
    """Run fn on the launcher pool; an exception is logged (the pool would keep it silently)."""
    try:
        fn(*args)
    except Exception:
        log.exception("%s failed", fn.__name__)


@dataclass
class ModelRecord:
    name: str
    source: str  # as the user gave it ("" = the server default)
    layout: Layout
    target: int  # replicas wanted
    phase: str = "queued"
    error: str = ""
    error_code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION  # for callers that waited
    path: Path | None = None
    download_seconds: float = 0.0  # 0 unless the source was fetched (S3)
    partition_seconds: float = 0.0  # 0 unless partitioned at this start (a cached partition costs 0)
    spec: ReplicaSpec | None = None
    entry: ModelEntry | None = None
    replicas: list[Replica] = field(default_factory=list)  # replaced, never mutated (readers iterate it)
    launched_at: dict[str, float] = field(default_factory=dict)  # replica name -> monotonic seconds
    created: float = field(default_factory=time.monotonic)
    mode: str = "serving"  # serving | draining | unloading
    next_index: int = 0
    cancelled: bool = False

    @property
    def state(self) -> str:
        if self.mode != "serving":
            return self.mode
        if self.spec is None:  # still resolving the source, or that failed
            return "failed" if self.error else "loading"
        ready = sum(r.ready for r in self.replicas)
        pending = sum(r.state in ("starting", "restarting") for r in self.replicas)
        troubled = any(r.state in ("failed", "restarting") for r in self.replicas)
        if ready == 0:
            return "loading" if pending else "failed"
        if ready >= self.target and ready == len(self.replicas):
            return "ready"
        return "degraded" if troubled or not pending else "scaling"

    @property
    def in_flight(self) -> int:
        return self.entry.in_flight if self.entry else 0

    def settled(self) -> bool:
        """Nothing is starting any more (every replica ready or failed), or the load failed."""
        if self.error and self.spec is None:
            return True
        if self.spec is None or len(self.replicas) < self.target:
            return False
        return all(r.state in ("ready", "failed", "stopped") for r in self.replicas)


class ModelManager:
    """Loads, scales, drains and unloads models; the admin servicer is a thin layer over it."""

    def __init__(self, router: ServingRouter, metrics, runtime_dir: Path, *,
                 resolve: Callable, spec_for: Callable[[Path, Layout], ReplicaSpec], cache_dir: Path,
                 max_queued_requests: int = 256, grace_s: float = 30.0,
                 on_accepting: Callable[[bool], None] = lambda ok: None):
        self.router = router
        self.cache_dir = Path(cache_dir)  # partitions made at load time are cached here
        self.metrics = metrics
        self.runtime_dir = runtime_dir
        # (source or None, progress(done, total)) -> sources.ResolvedSource; raises FileNotFoundError /
        # ValueError for a bad source, controller.acquire.paths.DownloadError when S3 fails
        self.resolve = resolve
        self.spec_for = spec_for  # (folder, layout) -> ReplicaSpec; raises ValueError for a layout it can't run
        self.max_queued_requests = max_queued_requests
        self.grace_s = grace_s
        self.on_accepting = on_accepting
        self.records: dict[str, ModelRecord] = {}
        self.lock = threading.RLock()

    # ---- queries ------------------------------------------------------------------------------
    def get(self, name: str) -> ModelRecord:
        rec = self.records.get(name)
        if rec is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model {name!r} is not loaded; loaded: {', '.join(sorted(self.records)) or 'none'}")
        return rec

    def list(self) -> list[ModelRecord]:
        return [self.records[n] for n in sorted(self.records)]

    # ---- load ---------------------------------------------------------------------------------
    def load(self, name: str, source: str, layout: Layout, replicas: int = 1) -> ModelRecord:
        """Register `name` and start loading it in the background. A name held by a failed model may
        be reused (the failed record is replaced); any other existing name is ALREADY_EXISTS."""
        if not NAME_RE.fullmatch(name or ""):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"field name: {name!r} must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if replicas < 1:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"field replicas: must be >= 1, got {replicas}")
        if source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"field source: {source!r}: no such folder")
        with self.lock:
            old = self.records.get(name)
            if old is not None:
                if old.state != "failed":
                    raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                                       f"model {name!r} is already loaded ({old.state}); unload it first or "
                                       "pick another name")
                self._forget(old)
            rec = ModelRecord(name=name, source=source, layout=layout, target=replicas)
            self.records[name] = rec
            self.router.gate[name] = f"model {name!r} is loading; `shardserve admin describe {name}` shows progress"
        _LAUNCHER.submit(_logged, self._load, rec)
        return rec

    def _load(self, rec: ModelRecord) -> None:
        def progress(done: int, total: int) -> None:
            rec.phase = f"downloading: {done / 1e6:.0f} of {total / 1e6:.0f} MB"

        try:
            rec.phase = "resolving the source"
            res = self.resolve(rec.source or None, progress)
            rec.download_seconds = res.download_seconds
            self.metrics.add_download_bytes(rec.name, res.downloaded_bytes)
            rec.phase = "checking the weights"
            check_weights(res.path)  # a truncated or corrupt file is refused here, named, before any rank starts
            rec.phase = "partitioning (or reusing a cached partition)"
            lay = rec.layout
            custom_split = bool(getattr(self.spec_for(res.path, lay), "stage_layers", ()))
            prep = prepare_resolved(res, self.cache_dir, tp=lay.tensor_parallel, pp=lay.pipeline_parallel,
                                    dtype=lay.resolved_dtype, partition_ahead=not custom_split, quantize=lay.quantize)
            path = rec.path = prep.path
            if Path(path) != Path(res.path):
                check_weights(path)  # the partition (cached ones too)
            rec.partition_seconds = prep.phases.get("partition", 0.0)
            rec.phase = "reading the tokenizer"
            spec = self.spec_for(path, rec.layout)
            resolve = None
            if spec.executor == "local" and not (is_partition(path) and read_resolved_config(read_manifest(path))):
                # the workers wait for this file instead of importing transformers (worker/model_config.py)
                out = self.runtime_dir / f"{rec.name}-{next(_CONFIG_FILES)}.config.json"
                spec = dataclasses.replace(spec, resolved_config=str(out))
                resolve = functools.partial(write_resolved_file, Path(path), out)
            codec = Codec(path, background=True, first=resolve)  # read while the workers start; requests wait for it
            if res.ranks_fetch:  # an S3 partition on Ray: each rank fetches its own rank file on its node
                rec.phase = "listing the partition's rank files"
                files = plan(res.origin, read_manifest(path))
                spec = dataclasses.replace(spec, rank_files=tuple(f.to_json() for f in files),
                                           node_cache_dir=str(self.cache_dir.absolute()))
        except Exception as e:  # a bad source or layout: the model is failed, with the reason
            rec.error_code = (grpc.StatusCode.NOT_FOUND if isinstance(e, FileNotFoundError) else
                              grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, ValueError) else
                              grpc.StatusCode.FAILED_PRECONDITION)
            self._fail(rec, str(e) or type(e).__name__)
            return
        with self.lock:
            if rec.cancelled:
                return
            rec.entry = ModelEntry(name=rec.name, codec=codec, replicas=[], max_model_len=0, vocab_size=0,
                                   max_queued_requests=self.max_queued_requests, max_batch_size=spec.max_batch_size)
            rec.spec = spec
            self.router.add(rec.entry)
            rec.phase = "launching workers"
            self._grow(rec)
        try:
            codec.wait()
        except Exception as e:  # a tokenizer that cannot be read fails the model, as before the launch
            self._fail(rec, f"reading the tokenizer: {e or type(e).__name__}")
            for r in list(rec.replicas):
                r.stop()

    def _fail(self, rec: ModelRecord, error: str) -> None:
        log.error("model %s failed to load: %s", rec.name, error)
        with self.lock:
            rec.error, rec.phase = error, "failed"
            if self.records.get(rec.name) is rec:
                self.router.gate[rec.name] = f"model {rec.name!r} failed to load: {error.splitlines()[0][:300]}"
                self.router.failed.add(rec.name)

    def _grow(self, rec: ModelRecord) -> None:
        """Launch replicas until there are rec.target of them (caller holds the lock)."""
        new = []
        while len(rec.replicas) + len(new) < rec.target:
            r = Replica(f"{rec.name}-{rec.next_index}", rec.spec, self.runtime_dir, on_event=self._replica_event)
            r.model_name = rec.name
            rec.next_index += 1
            rec.launched_at[r.name] = time.monotonic()
            new.append(r)
        self._set_replicas(rec, rec.replicas + new)
        for r in new:
            _LAUNCHER.submit(_logged, self._start_replica, rec, r)

    def _start_replica(self, rec: ModelRecord, r: Replica) -> None:
        try:
            r.start()
        except Exception as e:
            if not r.stopping:
                r.state, r.failure = "failed", str(e)[-4000:]
                log.error("replica %s failed to start: %s", r.name, e)
                with self.lock:
                    if not any(x.ready or x.state in ("starting", "restarting") for x in rec.replicas):
                        first = str(e).splitlines()[0] if str(e) else type(e).__name__
                        self._fail(rec, f"no replica could start: {first}")
            return
        if r.stopping or rec.cancelled:
            r.stop()
            return
        if rec.download_seconds:
            self.metrics.observe_load_phase(rec.name, r.name, "download", rec.download_seconds)
        if rec.partition_seconds:
            self.metrics.observe_load_phase(rec.name, r.name, "partition", rec.partition_seconds)
        for phase in r.status.load_phases:
            if phase.phase in LOAD_PHASES:
                self.metrics.observe_load_phase(rec.name, r.name, phase.phase, phase.seconds)
        with self.lock:
            entry = rec.entry
            if entry.max_model_len == 0:  # the first ready replica tells the model's limits
                entry.max_model_len, entry.vocab_size = r.status.max_model_len, r.status.vocab_size
                entry.encoder_decoder = r.status.encoder_decoder  # T5: limits per side (params.resolve)
                entry.kv_blocks, entry.block_size = r.status.stats.kv_blocks_total, r.status.block_size
            rec.error = ""
            self.router.failed.discard(rec.name)
            if rec.mode == "serving":
                rec.phase = "serving"
                self.router.gate.pop(rec.name, None)

    def _replica_event(self, event: str, replica: Replica) -> None:
        model = getattr(replica, "model_name", replica.name)
        if event in ("up", "down"):
            self.metrics.set_worker_up(model, replica.name, 0, event == "up")
        elif event == "restart":
            self.metrics.inc_worker_restarts(model, replica.name)

    def _set_replicas(self, rec: ModelRecord, replicas: list[Replica]) -> None:
        rec.replicas = list(replicas)
        if rec.entry is not None:
            rec.entry.replicas = rec.replicas

    # ---- waiting ------------------------------------------------------------------------------
    def wait_settled(self, rec: ModelRecord, timeout_s: float | None, is_active=lambda: True) -> bool:
        """Block until nothing of `rec` is starting (True) or the timeout / caller goes away (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not rec.settled():
            if rec.cancelled or not is_active() or (deadline is not None and time.monotonic() > deadline):
                return False
            time.sleep(POLL_S)
        return True

    def _wait_idle(self, count: Callable[[], int], grace_s: float) -> int:
        """Wait until count() is 0 or grace_s passes; return the last count."""
        deadline = time.monotonic() + grace_s
        while (n := count()) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return n

    # ---- scale --------------------------------------------------------------------------------
    def scale(self, name: str, replicas: int, grace_s: float | None = None) -> ModelRecord:
        """Grow in the background; shrink by draining the chosen replicas (up to grace) and stopping them."""
        if replicas < 1:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"field replicas: must be >= 1, got {replicas}; unload the model to stop it")
        with self.lock:
            rec = self.get(name)
            if rec.mode != "serving" or rec.state == "failed":
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"model {name!r} is {rec.state}; only a loading or serving model can be scaled")
            rec.target = replicas
            victims: list[Replica] = []
            if rec.spec is not None and replicas > len(rec.replicas):
                self._grow(rec)
            elif replicas < len(rec.replicas):
                # least useful first: not ready, then the least busy, then the newest
                order = sorted(rec.replicas, key=lambda r: (r.ready, r.outstanding, -rec.replicas.index(r)))
                victims = order[: len(rec.replicas) - replicas]
                self._set_replicas(rec, [r for r in rec.replicas if r not in victims])
        for r in victims:
            r.ready = False  # no new picks; requests already on it finish within the grace period
            self._wait_idle(lambda r=r: r.outstanding, self.grace_s if grace_s is None else grace_s)
            r.stop()
            self.metrics.remove_replica(name, r.name)
            log.info("model %s: replica %s stopped (scaled to %d)", name, r.name, replicas)
        return rec

    # ---- drain / unload -------------------------------------------------------------------------
    def drain(self, model: str, timeout_s: float | None, resume: bool) -> tuple[int, bool]:
        """(requests still in flight, drained within the timeout)."""
        if model:
            rec = self.get(model)
            with self.lock:
                if rec.mode == "unloading":
                    raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"model {model!r} is being unloaded")
                rec.mode = "serving" if resume else "draining"
                if resume:
                    if rec.entry is not None and rec.entry.max_model_len:
                        self.router.gate.pop(model, None)
                    elif not rec.error:
                        self.router.gate[model] = f"model {model!r} is loading"
                else:
                    self.router.gate[model] = f"model {model!r} is draining: it admits no new requests"
            entries = [rec.entry] if rec.entry else []
        else:
            self.router.closed_reason = "server is draining: it admits no new requests"
            self.router.accepting = resume
            self.on_accepting(resume)
            entries = [r.entry for r in self.list() if r.entry]
        if resume:
            return sum(e.in_flight for e in entries), False
        left = self._wait_idle(lambda: sum(e.in_flight for e in entries), self.grace_s if timeout_s is None else timeout_s)
        return left, left == 0

    def unload(self, name: str, grace_s: float | None = None) -> tuple[int, int]:
        """(requests in flight when the drain began, requests cut when the grace period ended)."""
        with self.lock:
            rec = self.get(name)
            if rec.mode == "unloading":
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"model {name!r} is already being unloaded")
            rec.mode = "unloading"
            self.router.gate[name] = f"model {name!r} is being unloaded"
        began = rec.in_flight
        cut = self._wait_idle(lambda: rec.in_flight, self.grace_s if grace_s is None else grace_s)
        with self.lock:
            self._forget(rec)
        log.info("model %s unloaded (%d in flight at the start, %d cut)", name, began, cut)
        return began, cut

    def _forget(self, rec: ModelRecord) -> None:
        """Stop every worker of `rec` and drop it from the router, metrics and registry (lock held)."""
        rec.cancelled = True
        for r in rec.replicas:
            r.stop()
        if self.records.get(rec.name) is rec:
            del self.records[rec.name]
            self.router.models.pop(rec.name, None)
            self.router.gate.pop(rec.name, None)
            self.router.failed.discard(rec.name)
            self.metrics.remove_model(rec.name)

    def stop_all(self) -> None:
        with self.lock:
            for rec in list(self.records.values()):
                rec.cancelled = True
                for r in rec.replicas:
                    r.stop()
