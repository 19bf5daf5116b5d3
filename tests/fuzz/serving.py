"""The one real server the fuzz modules share (tests/fuzz/conftest.py starts it once for the package),
a bystander client that generates all along, and the checks every module ends with."""

from __future__ import annotations

import threading
import time

import grpc

from shardserve.v1 import admin_pb2 as apb
from shardserve.v1 import admin_pb2_grpc as apb_grpc
from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc

TOKEN = "fuzz-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


class Bystander(threading.Thread):
    """Another client generating all along: every one of its requests must succeed."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.done, self.ok, self.failures = server, threading.Event(), 0, []
        self.start()

    def run(self):
        req = gpb.GenerateRequest(prompts=["bystander"], parameters=gpb.GenerationParameters(max_new_tokens=4))
        while not self.done.wait(0.2):
            try:
                stub(self.server).Generate(req, timeout=60)
                self.ok += 1
            except grpc.RpcError as e:
                self.failures.append((e.code(), e.details()))

    def stop(self):
        self.done.set()
        self.join(70)


def worker_state(server) -> tuple:
    """(replica, worker pid, restarts) per replica: equal before and after means nothing died."""
    d = apb_grpc.AdminStub(server.channel).DescribeModel(apb.DescribeModelRequest(name="demo"), metadata=AUTH)
    return tuple((r.name, r.pid, r.restarts) for r in d.replicas)


def stub(server):
    return gpb_grpc.GenerationStub(server.channel)


def idle(server):
    """Every replica's outstanding and the model's in_flight back to 0 (waits: runs end asynchronously)."""
    deadline = time.monotonic() + 30
    while True:
        st_ = server.stats()["demo"]
        outstanding = {n: r["outstanding"] for n, r in st_["replicas"].items()}
        if st_["in_flight"] == 0 and not any(outstanding.values()):
            return
        assert time.monotonic() < deadline, f"counts not released: {st_}"
        time.sleep(0.05)
