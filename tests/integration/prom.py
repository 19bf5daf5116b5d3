"""A real Prometheus for tests, and a check that a Grafana dashboard's queries return data.

`prometheus(targets)` starts Debian's `prometheus` binary (installed by `make system-deps`) on a free
loopback port with a generated config (1 s scrape interval) and a temporary TSDB folder, waits until
it is ready, yields its base URL and stops it. `evaluate_dashboard` substitutes Grafana's variables
into every PromQL expression of a dashboard and runs each as an instant query.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from controller.fleet.placement import free_port

SCRAPE_INTERVAL_S = 1
# What Grafana would substitute for a 1 s scrape interval: $__rate_interval = max($__interval +
# scrape interval, 4 x scrape interval); $__range = the dashboard's time range.
GRAFANA_DEFAULTS = {"__rate_interval": "4s", "__interval": "1s", "__range": "1m", "datasource": "prometheus"}


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def unavailable_reason() -> str | None:
    """Why the real-Prometheus tests cannot run here, or None when they can."""
    if prometheus_binary() is not None:
        return None
    return (
        "the `prometheus` binary is not on PATH: `make system-deps` installs Debian's package with "
        "apt-get when run as root (not root here, or apt-get failed)"
    )


def http_get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@contextmanager
def prometheus(
    targets: list[str], metrics_path: str = "/metrics", startup_timeout_s: float = 60.0
) -> Iterator[str]:
    """Run Prometheus scraping `targets` ("host:port", loopback) every second; yields its base URL."""
    binary = prometheus_binary()
    if binary is None:
        raise RuntimeError(unavailable_reason())
    tmp = Path(tempfile.mkdtemp(prefix="shardserve-prom-"))
    config = tmp / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is valid YAML
            {
                "global": {
                    "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                    "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                },
                "scrape_configs": [
                    {
                        "job_name": "shardserve",
                        "metrics_path": metrics_path,
                        "static_configs": [{"targets": targets}],
                    }
                ],
            }
        )
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"prometheus not ready after {startup_timeout_s} s: {log_path.read_text()[-2000:]}"
                )
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def targets_health(prom_url: str) -> list[tuple[str, str, str]]:
    """(scrape URL, health, last error) of every active target."""
    data = http_get_json(f"{prom_url}/api/v1/targets")["data"]["activeTargets"]
    return [(t["scrapeUrl"], t["health"], t.get("lastError", "")) for t in data]


def query(prom_url: str, expr: str) -> list[dict]:
    """Instant query; the result vector (raises on a PromQL error)."""
    body = http_get_json(f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    if body.get("status") != "success":
        raise ValueError(f"query failed: {expr}: {body}")
    if body["data"]["resultType"] != "vector":
        raise ValueError(f"expected an instant vector from {expr}, got {body['data']['resultType']}")
    return body["data"]["result"]


_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace Grafana variables ($x, ${x}, ${x:fmt}, [[x]]); an unknown variable is an error."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in variables:
            raise KeyError(
                f"dashboard uses ${name}, which has no value (given: {', '.join(sorted(variables))})"
            )
        return str(variables[name])

    return _VAR.sub(repl, expr)


def dashboard_exprs(dashboard: dict) -> list[str]:
    """Every PromQL target expression of every panel, rows (collapsed or not) included."""
    out: list[str] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            out.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


def dashboard_variable_queries(dashboard: dict) -> list[str]:
    """`label_values(metric, label)` definitions of the dashboard's query variables."""
    out = []
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            out.append(q.get("query") if isinstance(q, dict) else q)
    return out


def _label_values(prom_url: str, definition: str) -> int:
    m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*", definition)
    if not m:
        raise ValueError(f"unsupported variable query {definition!r} (expected label_values(metric, label))")
    metric, label = m.groups()
    url = f"{prom_url}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": metric})
    return len(http_get_json(url)["data"])


def evaluate_dashboard(
    prom_url: str, dashboard_json_path: Path | str, variables: Mapping[str, str]
) -> dict[str, int]:
    """Expression (as written in the dashboard) -> number of series with a finite value now.

    Variables: GRAFANA_DEFAULTS overlaid by `variables` (e.g. {"model": "demo"}). The dashboard's
    `label_values(...)` variable queries are included, keyed by their definition, counting values.
    """
    dashboard = json.loads(Path(dashboard_json_path).read_text())
    values = {**GRAFANA_DEFAULTS, **variables}
    out: dict[str, int] = {}
    for definition in dashboard_variable_queries(dashboard):
        out[definition] = _label_values(prom_url, substitute(definition, values))
    for expr in dashboard_exprs(dashboard):
        result = query(prom_url, substitute(expr, values))
        out[expr] = sum(1 for s in result if math.isfinite(float(s["value"][1])))
    return out
