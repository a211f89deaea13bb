"""Prometheus exporter, alert rules, Grafana dashboards and `prorl monitor`.

The unit tests feed the exporter hand-written records and check the figures a scrape returns.
The integration test starts a real Prometheus (Debian's package) with the checked-in config
through `prorl monitor`, lets it scrape a real short training, and runs every dashboard query,
every template variable query and every alert expression against it.
"""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from prorl_actors.algo.resets import trigger_of
from prorl_actors.exporter import Exporter, RunFigures, families, metric_names
from prorl_actors.metrics import RunRecords
from prorl_actors.spec import PrometheusSpec, SpecError, load_spec

MON = Path(__file__).resolve().parents[1] / "monitoring"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="no promtool: Debian's `prometheus` package is not "
                                                             "installed (make test installs it as root with apt)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary: Debian's `prometheus` "
                                                                 "package is not installed (make test installs it "
                                                                 "as root with apt)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(step, **kw):
    rec = {"step": step, "time": 1000.0 + step, "reward_mean": 0.5, "accuracy": 0.25, "entropy": 0.8, "kl": 0.01,
           "kl_coef": 1e-3, "skipped_updates": 0, "optimizer_steps": 2, "trained_tokens": 100, "gen_tokens": 400,
           "reward/math": 0.5, "verify_errors/math": 0, "verify_timeouts/math": 0, "time/generate_s": 1.0}
    rec.update(kw)
    return rec


def _scrape(figures=None, steps=(), validations=(), events=(), **kw) -> dict:
    """The families of a run's records -> {(name, labels without run): value} (counters under
    their _total name)."""
    figures = figures or RunFigures.from_records(steps, validations, events, **kw)
    out = {}
    for fam in families("r", 10, 500.0, figures):
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if k != "run"}
            assert s.labels["run"] == "r"
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


# ---------------------------------------------------------------------------- the exporter
def test_gauges_hold_the_last_measured_value_and_counters_sum_the_run():
    steps = [_step(1, entropy=0.9, skipped_updates=1, **{"verify_errors/math": 2}),
             _step(2, entropy=math.nan, kl=None, gen_tokens=600, **{"reward/code": 0.1, "verify_errors/code": 1}),
             _step(3, entropy=0.7, reward_mean=math.nan, **{"reward/math": 0.75})]
    m = _scrape(steps=steps)
    assert m[("prorl_supervisor_step", ())] == 3
    assert m[("prorl_learner_entropy", ())] == 0.7
    assert m[("prorl_learner_kl", ())] == 0.01                       # step 3 measured it again
    assert math.isnan(m[("prorl_verifier_reward_mean", ())])         # a NaN reward is news, not "not measured"
    assert m[("prorl_verifier_task_reward", (("task", "math"),))] == 0.75
    assert m[("prorl_verifier_task_reward", (("task", "code"),))] == 0.1   # its last step that had the task
    assert m[("prorl_learner_skipped_updates_total", ())] == 1
    assert m[("prorl_generator_tokens_total", ())] == 400 + 600 + 400
    assert m[("prorl_learner_trained_tokens_total", ())] == 300
    assert m[("prorl_verifier_errors_total", (("task", "math"),))] == 2
    assert m[("prorl_verifier_errors_total", (("task", "code"),))] == 1
    assert m[("prorl_supervisor_phase_seconds", (("phase", "generate"),))] == 1.0
    m = _scrape(steps=[_step(1, entropy=math.nan)])
    assert ("prorl_learner_entropy", ()) not in m                     # never measured: no sample


def test_validation_gauges_and_pass_at_k_labels():
    vals = [{"step": 0, "accuracy": 0.1, "accuracy/math": 0.1, "pass@1/math": 0.1, "pass@8/math": 0.4},
            {"step": 4, "accuracy": 0.3, "accuracy/math": 0.3, "pass@1/math": 0.3, "pass@2/math": 0.35,
             "pass@8/math": 0.6, "solved_frac/math": 0.6}]
    m = _scrape(validations=vals)
    assert m[("prorl_supervisor_validation_accuracy", ())] == 0.3
    assert m[("prorl_supervisor_validation_step", ())] == 4
    assert m[("prorl_supervisor_validation_task_pass_at_k", (("k", "8"), ("task", "math")))] == 0.6
    assert m[("prorl_supervisor_validation_task_pass_at_k", (("k", "2"), ("task", "math")))] == 0.35
    assert m[("prorl_supervisor_validation_task_solved_frac", (("task", "math"),))] == 0.6


