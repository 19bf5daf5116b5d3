"""The Ray executor: one placement group per replica launch, one bundle and one actor per rank.

  connect(address)   ray.init once per controller process: an address (host:port, "auto"), or none:
                     the cluster this machine runs (RAY_ADDRESS, the latest `ray start`), else a local
                     Ray started for this process on 127.0.0.1. Usage statistics are off unless the
                     environment turns them on (RAY_USAGE_STATS_ENABLED).
  launch             a placement group of world-size bundles ({CPU: threads} or {CPU, GPU: 1}), PACK,
                     SPREAD or STRICT_SPREAD; it waits for the cluster to have room (up to the start
                     timeout, so a replica comes back once a lost node is replaced). Bundle i hosts
                     rank i: a RankHost actor (ray_host.py) that reports its node's address and free
                     ports, then starts `python -m worker` with that rank's WorkerConfig. The process
                     group meets at rank 0's node address; the leader serves worker.proto on that
                     address over TCP, with the launch token (over TLS when the spec names tls_cert and
                     tls_key, files on the leader's node: the controller checks the certificate against
                     worker_tls_ca for the name worker_tls_name), and the controller pings it (keepalive)
                     so a vanished host breaks the calls instead of hanging them.
                     With an S3 partition (spec.rank_files), each actor first fetches its rank's
                     files on its node (ray_host.py fetch, acquire/rank_fetch.py) into the node's
                     cache folder, and the rank loads that folder.
  close              kills every actor (their children die with them) and removes the placement group.

Ray fate-shares actors and placement groups with the job that made them, so a controller that is
SIGKILLed leaves none behind either: Ray's GCS removes them when the driver's connection drops.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

from controller.fleet.executor import RankGroup, WorkerStartError, worker_argv
from controller.fleet.placement import LayoutError, RankPlacement
from worker.config import TOKEN_ENV, WorkerReport

log = logging.getLogger(__name__)

STRATEGY = {"pack": "PACK", "spread": "SPREAD", "strict-spread": "STRICT_SPREAD"}
_lock = threading.Lock()
_actor_class = None


def connect(address: str = "") -> None:
    """Join the Ray cluster (once per process; later calls do nothing)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as e:
        raise RuntimeError(f"--executor ray needs Ray: pip install 'shardserve[ray]' ({e})") from None

    with _lock:
        if ray.is_initialized():
            return
        kw = dict(namespace="shardserve", log_to_driver=False, include_dashboard=False,
                  configure_logging=False)
        if address and address != "auto" and not address.startswith("ray://"):
            ray.init(address=address, _node_ip_address=_local_address_to(address), **kw)
        elif address:
            ray.init(address=address, **kw)
        else:
            try:
                ray.init(address="auto", **kw)  # RAY_ADDRESS, or the cluster `ray start` made here
            except ConnectionError:
                log.info("no Ray cluster found: starting a local one on 127.0.0.1")
                ray.init(address="local", _node_ip_address="127.0.0.1", **kw)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        log.info("Ray: %d nodes alive, resources %s", len(nodes), ray.cluster_resources())


def _local_address_to(address: str) -> str | None:
    """This host's address on the route to the cluster's GCS (no packet is sent: a UDP connect only picks
    the route), so the driver registers with the address the nodes reach it at, not a guess."""
    import socket

    host = address.rpartition(":")[0] or address
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host), 9))
            return s.getsockname()[0]
    except OSError:
        return None


def disconnect() -> None:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _rank_host():
    global _actor_class
    import ray

    from controller.fleet.ray_host import RankHost

    if _actor_class is None:
        _actor_class = ray.remote(max_restarts=0, max_task_retries=0)(RankHost)
    return _actor_class


