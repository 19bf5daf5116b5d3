"""Chaos at every phase, through one real controller with two worker replicas of the demo model.

The victim is always replica demo-0: requests are steered onto it (least-outstanding routing breaks
ties by order) while a bystander client keeps generating all along, landing on demo-1 whenever demo-0
is busier or down. The faults: one kill -9 of demo-0's worker with one stream mid-decode and one in a
long prefill on it (and a stream on demo-1 that must finish untouched); a kill -9 while idle, then
another of the relaunched worker while it loads; a SIGSTOP (hung: caught by the step watchdog). Every
time: the victim's requests end with UNAVAILABLE (client deadlines: never a hang), the bystander never
fails, and demo-0 comes back. Also: a worker whose Status answers with an error fails its start at
once, and a full disk during a partition or a download fails naming the path, nothing half-written kept."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from tests.integration.processes import Stream, wait_for, workers
from tests.integration.server import ServerProcess

DEADLINE_S = 60.0  # a request still open after this would be the hang we must never have
WATCHDOG_S = 5  # the controller's step watchdog (a hung worker is caught within about this)


@pytest.fixture(scope="module")
def server(demo_cache):
    with ServerProcess("--replicas", "2", "--max-batch-size", "4", "--max-batch-tokens", "128",
                       "--step-watchdog", str(WATCHDOG_S), "--max-restarts", "20", "--restart-backoff", "0.05",
                       "--threads", "1", cache_dir=demo_cache) as s:
        for name in ("demo-0", "demo-1"):  # ready = one replica; the chaos needs both
            up(s, name, 0)
        s.bystander = Bystander(s)
        yield s
        s.bystander.stop()


def stub(server):
    return gpb_grpc.GenerationStub(server.channel)


class Bystander(threading.Thread):
    """Another client, unary calls and streams in turn: every one of its requests must succeed. pause()
    returns once none of its requests is in flight (so the next request of the test picks demo-0)."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.ok, self.failures = server, 0, []
        self.lock, self.paused, self.done = threading.Lock(), False, threading.Event()
        self.start()

    def run(self):
        params = gpb.GenerationParameters(max_new_tokens=6, ignore_eos=True)
        i = 0
        while not self.done.wait(0.02):
            with self.lock:
                if self.paused:
                    continue
                try:
                    if i % 2:
                        list(stub(self.server).GenerateStream(gpb.GenerateStreamRequest(
                            prompt=f"bystander {i}", parameters=params), timeout=DEADLINE_S))
                    else:
                        stub(self.server).Generate(gpb.GenerateRequest(prompts=[f"bystander {i}"], parameters=params),
                                                   timeout=DEADLINE_S)
                    self.ok += 1
                except grpc.RpcError as e:
                    self.failures.append((e.code(), e.details(), time.strftime("%H:%M:%S")))
                i += 1

    def pause(self):
        with self.lock:
            self.paused = True

    def resume(self):
        self.paused = False

    def stop(self):
        self.done.set()
        self.join(DEADLINE_S + 10)


def stream(server, prompt_ids: list[int] | None = None, max_new_tokens: int = 900) -> Stream:
    req = gpb.GenerateStreamRequest(prompt="chaos", parameters=gpb.GenerationParameters(
        max_new_tokens=max_new_tokens, ignore_eos=True))
    if prompt_ids:
        req.prompt_token_ids.token_ids.extend(prompt_ids)
    return Stream(server, req, DEADLINE_S)


def replicas(server) -> dict:
    try:
        return server.stats()["demo"]["replicas"]
    except Exception:  # noqa: BLE001 - between answers
        return {}


def worker_pids(server) -> dict[str, int]:
    """replica name -> pid of its (single) worker (its socket is NAME.sock)."""
    return {Path(c.socket).stem: pid for pid, c in workers(server.proc.pid).items()}


def kill(server, name: str) -> int:
    """kill -9 of `name`'s worker, returning once the controller has seen it die: the bystander resumes
    only then. (A request routed to the dying worker in the instant between the signal and the death
    starts again on the other replica: test_a_request_whose_replica_dies_before_its_first_token_...)"""
    pid = worker_pids(server)[name]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: replicas(server).get(name, {}).get("state") not in (None, "ready"), 30, f"{name} down")
    return pid


def up(server, name: str, restarts: int) -> dict:
    """Wait until `name` is ready again after at least `restarts` restarts."""
    return wait_for(lambda: (r := replicas(server).get(name, {})).get("state") == "ready"
                    and r.get("restarts", 0) >= restarts and r, 120, f"{name} to come back")