def test_event_counters_start_at_zero_and_count_resets_by_trigger():
    events = [{"event": "reference_reset", "step": 3, "reason": "scheduled"},
              {"event": "reference_reset", "step": 6, "reason": "scheduled; after waiting 2 steps for entropy"},
              {"event": "reference_reset", "step": 9, "reason": "KL above 0.1 for 3 steps"},
              {"event": "actor_restarted", "step": 4, "role": "generator"},
              {"event": "rolled_back", "step": 5}, {"event": "item_rejected", "step": 1, "split": "train"},
              {"event": "run_end", "step": 9}]
    m = _scrape(events=events, reset_reasons=("scheduled", "kl", "validation"))
    resets = {dict(k[1])["reason"]: v for k, v in m.items() if k[0] == "prorl_supervisor_reference_resets_total"}
    assert resets == {"scheduled": 2, "kl": 1, "validation": 0}
    restarts = {dict(k[1])["role"]: v for k, v in m.items() if k[0] == "prorl_supervisor_actor_restarts_total"}
    assert restarts == {"generator": 1, "verifier": 0, "learner": 0, "reference": 0}
    assert m[("prorl_supervisor_rollbacks_total", ())] == 1 and m[("prorl_supervisor_resumes_total", ())] == 0
    assert m[("prorl_supervisor_item_rejects_total", (("split", "train"),))] == 1
    assert m[("prorl_supervisor_item_rejects_total", (("split", "validation"),))] == 0
    assert m[("prorl_supervisor_run_complete", ())] == 1
    assert ("prorl_supervisor_last_checkpoint_step", ()) not in m
    m = _scrape(events=[{"event": "checkpoint", "step": 5}, {"event": "checkpoint", "step": 10}])
    assert m[("prorl_supervisor_last_checkpoint_step", ())] == 10 and m[("prorl_supervisor_checkpoints_total", ())] == 2
    # prolonged after its end (num_steps raised, resumed): running again
    m = _scrape(steps=[_step(9), _step(10)], events=events)
    assert m[("prorl_supervisor_run_complete", ())] == 0


def test_trigger_of_reasons():
    assert trigger_of("scheduled") == "scheduled"
    assert trigger_of("validation stalled for 3 evaluations; after waiting 2 steps for entropy") == "validation"
    assert trigger_of("KL share of the loss above 0.5") == "kl"
    assert trigger_of("by hand") == "by hand"


def test_exposition_parses_and_names_follow_the_convention(tmp_path):
    x = Exporter("r", 10, PrometheusSpec(targets_dir=str(tmp_path)), reset_reasons=("scheduled",))
    x.load([_step(1), _step(2, **{"reward/code": 0.2})],
           [{"step": 0, "accuracy": 0.5, "accuracy/math": 0.5, "pass@4/math": 0.7}],
           [{"event": "reference_reset", "step": 2, "reason": "scheduled"}])
    text = x.scrape()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    # the OpenMetrics format too (what Prometheus negotiates when it can)
    from prometheus_client.openmetrics.exposition import generate_latest as om_latest
    assert {f.name for f in parse_openmetrics(om_latest(x.registry).decode())} == set(fams)
    exposed = {f.name + ("_total" if f.type == "counter" else "") for f in fams.values()}
    assert exposed == metric_names()
    for f in fams.values():
        assert re.fullmatch(r"prorl_(supervisor|learner|generator|verifier|reference)_[a-z0-9_]+", f.name), f.name
        assert f.documentation, f.name
        for s in f.samples:
            assert s.labels["run"] == "r"
    assert fams["prorl_supervisor_reference_resets"].type == "counter"
    assert fams["prorl_learner_entropy"].type == "gauge"