class RayRank:
    """A rank started on its node by a RankHost actor."""

    def __init__(self, actor, facts: dict, rank: int):
        self.actor, self.facts, self.rank = actor, facts, rank
        self.node = f"{facts['ip']} {facts['node_id'][:12]}"
        self.node_id = facts["node_id"]
        self.pid = 0  # the worker's, once started
        self.report_path = f"{facts['dir']}/rank{rank}.report.json"
        self._exit = None  # ObjectRef: resolves with the exit status, raises when the actor dies
        self._code: int | None = None
        self.lost = ""  # why the actor is gone, when it is

    def start(self, args: list[str], env: dict[str, str], timeout: float) -> None:
        import ray

        self.pid = ray.get(self.actor.start.remote(args, env), timeout=timeout)
        self._exit = self.actor.wait.remote()

    def poll(self) -> int | None:
        if self._code is not None:
            return self._code
        if self._exit is None:
            return None
        import ray

        done, _ = ray.wait([self._exit], timeout=0)
        if not done:
            return None
        try:
            self._code = int(ray.get(self._exit))
        except ray.exceptions.RayError as e:  # the actor or its node died
            self.lost, self._code = str(e).splitlines()[0][:300], -9
        return self._code

    def kill(self) -> None:
        import ray

        self.actor.kill.remote()  # the worker at once where the node still answers
        ray.kill(self.actor, no_restart=True)  # the actor; its child dies with it (parent-death signal)
        if self._exit is None:
            self._code = -9

    def terminate(self) -> None:
        import signal

        self.actor.signal.remote(int(signal.SIGTERM))

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"rank {self.rank} on {self.node}", timeout)
            time.sleep(0.05)
        return code

    def lines(self):
        import ray

        cursor = 0
        while True:
            try:
                new, cursor, done = ray.get(self.actor.read.remote(cursor), timeout=30)
            except (ray.exceptions.RayError, TimeoutError):
                return
            yield from new
            if done:
                return

    def report(self) -> WorkerReport | None:
        import ray

        try:
            text = ray.get(self.actor.report.remote(self.report_path), timeout=5)
        except (ray.exceptions.RayError, TimeoutError):
            return None
        return WorkerReport.parse(text)


class RayGroup(RankGroup):
    def __init__(self, pg, **kw):
        super().__init__(**kw)
        self.pg = pg

    def close(self, timeout: float = 10.0) -> None:
        from ray.util.placement_group import remove_placement_group

        super().close(timeout)
        try:
            remove_placement_group(self.pg)
        except Exception as e:  # noqa: BLE001 - the cluster may be going away too
            log.warning("removing placement group %s: %s", self.pg.id.hex(), e)


