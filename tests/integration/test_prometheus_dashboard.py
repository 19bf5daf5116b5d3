"""The Grafana dashboard against a real Prometheus scraping a real /metrics endpoint.

The endpoint is a real `shardserve serve` process under generation traffic; `check_dashboard(target)`
points Prometheus at its HTTP port ("127.0.0.1:PORT").
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from controller.metrics.prometheus import LOAD_PHASES, Metrics
from controller.metrics.stats import RequestRecord
from shardserve.v1.worker_pb2 import EngineStats
from tests.integration.prom import (
    dashboard_exprs,
    evaluate_dashboard,
    prometheus,
    targets_health,
    unavailable_reason,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "shardserve.json"
MODEL = "demo"
# Generous: reaching it means something is broken, not slow. Typically done in ~5 s.
DATA_DEADLINE_S = 60.0


class SyntheticTraffic:
    """Feeds Metrics as the controller would, every `period_s`, until stopped."""

    def __init__(self, metrics: Metrics, period_s: float = 0.1) -> None:
        self.metrics, self.period_s = metrics, period_s
        self.stop = threading.Event()
        self.rng = random.Random(0)
        self.totals = {r: EngineStats(kv_blocks_total=512) for r in ("r0", "r1")}
        self.ticks = 0
        self.thread = threading.Thread(target=self.run, name="synthetic-traffic", daemon=True)

    def start(self) -> None:
        m = self.metrics
        for replica in self.totals:
            for rank in (0, 1):
                m.set_worker_up(MODEL, replica, rank, True)
            for phase, seconds in zip(LOAD_PHASES, (12.0, 30.0, 4.0, 1.5), strict=True):
                m.observe_load_phase(MODEL, replica, phase, seconds)
        self.thread.start()

    def tick(self) -> None:
        m, rng = self.metrics, self.rng
        now = time.monotonic()
        for replica, s in self.totals.items():
            for _ in range(3):
                status = rng.choices(["ok", "cancelled", "resource_exhausted", "unavailable"], [90, 4, 4, 2])[
                    0
                ]
                prompt, gen = rng.randint(5, 2000), rng.randint(1, 300)
                ttft = rng.uniform(0.02, 0.8)
                served = status in ("ok", "cancelled")
                m.observe_request(
                    RequestRecord(
                        model=MODEL, replica=replica, status=status, arrival_s=now - ttft - gen * 0.03,
                        finished_s=now, queue_s=rng.uniform(0, 0.2) if served else None,
                        first_token_s=now - gen * 0.03 if served else None,
                        prompt_tokens=prompt if status != "resource_exhausted" else 0,
                        generated_tokens=gen if served else 0,
                    )
                )  # fmt: skip
                if served:
                    s.prompt_tokens_total += prompt
                    s.generated_tokens_total += gen
                    s.prefix_cache_queries_total += prompt
                    s.prefix_cache_hits_total += rng.randint(0, prompt // 16) * 16
            s.steps_total += 7
            s.preemptions_total += rng.random() < 0.2
            s.running, s.waiting = rng.randint(1, 16), rng.randint(0, 5)
            s.batch_size, s.batch_tokens = s.running, s.running + rng.randint(0, 512)
            s.kv_blocks_used = rng.randint(10, 500)
            m.set_engine_stats(MODEL, replica, s)
        m.add_download_bytes(MODEL, 1 << 20)
        self.ticks += 1
        if self.ticks % 20 == 0:  # a worker group of r1 dies and is restarted every ~2 s
            m.inc_worker_restarts(MODEL, "r1")

    def run(self) -> None:
        while not self.stop.wait(self.period_s):
            self.tick()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def serve_metrics(metrics: Metrics) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body, ctype = metrics.exposition()
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def check_dashboard(target: str, model: str = MODEL) -> dict[str, int]:
    """Scrape `target` with a real Prometheus until every dashboard query returns data; assert it."""
    with prometheus([target]) as prom_url:
        deadline = time.monotonic() + DATA_DEADLINE_S
        while True:
            counts = evaluate_dashboard(prom_url, DASHBOARD, {"model": model})
            empty = [e for e, n in counts.items() if n == 0]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not empty, (
            f"{len(empty)} of {len(counts)} dashboard queries returned no data "
            f"(targets: {targets_health(prom_url)}):\n" + "\n".join(empty)
        )
        return counts


@pytest.fixture
def shardserve_target(tmp_path, demo_cache) -> Iterator[str]:
    """'host:port' of a real `shardserve serve` HTTP port with generation traffic flowing."""
    import grpc

    from shardserve.v1 import generate_pb2 as gpb
    from shardserve.v1 import generate_pb2_grpc as gpb_grpc
    from tests.integration.server import ServerProcess, with_demo

    server = ServerProcess(cache_dir=with_demo(tmp_path, demo_cache))
    stop = threading.Event()

    def traffic():
        stub = gpb_grpc.GenerationStub(server.channel)
        i = 0
        while not stop.is_set():
            i += 1
            try:
                stub.Generate(gpb.GenerateRequest(prompts=[f"request {i}"] * 2,
                                                  parameters=gpb.GenerationParameters(max_new_tokens=12)), timeout=30)
                if i % 5 == 0:
                    stub.Generate(gpb.GenerateRequest(prompts=[""]))  # an invalid request, counted as such
            except grpc.RpcError:
                pass

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.http_port}"
    finally:
        stop.set()
        thread.join(timeout=30)
        server.stop()


@pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")
def test_every_dashboard_query_returns_data_from_a_real_prometheus(shardserve_target):
    counts = check_dashboard(shardserve_target)
    assert len(counts) >= 30
    assert counts["label_values(shardserve_requests_total, model)"] == 1


# -- static checks of deploy/ (no Prometheus needed unless said) -------------------------------------


def test_dashboard_panels_are_labelled_filtered_and_have_units():
    dash = json.loads(DASHBOARD.read_text())
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names == ["datasource", "model"]
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert len(rows) == 7, rows
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), f"panel {p['title']!r} has no unit"
        for t in p["targets"]:
            assert 'model=~"$model"' in t["expr"], (p["title"], t["expr"])
    assert all("shardserve_" in e for e in dashboard_exprs(dash))


def test_dashboard_series_exist_in_metrics_exposition():
    body = Metrics()
    traffic = SyntheticTraffic(body)
    traffic.tick()
    body.set_worker_up(MODEL, "r0", 0, True)
    body.inc_worker_restarts(MODEL, "r0")
    body.observe_load_phase(MODEL, "r0", "load", 1.0)
    text = body.exposition()[0].decode()
    for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())):
        for name in re.findall(r"\bshardserve_\w+", expr):
            assert f"\n{name}{{" in text or text.startswith(f"{name}{{"), f"{name} not exported"


@pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")
def test_prometheus_config_passes_promtool():
    out = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_kubernetes_probes_ports_and_scrape_target_agree():
    docs = [
        d
        for f in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
        if d
    ]
    kinds = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service", "ServiceMonitor"} <= set(kinds)
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "grpc": 50051}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["port"] == "http"
    endpoint = kinds["ServiceMonitor"]["spec"]["endpoints"][0]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    svc_ports = {p["name"]: p["port"] for p in kinds["Service"]["spec"]["ports"]}
    assert svc_ports == {"http": 8080, "grpc": 50051}
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert all(t.endswith(":8080") for sc in job["static_configs"] for t in sc["targets"])
