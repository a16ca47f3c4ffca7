"""deploy/prometheus/ and deploy/grafana/ against a real Prometheus: `promtool check config` and
`check rules` pass; then deploy/tiny.yaml with a router runs on free ports, Prometheus scrapes it
with the shipped prometheus.yml (its targets and interval changed), a few completions go
through, and every dashboard query and alert expression is evaluated through the HTTP API: none
errs, the core panels show data, every rule's health is ok, and every metric they name is one
the daemons or the router export."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from ports import free_port
from support.cluster import client, generate, running, wait_for
from support.metrics_sim import exported

from .conftest import DEPLOY

PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "kvferry.json"
JOBS = {"kvferry-prefill": "prefill", "kvferry-decode": "decode", "kvferry-router": "router"}
# panels that must show data after a few completions (by title)
CORE = (
    "Throughput: requests/s",
    "Throughput: output tokens/s (decode)",
    "Time to first token (decode)",
    "KV transfer GB/s",
)


def _render_module():
    spec = importlib.util.spec_from_file_location("render", DEPLOY / "grafana" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()


def _alerts() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_checks_the_config_and_rules(prometheus_bin):
    promtool = prometheus_bin["promtool"]
    for check, path in (("config", "prometheus.yml"), ("rules", "alerts.yml")):
        done = subprocess.run(
            [promtool, "check", check, str(PROMETHEUS / path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def _deployment(tmp_path: Path) -> Path:
    """deploy/tiny.yaml on free ports, with a router in front of its decode daemon."""
    raw = yaml.safe_load((DEPLOY / "tiny.yaml").read_text())
    prefill, decode = raw["daemons"]
    prefill.update(http_port=free_port(), bootstrap_port=free_port())
    decode.update(http_port=free_port(), prefill=[f"tcp://127.0.0.1:{prefill['bootstrap_port']}"])
    target = f"http://127.0.0.1:{decode['http_port']}"
    raw["routers"] = [{"name": "router-0", "http_port": free_port(), "targets": [target]}]
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _prometheus_config(tmp_path: Path, launcher) -> Path:
    """The shipped prometheus.yml, its targets the deployment's and its intervals 1 s."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS / f) for f in config["rule_files"]]
    assert {job["job_name"] for job in config["scrape_configs"]} == set(JOBS)
    for job in config["scrape_configs"]:
        role = JOBS[job["job_name"]]
        urls = [c.url for c in launcher.children if c.role == role]
        job["static_configs"] = [{"targets": [u.removeprefix("http://") for u in urls]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def _prometheus(binary: str, config: Path, tmp_path: Path):
    url = f"http://127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={url.removeprefix('http://')}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _ready(url, process), "Prometheus to be ready", 60)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _ready(url: str, process: subprocess.Popen) -> bool:
    assert process.poll() is None, f"Prometheus exited with {process.returncode}"
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _values(url: str, expr: str) -> list[float]:
    return [float(s["value"][1]) for s in render.api(url, "query", query=expr)["result"]]


def _serve_one(launcher) -> bool:
    """One more completion through the router (False: it is load, not a check)."""
    generate(launcher, "router-0", list(range(1, 12)), max_tokens=4)
    return False


def _shows_data(url: str, panel: dict) -> bool:
    values = [v for expr, _ in panel["targets"] for v in _values(url, expr)]
    return any(math.isfinite(v) and v > 0 for v in values)


def _rules_evaluated(url: str, since: float) -> list[dict]:
    rules = [r for g in render.api(url, "rules")["groups"] for r in g["rules"]]
    stamps = [r.get("lastEvaluation", "0001") for r in rules]
    evaluated = all(s > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since)) for s in stamps)
    return rules if evaluated else []


def test_dashboard_and_alerts_on_a_live_deployment(prometheus_bin, tmp_path):
    with running(_deployment(tmp_path)) as launcher:
        config = _prometheus_config(tmp_path, launcher)
        with _prometheus(prometheus_bin["prometheus"], config, tmp_path) as url:
            wait_for(lambda: _values(url, "up") == [1.0] * 3, "three targets up", 60)
            for i in range(4):
                prompt = list(range(1, 20 + 5 * i))
                generate(launcher, "router-0", prompt, max_tokens=8)
                generate(launcher, "decode-0", prompt, max_tokens=8)
            panels = {p["title"]: p for p in render.panels(DASHBOARD)}
            for title in CORE:
                # a rate needs the counter to grow between two scrapes: a series first scraped
                # after the requests above shows none, so keep serving while waiting
                wait_for(
                    lambda t=title: _serve_one(launcher) or _shows_data(url, panels[t]),
                    f"data in {title!r}",
                    60,
                )
            for panel in panels.values():
                for expr, _ in panel["targets"]:
                    render.api(url, "query", query=expr)  # raises with Prometheus' error
            for rule in _alerts():
                render.api(url, "query", query=rule["expr"])
            since = time.time()
            rules = []
            wait_for(lambda: rules.extend(_rules_evaluated(url, since)) or rules, "a rule run", 30)
            assert len(rules) == len(_alerts())
            assert [r["name"] for r in rules if r["health"] != "ok"] == [], rules
            families = set()
            for child in launcher.children:
                families |= set(exported(client(launcher, child.name).metrics()))
            end = time.time()
            out = tmp_path / "dashboard.png"
            render.draw(url, end - 120, end, out, step_s=2)
    named = set()
    for text in [DASHBOARD.read_text(), json.dumps(_alerts())]:
        named |= set(re.findall(r"\b((?:kvferry|process)_\w+)", text))
    bare = {re.sub(r"_(bucket|count|sum)$", "", n) for n in named}
    assert bare <= families, f"not exported: {sorted(bare - families)}"
    assert out.stat().st_size > 20_000


def test_dashboard_panels_are_well_formed():
    """What Grafana needs to import the dashboard: unique panel ids and refIds, a grid place,
    every query on the dashboard's own data-source variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    source = {"type": "prometheus", "uid": f"${{{variable['name']}}}"}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["datasource"] == source
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs) and all(t["expr"] for t in panel["targets"])
        assert all(t["datasource"] == source for t in panel["targets"])