class RayExecutor:
    name = "ray"

    def __init__(self, spec=None):
        self.address = getattr(spec, "ray_address", "") if spec is not None else ""

    def bundles(self, spec) -> list[dict]:
        cpus = spec.threads or 1
        gpu = {"GPU": 1} if spec.device.startswith("cuda") else {}
        return [{"CPU": cpus, **gpu} for _ in range(spec.tp * spec.pp)]

    def launch(self, replica, token: str, native_kernels: bool) -> RayGroup:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        connect(self.address)
        spec = replica.spec
        if spec.pp * spec.tp > 1 and spec.device.startswith("cuda:"):
            raise LayoutError(f"device {spec.device}: with the Ray executor each rank gets its node's own GPU; "
                              "pass --device cuda")
        credentials = self.credentials(spec)  # before anything is placed: a missing CA file fails at once
        world, bundles = spec.tp * spec.pp, self.bundles(spec)
        strategy = STRATEGY[spec.placement_strategy]
        deadline = time.monotonic() + spec.start_timeout_s
        pg = placement_group(bundles, strategy=strategy, name=f"shardserve-{replica.name}")
        said = False
        while not pg.wait(timeout_seconds=1):  # a GCS call; pg.ready() would start a task
            if replica.stopping or time.monotonic() > deadline:
                remove_placement_group(pg)
                raise WorkerStartError(f"placement group for {replica.name} ({world} x {bundles[0]}, {strategy}) "
                                       f"not placed: the cluster has {ray.available_resources()} available")
            if not said:
                log.info("replica %s: waiting for the cluster to place %d bundles %s (%s)", replica.name, world,
                         bundles[0], strategy)
                said = True
        host = _rank_host()
        gpus = bundles[0].get("GPU", 0)
        actors = [host.options(num_cpus=bundles[0]["CPU"], num_gpus=gpus, scheduling_strategy=
                               PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=r))
                  .remote() for r in range(world)]
        group = RayGroup(pg, ranks=[], target="")
        try:
            refs = [a.facts.remote(2 if r == 0 else 0) for r, a in enumerate(actors)]
            while len(ray.wait(refs, num_returns=len(refs), timeout=1)[0]) < len(refs):  # the actors start
                if replica.stopping or time.monotonic() > deadline:
                    raise WorkerStartError(f"the rank hosts of {replica.name} did not start within "
                                           f"{spec.start_timeout_s:.0f}s" if not replica.stopping else "stopped")
            facts = ray.get(refs)
            left = max(1.0, deadline - time.monotonic())
            group.ranks = [RayRank(a, f, r) for r, (a, f) in enumerate(zip(actors, facts))]
            dirs = self.fetch_rank_files(spec, actors, facts, deadline) if spec.rank_files else None
            lead = facts[0]
            grpc_port, master_port = lead["ports"]
            address = f"{lead['ip']}:{grpc_port}"
            for r, rank in enumerate(group.ranks):
                place = RankPlacement(rank=r, tp_rank=r % spec.tp, pp_rank=r // spec.tp,
                                      device="cuda:0" if gpus else "cpu", threads=bundles[0]["CPU"])
                config = spec.rank_config(place, "", master_port, rank.report_path, native_kernels)
                config = dataclasses.replace(config, parent_pid=rank.facts["pid"], master_addr=lead["ip"],
                                             address=address if r == 0 else "",
                                             model_dir=dirs[r] if dirs else config.model_dir)
                rank.start(worker_argv(config.to_json(), r), {TOKEN_ENV: token}, timeout=left)
        except BaseException as e:
            for a in actors:
                ray.kill(a, no_restart=True)
            remove_placement_group(pg)
            if isinstance(e, (ray.exceptions.RayError, TimeoutError)):  # a node died, or never answered
                raise WorkerStartError(f"starting the ranks of {replica.name} on Ray: "
                                       f"{str(e).splitlines()[0][:500]}") from None
            raise
        log.info("replica %s: %d ranks placed (%s): %s", replica.name, world, strategy,
                 ", ".join(f"rank {r.rank} on {r.node}" for r in group.ranks))
        group.target = address
        # a host that vanishes (no RST) breaks the leader's calls within ~4 s instead of hanging them; the
        # leader listens only once loaded: retry the connection every 0.1-1 s, not gRPC's 1-120 s backoff
        group.channel_options = [("grpc.keepalive_time_ms", 2000), ("grpc.keepalive_timeout_ms", 2000),
                                 ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
                                 ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                                 ("grpc.max_reconnect_backoff_ms", 1000)]
        if credentials is not None:  # the certificate names a host, the controller dials a node's IP
            group.credentials = credentials
            group.channel_options.append(("grpc.ssl_target_name_override", spec.worker_tls_name))
        return group

    @staticmethod
    def fetch_rank_files(spec, actors, facts, deadline: float) -> list[str]:
        """Every rank's files of the S3 partition, fetched on its own node at once; the folders."""
        import ray

        refs = [a.fetch.remote(spec.rank_files[r], spec.node_cache_dir) for r, a in enumerate(actors)]
        got = ray.get(refs, timeout=max(1.0, deadline - time.monotonic()))
        for r, (g, f) in enumerate(zip(got, facts)):
            if "error" in g:
                raise WorkerStartError(f"rank {r} on {f['ip']} could not fetch its files: {g['error']}")
            log.info("rank %d on %s: its files of the partition fetched into %s in %.1fs", r, f["ip"], g["path"],
                     g["seconds"])
        return [g["path"] for g in got]

    @staticmethod
    def credentials(spec):
        """The controller's TLS credentials for the leader (None: plaintext): trusting spec.worker_tls_ca."""
        if not spec.tls_cert:
            return None
        import grpc

        try:
            return grpc.ssl_channel_credentials(Path(spec.worker_tls_ca).read_bytes())
        except OSError as e:
            raise WorkerStartError(f"--worker-tls-ca {spec.worker_tls_ca}: cannot read it: {e.strerror}") from None