def outstanding(server) -> tuple[int, int]:
    r = replicas(server)
    return r.get("demo-0", {}).get("outstanding", -1), r.get("demo-1", {}).get("outstanding", -1)


def on_victim(server, start) -> object:
    """Start a request with nothing else in flight, so that it lands on demo-0; then let the bystander
    go on (to demo-1: demo-0 is busier)."""
    server.bystander.pause()
    try:
        wait_for(lambda: server.stats()["demo"]["in_flight"] == 0, 30, "nothing in flight")
        req = start()
        wait_for(lambda: replicas(server).get("demo-0", {}).get("outstanding") == 1, 30, "the request on demo-0")
    finally:
        server.bystander.resume()
    return req


def test_kill_mid_decode_and_during_a_long_prefill(server):
    """One kill -9 of demo-0 ends its decoding stream with UNAVAILABLE; its stream in a 1000-token
    prefill (128 tokens a step) ends the same way if it had a token by then, else it starts again on
    demo-1 and finishes whole; a stream on demo-1 at the same time finishes untouched."""
    base = replicas(server)["demo-0"]["restarts"]
    server.bystander.pause()
    try:
        wait_for(lambda: server.stats()["demo"]["in_flight"] == 0, 30, "nothing in flight")
        decoding = stream(server)  # both idle: demo-0 (ties go to the first)
        wait_for(lambda: outstanding(server) == (1, 0), 30, "the decoding stream on demo-0")
        healthy = stream(server, max_new_tokens=300)  # demo-1 is less busy
        wait_for(lambda: outstanding(server) == (1, 1), 30, "the healthy stream on demo-1")
        wait_for(lambda: decoding.tokens >= 3, 60, "tokens on the decoding stream")
        prefill = stream(server, prompt_ids=[(7 * i) % 4000 + 5 for i in range(1000)], max_new_tokens=16)
        wait_for(lambda: outstanding(server) == (2, 1), 30, "the prefill on demo-0")  # a tie again: demo-0
        kill(server, "demo-0")
    finally:
        server.bystander.resume()
    code, details = decoding.ended()
    assert code == grpc.StatusCode.UNAVAILABLE and "demo-0" in details, (code, details)
    code, details = prefill.ended()
    if code == grpc.StatusCode.OK:  # no token yet when demo-0 died: retried on demo-1
        assert prefill.tokens == 16, prefill.tokens
    else:
        assert code == grpc.StatusCode.UNAVAILABLE and "demo-0" in details and prefill.tokens, (code, details)
    print(f"killed with {decoding.tokens} tokens decoded; the long prompt's stream ended {code.name} "
          f"with {prefill.tokens} tokens")
    assert healthy.ended() == (grpc.StatusCode.OK, "") and healthy.tokens == 300
    up(server, "demo-0", base + 1)
    assert not server.bystander.failures, server.bystander.failures


def test_a_request_whose_replica_dies_before_its_first_token_is_retried_on_the_other(server):
    """demo-0, frozen (SIGSTOP), takes a stream and is killed before it could send a token: the stream
    starts again on demo-1 and its client sees one whole, ordinary stream."""
    base = replicas(server)["demo-0"]["restarts"]
    pid = worker_pids(server)["demo-0"]
    server.bystander.pause()
    try:
        wait_for(lambda: server.stats()["demo"]["in_flight"] == 0, 30, "nothing in flight")
        os.kill(pid, signal.SIGSTOP)
        st = stream(server, max_new_tokens=20)  # both idle: demo-0
        wait_for(lambda: outstanding(server) == (1, 0), 30, "the stream on demo-0")
        os.kill(pid, signal.SIGKILL)
        assert st.ended() == (grpc.StatusCode.OK, "") and st.tokens == 20
    finally:
        server.bystander.resume()
    assert "retrying on demo-1 (nothing was streamed yet)" in server.output()
    up(server, "demo-0", base + 1)


def test_kill_while_idle_then_again_while_it_loads(server):
    base = replicas(server)["demo-0"]["restarts"]
    server.bystander.pause()
    wait_for(lambda: server.stats()["demo"]["in_flight"] == 0, 30, "nothing in flight")
    old = kill(server, "demo-0")  # idle: no request of anyone's is on it
    server.bystander.resume()
    new = wait_for(lambda: (p := worker_pids(server).get("demo-0")) not in (None, old) and p, 60, "the relaunch")
    os.kill(new, signal.SIGKILL)  # while it imports and loads the model
    up(server, "demo-0", base + 2)
    assert "restart failed: rank 0 of demo-0 exited with code -9 while loading" in server.output()
    assert not server.bystander.failures, server.bystander.failures