def test_http_server_target_files_and_shutdown(tmp_path):
    x = Exporter("r", 10, PrometheusSpec(targets_dir=str(tmp_path / "t")))
    x.observe("metrics", _step(1))
    address = x.start(ray_targets=["127.0.0.1:1234"])
    assert address.startswith("127.0.0.1:") and x.port > 0
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    assert any(f.name == "prorl_supervisor_step" for f in text_string_to_metric_families(body))
    prorl_file = tmp_path / "t" / f"r-{os.getpid()}.prorl.json"
    assert json.loads(prorl_file.read_text()) == [{"targets": [address], "labels": {}}]
    ray_file = tmp_path / "t" / f"r-{os.getpid()}.ray.json"
    assert json.loads(ray_file.read_text()) == [{"targets": ["127.0.0.1:1234"], "labels": {"run": "r"}}]
    x.set_ray_targets(["127.0.0.1:1234", "127.0.0.2:1234"])          # a node joined
    assert json.loads(ray_file.read_text())[0]["targets"] == ["127.0.0.1:1234", "127.0.0.2:1234"]
    x.observe("metrics", _step(2))
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    assert "prorl_supervisor_step{run=\"r\"} 2.0" in body
    x.close()
    assert not prorl_file.exists() and not ray_file.exists()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{address}/metrics", timeout=2)


