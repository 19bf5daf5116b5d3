"""Supervision of a TP=2 replica through the real controller: a killed or hung rank ends the
in-flight streams with UNAVAILABLE (never a hang), the group restarts and serves the same tokens,
and neither SIGTERM nor SIGKILL of the controller leaves a worker process behind."""

from __future__ import annotations

import os
import signal
import time

import grpc

from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from tests.integration.processes import Stream, alive, wait_for, workers
from tests.integration.server import ServerProcess

CLIENT_DEADLINE_S = 60.0  # a stream still open after this would be the hang we must never have


def rank_pids(controller_pid: int) -> dict[int, int]:
    """rank -> pid of the controller's worker children."""
    return {c.rank: pid for pid, c in workers(controller_pid).items()}


def generate(server, prompt: str, n: int) -> list[int]:
    stub = gpb_grpc.GenerationStub(server.channel)
    out = stub.Generate(gpb.GenerateRequest(prompts=[prompt], parameters=gpb.GenerationParameters(max_new_tokens=n)),
                        timeout=CLIENT_DEADLINE_S)
    return list(out.outputs[0].token_ids)


def stream(server, max_new_tokens: int = 900) -> Stream:
    """A long stream consumed in a thread."""
    return Stream(server, gpb.GenerateStreamRequest(
        prompt="supervised", parameters=gpb.GenerationParameters(max_new_tokens=max_new_tokens)), CLIENT_DEADLINE_S)


def replica_state(server) -> dict:
    try:
        return server.stats()["demo"]["replicas"]["demo-0"]
    except Exception:  # noqa: BLE001 - the controller may be between answers
        return {}


def test_killed_or_hung_rank_fails_streams_then_the_group_restarts_and_sigterm_drains(demo_cache):
    # collectives may wait 60 s, the controller's step watchdog only 5 s: a hang is the watchdog's
    with ServerProcess("--tp", "2", "--max-batch-size", "4", "--step-watchdog", "5", cache_dir=demo_cache,
                       timeout=300) as s:
        ranks = rank_pids(s.proc.pid)
        assert sorted(ranks) == [0, 1]
        before = generate(s, "same tokens after a restart", 8)
        streams = [stream(s), stream(s)]
        wait_for(lambda: all(st.tokens >= 3 for st in streams), 60, "tokens on both streams")
        killed_at = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        for st in streams:
            st.wait()
            assert st.code == grpc.StatusCode.UNAVAILABLE, (st.code, st.details)
        took = max(st.ended_at for st in streams) - killed_at
        print(f"streams ended UNAVAILABLE {took:.2f}s after kill -9 of rank 1")
        assert not alive(ranks[0]), "the leader of the broken group must be gone too"

        wait_for(lambda: replica_state(s).get("state") == "ready" and replica_state(s).get("restarts", 0) >= 1,
                 240, "the replica to come back", every=0.2)
        print(f"replica serving again {time.monotonic() - killed_at:.1f}s after the kill")
        new_ranks = rank_pids(s.proc.pid)
        assert sorted(new_ranks) == [0, 1] and not set(new_ranks.values()) & set(ranks.values())
        assert generate(s, "same tokens after a restart", 8) == before

        # a hung rank (stopped, alive): the leader waits in a collective, no step completes while a
        # request waits, the controller's step watchdog takes the group down
        st = stream(s)
        wait_for(lambda: st.tokens >= 3, 60, "tokens on the stream")
        os.kill(new_ranks[1], signal.SIGSTOP)
        st.wait()
        assert st.code == grpc.StatusCode.UNAVAILABLE, (st.code, st.details)
        said = [line for line in s.output().splitlines() if "step watchdog 5s" in line]
        assert said, "the controller must say the step watchdog fired"
        print(said[0])
        wait_for(lambda: replica_state(s).get("state") == "ready" and replica_state(s).get("restarts", 0) >= 2,
                 240, "the replica to come back again", every=0.2)
        assert not alive(new_ranks[1])
        new_ranks = rank_pids(s.proc.pid)
        assert sorted(new_ranks) == [0, 1]

        # SIGTERM: stop admitting, let the in-flight request finish, stop the workers, exit 0
        late = stream(s, max_new_tokens=24)
        wait_for(lambda: late.tokens >= 1, 60, "the in-flight request to start")
        assert s.stop("term") == 0
        late.wait()
        assert late.code == grpc.StatusCode.OK and late.tokens == 24, (late.code, late.details, late.tokens)
        wait_for(lambda: not any(alive(p) for p in new_ranks.values()), 10, "no worker left after SIGTERM")


def test_hung_rank_hits_the_collective_timeout_and_controller_sigkill_leaves_no_worker(demo_cache):
    s = ServerProcess("--tp", "2", "--collective-timeout", "3", cache_dir=demo_cache, timeout=300)
    try:
        ranks = rank_pids(s.proc.pid)
        st = stream(s)
        wait_for(lambda: st.tokens >= 3, 60, "tokens on the stream")
        os.kill(ranks[1], signal.SIGSTOP)  # a rank that hangs: alive, but never answers a collective
        st.wait()
        assert st.code == grpc.StatusCode.UNAVAILABLE, (st.code, st.details)
        said = [line for line in s.output().splitlines() if "collective timeout 3s" in line]
        assert said, "the error must name the collective timeout"
        print(said[0])
        wait_for(lambda: replica_state(s).get("state") == "ready" and replica_state(s).get("restarts", 0) >= 1,
                 240, "the replica to come back", every=0.2)
        assert not alive(ranks[1]), "the hung rank must have been killed"
        new_ranks = rank_pids(s.proc.pid)
        assert sorted(new_ranks) == [0, 1]
    finally:
        s.stop("kill")
    wait_for(lambda: not any(alive(p) for p in new_ranks.values()), 10, "no worker left after SIGKILL")
