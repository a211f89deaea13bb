"""Prometheus exporter, alert rules, Grafana dashboards and `prorl monitor`.

The unit tests feed the exporter hand-written records and check the figures a scrape returns.
The integration test with a real Prometheus is tests/test_prometheus_live.py.
"""
import json
import math
import os
import re
import shutil
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

from prorl_actors.config import load_spec
from prorl_actors.events import Event
from prorl_actors.exporter import Exporter, RunFigures, families, metric_names
from prorl_actors.metrics import RunRecords
from prorl_actors.spec import PrometheusSpec, SpecError

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
    events = [{"event": "reference_reset", "step": 3, "trigger": "scheduled", "reason": "scheduled"},
              {"event": "reference_reset", "step": 6, "trigger": "scheduled",
               "reason": "scheduled; after waiting 2 steps for entropy"},
              {"event": "reference_reset", "step": 9, "trigger": "kl", "reason": "KL above 0.1 for 3 steps"},
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


def test_a_reset_is_counted_under_its_trigger_field_never_its_text():
    """The trigger is a field of the event; the reason is text for people and is not read."""
    events = [{"event": "reference_reset", "step": 3, "trigger": "validation", "reason": "scheduled, said a person"},
              {"event": "reference_reset", "step": 4, "reason": "kl"}]     # recorded before the field existed
    m = _scrape(events=events, reset_reasons=("scheduled", "kl", "validation"))
    resets = {dict(k[1])["reason"]: v for k, v in m.items() if k[0] == "prorl_supervisor_reference_resets_total"}
    assert resets == {"scheduled": 0, "kl": 0, "validation": 1, "unrecorded": 1}


def test_exposition_parses_and_names_follow_the_convention(tmp_path):
    x = Exporter("r", 10, PrometheusSpec(targets_dir=str(tmp_path)), reset_reasons=("scheduled",))
    x.load([_step(1), _step(2, **{"reward/code": 0.2})],
           [{"step": 0, "accuracy": 0.5, "accuracy/math": 0.5, "pass@4/math": 0.7}],
           [{"event": "reference_reset", "step": 2, "trigger": "scheduled", "reason": "scheduled"}])
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


def test_records_count_the_runs_life_across_drivers_and_refuse_unknown_kinds(tmp_path):
    """The run's life events are counted by the records as they are written, and over every
    driver (a new RunRecords on the same directory starts from the counts on disk); a rollback
    leaves them (they are never moved aside); an event kind that is not an Event is refused."""
    rec = RunRecords(tmp_path / "run")
    rec.event(Event.ACTOR_RESTARTED, 1, role="verifier")
    rec.event(Event.ACTOR_RESTARTED, 2, role="generator")
    rec.event("actor_restarted", 3, role="verifier")
    rec.event(Event.ROLLED_BACK, 3, to_step=1)
    rec.event(Event.REFERENCE_RESET, 2, trigger="scheduled", reason="scheduled")   # not a life event
    assert rec.life_count(Event.ACTOR_RESTARTED, role="verifier") == 2
    assert rec.life_count(Event.ACTOR_RESTARTED) == 3 and rec.life_count(Event.ROLLED_BACK) == 1
    rec.roll_back_to(1)
    rec.close()
    again = RunRecords(tmp_path / "run")     # the next driver
    again.event(Event.RUN_RESUMED, 1)
    assert again.life_count(Event.ACTOR_RESTARTED, role="verifier") == 2 and again.life_count(Event.RUN_RESUMED) == 1
    with pytest.raises(ValueError, match="not counted"):
        again.life_count(Event.REFERENCE_RESET)
    with pytest.raises(ValueError, match="reference_rest"):
        again.event("reference_rest", 2)
    again.close()


def test_records_feed_the_exporter_and_a_rollback_takes_counters_back(tmp_path):
    x = Exporter("r", 10, PrometheusSpec(targets_dir=str(tmp_path)), reset_reasons=("scheduled",))
    rec = RunRecords(tmp_path / "run", sinks=[x])
    for s in (1, 2, 3):
        rec.metrics.write(_step(s, entropy=math.nan if s == 3 else 0.5))
    rec.event("reference_reset", 3, trigger="scheduled", reason="scheduled")
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