def test_hung_worker_is_caught_by_the_watchdog_and_restarted(server):
    base = replicas(server)["demo-0"]["restarts"]
    st = on_victim(server, lambda: stream(server))
    wait_for(lambda: st.tokens >= 3, 60, "tokens on the victim's stream")
    pid = worker_pids(server)["demo-0"]
    os.kill(pid, signal.SIGSTOP)  # alive, holding its socket open, never answering again
    code, details = st.ended()
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    said = [line for line in server.output().splitlines() if "replica demo-0 down" in line][-1]
    assert f"watchdog {WATCHDOG_S}s" in said, said
    up(server, "demo-0", base + 1)
    assert worker_pids(server)["demo-0"] != pid and not Path(f"/proc/{pid}").exists()  # killed and reaped


def test_the_bystander_was_never_touched_and_both_replicas_serve(server):
    server.bystander.stop()
    assert server.bystander.ok > 0 and not server.bystander.failures, server.bystander.failures
    for _ in range(2):
        out = stub(server).Generate(gpb.GenerateRequest(prompts=["after", "the chaos"],
                                                        parameters=gpb.GenerationParameters(max_new_tokens=3)),
                                    timeout=DEADLINE_S)
        assert [o.generated_tokens for o in out.outputs] == [3, 3]
    assert {n: r["state"] for n, r in replicas(server).items()} == {"demo-0": "ready", "demo-1": "ready"}
    assert server.stats()["demo"]["in_flight"] == 0


# ---- a worker whose Status raises fails its start at once ---------------------------------------

def test_a_worker_whose_status_raises_fails_fast_naming_the_code(demo_cache):
    from controller.acquire.demo_model import demo_model_path
    from controller.fleet.replica import Replica, ReplicaSpec, WorkerStartError

    spec = ReplicaSpec(model_dir=demo_model_path(demo_cache), threads=1, max_model_len=64, num_kv_blocks=16, max_restarts=0,
                       start_timeout_s=DEADLINE_S * 5, test_hooks=("tests.integration.status_error_hook",))
    replica = Replica("status-raises", spec, Path(tempfile.mkdtemp(prefix="shardserve-test-")))
    try:
        with pytest.raises(WorkerStartError, match="answered Status with UNKNOWN.*injected Status failure"):
            replica.start()  # before the fix: retried until start_timeout_s
    finally:
        replica.stop()


# ---- a full disk --------------------------------------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (root only): skipped with the reason where mounting is refused."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_partition_onto_a_full_disk_fails_naming_the_path_and_keeps_nothing(demo_cache, tiny_fs):
    from controller.acquire.demo_model import demo_model_path
    from controller.acquire.partition import partition
    from worker.manifest import is_partition

    out = tiny_fs / "parts" / "demo-tp2"
    with pytest.raises(OSError) as e:
        partition(demo_model_path(demo_cache), out, tp=2, processes=1)
    msg = str(e.value)
    print(msg)
    assert "no space left" in msg.lower() and str(tiny_fs) in msg, msg
    assert not is_partition(out) and not out.exists()
    assert not [p.name for p in (tiny_fs / "parts").iterdir()]  # no temp folder left behind either


def test_download_onto_a_full_disk_fails_naming_the_path_and_keeps_nothing(demo_cache, tiny_fs, tmp_path,
                                                                         monkeypatch):
    from controller.acquire.demo_model import demo_model_path
    from controller.acquire.download import download_s3
    from controller.acquire.paths import DownloadError
    from tests.integration.s3_fixtures import TEST_ENV, MotoServer, upload_folder

    for k, v in TEST_ENV.items():
        monkeypatch.setenv(k, v)
    with MotoServer(tmp_path / "moto.log") as s3:
        client = s3.client()
        client.create_bucket(Bucket="models")
        upload_folder(client, demo_model_path(demo_cache), "models", "demo/")
        dest = tiny_fs / "demo"
        with pytest.raises(DownloadError) as e:
            download_s3("s3://models/demo/", dest, endpoint_url=s3.url, progress=False)
        msg = str(e.value)
        print(msg)
        assert "no space left" in msg.lower() and str(dest) in msg, msg
        weights = dest / "model.safetensors"
        assert not weights.exists()  # nothing partial under a final name
        # with room, the same destination completes (nothing stale was left to trip over)
        roomy = tmp_path / "demo"
        shutil.copytree(dest, roomy)
        download_s3("s3://models/demo/", roomy, endpoint_url=s3.url, progress=False)
        assert weights.name in {p.name for p in roomy.iterdir()}