def test_crashed_drivers_leave_their_targets_until_the_run_starts_again(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    dead = "999999999"   # above pid_max: no such process
    for name in (f"r-{dead}.prorl.json", f"r-{dead}.ray.json", f"rr-{dead}.prorl.json", f"r-{os.getpid()}.ray.json"):
        (d / name).write_text("[]")
    x = Exporter("r", 10, PrometheusSpec(targets_dir=str(d)))
    x.start()
    # this run's dead driver's files are gone; another run's, and a live process's, stay
    assert sorted(p.name for p in d.iterdir()) == sorted([f"rr-{dead}.prorl.json", f"r-{os.getpid()}.ray.json",
                                                          f"r-{os.getpid()}.prorl.json"])
    x.close(forget=False)    # a crash: the target stays, and Prometheus sees it down
    assert (d / f"r-{os.getpid()}.prorl.json").exists()


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        x = Exporter("r", 10, PrometheusSpec(port=s.getsockname()[1], targets_dir=str(tmp_path)))
        with pytest.raises(RuntimeError, match="metrics.prometheus: cannot listen on 127.0.0.1"):
            x.start()
    assert not list(tmp_path.iterdir())


def test_records_feed_the_exporter_and_a_rollback_takes_counters_back(tmp_path):
    x = Exporter("r", 10, PrometheusSpec(targets_dir=str(tmp_path)), reset_reasons=("scheduled",))
    rec = RunRecords(tmp_path / "run", sinks=[x])
    for s in (1, 2, 3):
        rec.metrics.write(_step(s, entropy=math.nan if s == 3 else 0.5))
    rec.event("reference_reset", 3, reason="scheduled")
    rec.event("actor_restarted", 3, role="verifier", seconds=1.0)
    m = _scrape(x.figures)
    assert m[("prorl_supervisor_step", ())] == 3 and m[("prorl_learner_optimizer_steps_total", ())] == 6
    assert m[("prorl_learner_entropy", ())] == 0.5
    rec.roll_back_to(1)                 # a resume or rollback: the exporter reads the files again
    m = _scrape(x.figures)
    assert m[("prorl_supervisor_step", ())] == 1                              # gauges: the records that stand
    # counters never go down (Prometheus would count a whole new total): the undone steps count
    assert m[("prorl_learner_optimizer_steps_total", ())] == 6
    assert m[("prorl_supervisor_reference_resets_total", (("reason", "scheduled"),))] == 1
    assert m[("prorl_supervisor_actor_restarts_total", (("role", "verifier"),))] == 1
    rec.metrics.write(_step(2))                                              # the step done again
    m = _scrape(x.figures)
    assert m[("prorl_supervisor_step", ())] == 2 and m[("prorl_learner_optimizer_steps_total", ())] == 8
    rec.close()
    # a resumed driver (a new process) folds the same totals from the files
    x2 = Exporter("r", 10, PrometheusSpec(targets_dir=str(tmp_path)), reset_reasons=("scheduled",))
    RunRecords(tmp_path / "run", sinks=[x2]).close()
    assert _scrape(x2.figures) == _scrape(x.figures)


def test_progress_and_errors_are_counted_not_fatal(tmp_path):
    logged = []
    x = Exporter("r", 10, PrometheusSpec(targets_dir=str(tmp_path)), log=logged.append)
    t0 = x.last_progress
    time.sleep(0.01)
    x.observe("events", {"event": "actor_died", "step": 0, "time": 0})   # not progress
    assert x.last_progress == t0
    x.observe("validation", {"step": 0, "accuracy": 0.5})
    assert x.last_progress > t0
    x.observe("metrics", {"no": "step"})                                # cannot be folded: counted, logged
    fams = {f.name: f for f in text_string_to_metric_families(x.scrape())}
    assert fams["prorl_supervisor_exporter_errors"].samples[0].value == 1
    assert "could not export a metrics record" in logged[0]


def test_prometheus_spec_is_checked():
    with pytest.raises(SpecError) as e:
        load_spec("specs/tiny-cpu.yaml", ["metrics.prometheus.port=70000", "metrics.prometheus.linger_s=-1",
                                          "metrics.prometheus.adress=0.0.0.0"])
    msg = str(e.value)
    assert "metrics.prometheus.port" in msg and "metrics.prometheus.linger_s" in msg
    assert "metrics.prometheus.adress" in msg


# ---------------------------------------------------------------------------- checked-in files
def _alert_rules() -> list[dict]:
    """Every rule of monitoring/prometheus/alerts.yml, as written."""
    return [r for g in yaml.safe_load((MON / "prometheus" / "alerts.yml").read_text())["groups"] for r in g["rules"]]


@needs_promtool
def test_promtool_checks_config_and_rules():
    r = subprocess.run([PROMTOOL, "check", "config", str(MON / "prometheus" / "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([PROMTOOL, "check", "rules", str(MON / "prometheus" / "alerts.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and f"SUCCESS: {len(_alert_rules())} rules found" in r.stdout, r.stdout + r.stderr


@needs_promtool
def test_alerts_fire_on_their_series_and_not_on_a_healthy_run():
    r = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=MON / "prometheus",
                       capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    rules = {r["alert"] for r in _alert_rules()}
    assert len(rules) == len(_alert_rules())        # one rule per alert name
    tested = set(re.findall(r"alertname: (\w+)", (MON / "prometheus" / "alerts_test.yml").read_text()))
    assert rules == tested
    firing = yaml.safe_load((MON / "prometheus" / "alerts_test.yml").read_text())["tests"][1:]
    assert rules == {t["alertname"] for case in firing for t in case["alert_rule_test"] if t["exp_alerts"]}


def test_dashboards_are_what_the_python_builds():
    r = subprocess.run([sys.executable, str(MON / "grafana" / "dashboards.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def _dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((MON / "grafana" / "dashboards").glob("*.json"))}


def _queries(d: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation of a dashboard."""
    out = [(f"panel {p['title']!r}", t["expr"]) for p in d["panels"] for t in p.get("targets", [])]
    out += [(f"annotation {a['name']!r}", a["expr"]) for a in d["annotations"]["list"] if "expr" in a]
    return out


def test_dashboards_are_well_formed():
    ds = yaml.safe_load((MON / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus" and ds["datasources"][0]["url"] == "http://127.0.0.1:9090"
    prov = yaml.safe_load((MON / "grafana" / "provisioning" / "dashboards" / "prorl.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "$PRORL_GRAFANA_DASHBOARDS"
    dashboards = _dashboards()
    assert set(dashboards) == {"prorl-overview.json", "prorl-tasks.json"}
    known = metric_names() | {"up"}
    for name, d in dashboards.items():
        assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
        variables = {v["name"] for v in d["templating"]["list"]}
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), name
        cells = set()
        for p in d["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (name, p["title"])
            mine = {(g["x"] + i, g["y"] + j) for i in range(g["w"]) for j in range(g["h"])}
            assert not cells & mine, f"{name}: panel {p['title']!r} overlaps another"
            cells |= mine
            if p["type"] != "row":
                assert p["targets"] and p["datasource"]["uid"] == "${datasource}", (name, p["title"])
        for where, expr in _queries(d):
            used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval", "__interval"}
            assert used <= variables, f"{name} {where}: undefined variables {used - variables}"
            for metric in re.findall(r"\b((?:prorl|ray)_[a-z0-9_]+|up)\b", expr):
                assert metric in known or metric.startswith("ray_"), f"{name} {where}: unknown metric {metric}"
    overview = dashboards["prorl-overview.json"]
    titles = " ".join(p["title"] for p in overview["panels"]).lower()
    for topic in ("entropy", "reward per task", "kl", "tokens per second", "restarts"):
        assert topic in titles
    assert any("reference_resets" in a.get("expr", "") for a in overview["annotations"]["list"])
    band = next(p for p in overview["panels"] if p["title"].startswith("Entropy"))
    assert any(pr["id"] == "custom.fillBelowTo" for o in band["fieldConfig"]["overrides"] for pr in o["properties"])


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
