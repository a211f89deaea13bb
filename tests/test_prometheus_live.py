"""A real Prometheus (Debian's package) started through `prorl monitor` with the checked-in
config scrapes a real short training; every dashboard query, every template variable query and
every alert expression returns data. And `prorl monitor` without Prometheus says how to install it.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prorl_actors.exporter import metric_names
from tests.test_monitoring import _alert_rules, _dashboards, _free_port, _queries, needs_prometheus


# ---------------------------------------------------------------------------- a real Prometheus
class Prom:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params):
        u = f"{self.url}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        with urllib.request.urlopen(u, timeout=30) as r:
            d = json.load(r)
        assert d["status"] == "success", d
        return d["data"]

    def range(self, expr: str, start: float, end: float):
        return self.get("/api/v1/query_range", query=expr, start=start, end=end, step=2)["result"]


def _with_bool(expr: str) -> str:
    """An alert expression whose comparisons return 0/1 instead of filtering: it returns data
    whenever every series it reads exists (whether or not the alert would fire)."""
    return re.sub(r"(==|!=|>=|<=|>|<)(?!\s*bool)", r"\1 bool", expr)


# the series the real run below has no cause to fill, and why
MAY_STAY_EMPTY = {}


@needs_prometheus
@pytest.mark.integration
def test_real_prometheus_scrapes_a_training_and_every_query_returns_data(tiny_model, tmp_path):
    from tests.conftest import TEST_OVERRIDES
    port, name = _free_port(), f"mon-{os.getpid()}"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    monitor = subprocess.Popen([sys.executable, "-m", "prorl_actors.cli", "monitor", str(tmp_path / "runs" / name),
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env)
    try:
        ready = monitor.stdout.readline()
        assert "ready" in ready, ready + monitor.stdout.read()
        prom = Prom(f"http://127.0.0.1:{port}")
        config = prom.get("/api/v1/status/config")["yaml"]
        assert "job_name: prorl" in config and "/tmp/prorl/prometheus/*.prorl.json" in config
        t0 = time.time()
        # the checked-in targets_dir (TEST_OVERRIDES point other tests elsewhere)
        train = subprocess.Popen(
            [sys.executable, "-m", "prorl_actors.cli", "train", "specs/tiny-cpu.yaml", *TEST_OVERRIDES,
             f"model.path={tiny_model}", f"output_dir={tmp_path / 'runs'}", f"name={name}", "generator.engine=hf",
             "num_steps=36", "supervisor.num_prompts_per_step=8", "learner.num_prompts_per_mini_batch=4",
             "generator.num_samples_per_prompt=4", "generator.max_new_tokens=8",
             "validation.num_prompts_per_task=8", "validation.num_samples=4", "validation.ks=[1,2,4]",
             "validation.every_steps=12", "supervisor.resets.every_steps=3", "supervisor.kl.mode=entropy-target",
             "supervisor.kl.entropy_target_relative=0.9", "checkpoint.every_steps=12", "ray.num_cpus=2",
             "metrics.prometheus.targets_dir=/tmp/prorl/prometheus", "metrics.prometheus.linger_s=12"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        # the live exposition of the running driver, read through its target file
        target_file, exposition, ray_targets = None, None, []
        deadline = time.time() + 300
        while exposition is None and time.time() < deadline and train.poll() is None:
            target_file = next(Path("/tmp/prorl/prometheus").glob(f"{name}-*.prorl.json"), None)
            if target_file is not None:
                address = json.loads(target_file.read_text())[0]["targets"][0]
                ray_targets = json.loads(target_file.with_name(target_file.name.replace(".prorl.", ".ray."))
                                         .read_text())[0]["targets"]
                body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
                if "prorl_supervisor_validation_accuracy{" in body and "prorl_supervisor_step{" in body:
                    exposition = body
            time.sleep(0.5)
        out, _ = train.communicate(timeout=600)
        assert train.returncode == 0, out[-5000:]
        assert exposition is not None, "never read the exporter during the run\n" + out[-3000:]
        fams = list(text_string_to_metric_families(exposition))
        assert {f.name + ("_total" if f.type == "counter" else "") for f in fams} == metric_names()
        assert not target_file.exists() and not list(Path("/tmp/prorl/prometheus").glob(f"{name}-*.ray.json"))
        t1 = time.time()

        # every dashboard query, annotation and variable, every alert expression: data from this run
        steps = prom.range(f'prorl_supervisor_step{{run="{name}"}}', t0, t1)
        assert steps and max(float(v) for _, v in steps[0]["values"]) == 36
        tasks = prom.get("/api/v1/label/task/values", **{"match[]": f'prorl_verifier_task_reward{{run="{name}"}}'})
        assert tasks, "no task label"
        empty = []
        for dname, d in _dashboards().items():
            for v in d["templating"]["list"]:
                if v["type"] == "query":   # label_values(selector, label)
                    sel, label = re.fullmatch(r"label_values\((.*), (\w+)\)", v["query"]["query"]).groups()
                    values = prom.get(f"/api/v1/label/{label}/values",
                                      **{"match[]": sel.replace("$run", name)}, start=t0, end=t1)
                    if not values or (label == "run" and name not in values):
                        empty.append(f"{dname} variable {v['name']}")
            for where, expr in _queries(d):
                for task in (tasks if "$task" in expr else tasks[:1]):
                    e = (expr.replace("$run", name).replace("$task", task).replace("$__rate_interval", "30s")
                         .replace("$__interval", "10s"))
                    if not prom.range(e, t0, t1):
                        empty.append(f"{dname} {where}: {e}")
        for rule in _alert_rules():
            if not prom.range(_with_bool(rule["expr"]), t0, t1):
                empty.append(f"alert {rule['alert']}: {_with_bool(rule['expr'])}")
        # every catalogued series was filled by this run, with a finite value at least once (the
        # exporter declares every family even when nothing fills it, so the names alone prove nothing)
        for metric in sorted(metric_names() - set(MAY_STAY_EMPTY)):
            got = prom.range(f'{metric}{{run="{name}"}}', t0, t1)
            if not any(math.isfinite(float(v)) for r in got for _, v in r["values"]):
                empty.append(f"series {metric}: no finite sample")
        # on failure (only then is the message built), when Prometheus saw the reset counter, in seconds
        # after t0: a run that did all its resets between two scrapes leaves the annotation nothing to mark
        resets_seen = f'prorl_supervisor_reference_resets_total{{run="{name}"}}[10m]'
        assert not empty, "queries without data:\n" + "\n".join(empty) + "\nreset counter samples: " + str(
            [[(round(float(t) - t0), v) for t, v in r["values"]]
             for r in prom.get("/api/v1/query", query=resets_seen, time=t1)["result"]])
        # the server loaded the rules and evaluates them without errors
        loaded = [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]
        assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in _alert_rules())
        assert all(r["health"] == "ok" for r in loaded), loaded
        # Ray's own metrics were scraped from the run's Ray node
        assert len(ray_targets) == 1
        up = prom.range(f'up{{job="ray", instance="{ray_targets[0]}"}} == 1', t0, t1)
        assert up, f"the run's Ray node {ray_targets[0]} was never scraped"
        assert prom.range(f'ray_cluster_active_nodes{{instance="{ray_targets[0]}"}}', t0, t1)
        resets = prom.range(f'prorl_supervisor_reference_resets_total{{run="{name}",reason="scheduled"}}', t0, t1)
        assert max(float(v) for _, v in resets[0]["values"]) >= 1
    finally:
        monitor.send_signal(signal.SIGTERM)
        rest = monitor.communicate(timeout=60)[0]
    assert monitor.returncode == 0, rest
    assert (tmp_path / "runs" / ".prometheus").is_dir()
    r = subprocess.run(["pgrep", "-f", f"web.listen-address=127.0.0.1:{port}"], capture_output=True)
    assert r.returncode == 1, "prometheus still running after prorl monitor stopped"
    run_dir = tmp_path / "runs" / name
    assert (run_dir / "curves.png").stat().st_size > 10_000 and (run_dir / "throughput.png").stat().st_size > 10_000


def test_monitor_without_prometheus_says_how_to_install(monkeypatch, capsys):
    from types import SimpleNamespace

    from prorl_actors import monitor
    monkeypatch.setattr(monitor, "find_prometheus", lambda: None)
    assert monitor.cmd_monitor(SimpleNamespace(run=None, port=0, retention="1d", config=None)) == 2
    assert "apt-get install prometheus" in capsys.readouterr().err
