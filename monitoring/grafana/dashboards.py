"""The Grafana dashboards of prorl-actors, built from this file.

    python monitoring/grafana/dashboards.py           # writes dashboards/*.json
    python monitoring/grafana/dashboards.py --check   # exit 1 if the JSON files differ (tests run it)

Two dashboards: `prorl-overview` (entropy with its target band, reward per task, KL and its
coefficient, clipping, dynamic sampling, throughput and time per phase, actor health, with
reference resets as annotations) and `prorl-tasks` (one row per task: training and held-out
accuracy, pass@k, entropy, verifier failures). Queries use the variables `$run` and `$task`;
tests run every one of them against a real Prometheus scraping a real run. Plain Python,
no dependency: a panel is a dict, written once here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
R = 'run="$run"'   # every prorl series has the run's name as label


def q(expr: str, legend: str = "") -> dict:
    return {"expr": expr, "legendFormat": legend}


def panel(title: str, targets: list[dict], *, w: int = 12, h: int = 8, unit: str = "short", kind: str = "timeseries",
          description: str = "", right: tuple[str, ...] = (), log: bool = False, stack: bool = False,
          fill_between: tuple[str, str] | None = None, min_: float | None = None, max_: float | None = None,
          units: dict[str, str] | None = None) -> dict:
    """A panel; right: legends drawn on a right axis; fill_between: (upper, lower) legends whose
    gap is shaded (the entropy band); units: legend -> unit where it differs from `unit`."""
    custom = {"lineWidth": 2, "fillOpacity": 10 if stack else 0, "showPoints": "auto", "spanNulls": True}
    if log:
        custom["scaleDistribution"] = {"type": "log", "log": 10}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults = {"unit": unit, "custom": custom} if kind == "timeseries" else {"unit": unit}
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    overrides = [{"matcher": {"id": "byName", "options": name},
                  "properties": [{"id": "custom.axisPlacement", "value": "right"}]} for name in right]
    overrides += [{"matcher": {"id": "byName", "options": name}, "properties": [{"id": "unit", "value": u}]}
                  for name, u in (units or {}).items()]
    if fill_between:
        upper, lower = fill_between
        overrides += [{"matcher": {"id": "byName", "options": upper},
                       "properties": [{"id": "custom.fillBelowTo", "value": lower},
                                      {"id": "custom.fillOpacity", "value": 15},
                                      {"id": "custom.lineWidth", "value": 0},
                                      {"id": "color", "value": {"mode": "fixed", "fixedColor": "green"}}]},
                      {"matcher": {"id": "byName", "options": lower},
                       "properties": [{"id": "custom.lineWidth", "value": 0},
                                      {"id": "color", "value": {"mode": "fixed", "fixedColor": "green"}}]}]
    p = {"type": kind, "title": title, "description": description, "datasource": DS,
         "gridPos": {"w": w, "h": h},
         "targets": [{"datasource": DS, "refId": chr(ord("A") + i), **t} for i, t in enumerate(targets)],
         "fieldConfig": {"defaults": defaults, "overrides": overrides}}
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "none"}}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "value_and_name"}
    return p


def row(title: str, repeat: str | None = None) -> dict:
    r = {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}
    if repeat:
        r["repeat"] = repeat
    return r


def layout(panels: list[dict]) -> list[dict]:
    """Left to right, top to bottom, on Grafana's 24-column grid; ids in order."""
    x = y = line_h = 0
    for i, p in enumerate(panels, start=1):
        g = p["gridPos"]
        if p["type"] == "row" or x + g["w"] > 24:
            x, y, line_h = 0, y + line_h, 0
        g["x"], g["y"] = x, y
        p["id"] = i
        x, line_h = x + g["w"], max(line_h, g["h"])
        if p["type"] == "row":
            x, y, line_h = 0, y + g["h"], 0
    return panels


def variables(*extra: dict) -> dict:
    return {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "options": [], "regex": ""},
        {"name": "run", "label": "run", "type": "query", "datasource": DS,
         "query": {"query": "label_values(prorl_supervisor_num_steps, run)", "refId": "run"},
         "definition": "label_values(prorl_supervisor_num_steps, run)", "refresh": 2, "sort": 1,
         "multi": False, "includeAll": False, "current": {}, "options": [], "hide": 0, "regex": ""},
        *extra]}


# $__rate_interval (at least 4 scrapes), not $__interval: zoomed in, $__interval falls to the
# scrape interval, a window that holds one sample and so never sees the counter change; a missed
# scrape would lose the reset the same way. A reset shows as a region of about 20 s.
RESETS = {"name": "reference resets", "datasource": DS, "enable": True, "iconColor": "green",
          "expr": f"changes(prorl_supervisor_reference_resets_total{{{R}}}[$__rate_interval]) > 0",
          "titleFormat": "reference reset ({{reason}})", "tagKeys": "reason", "textFormat": "",
          "useValueForTime": False, "step": "$__interval"}
BUILTIN = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
           "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}


def dashboard(uid: str, title: str, description: str, panels: list[dict], templating: dict) -> dict:
    return {"uid": uid, "title": title, "description": description, "tags": ["prorl"], "editable": True,
            "schemaVersion": 39, "version": 1, "timezone": "browser", "refresh": "10s", "graphTooltip": 1,
            "time": {"from": "now-6h", "to": "now"}, "templating": templating,
            "annotations": {"list": [BUILTIN, RESETS]}, "links": [], "panels": layout(panels)}


def overview() -> dict:
    panels = [
        row("Learning"),
        panel("Entropy and its target band", [
            q(f"prorl_learner_entropy{{{R}}}", "entropy (trained tokens)"),
            q(f"prorl_supervisor_entropy_signal{{{R}}}", "entropy the controller holds"),
            q(f"prorl_supervisor_entropy_target{{{R}}} + prorl_supervisor_entropy_band{{{R}}}", "band high"),
            q(f"prorl_supervisor_entropy_target{{{R}}} - prorl_supervisor_entropy_band{{{R}}}", "band low")],
            fill_between=("band high", "band low"), unit="none",
            description="Policy entropy (nats/token). With supervisor.kl.mode entropy-target the KL "
                        "coefficient holds it in the shaded band; green marks: reference resets."),
        panel("Reward per task", [
            q(f"prorl_verifier_task_reward{{{R}}}", "{{task}}"),
            q(f"prorl_verifier_reward_mean{{{R}}}", "all tasks"),
            q(f"prorl_supervisor_shaped_reward_mean{{{R}}}", "trained on (shaped)"),
            q(f"prorl_supervisor_length_penalty_on{{{R}}}", "length penalty on")], unit="none",
            description="Mean reward of each step's rollouts (every generation round of dynamic sampling); "
                        "with algorithm.reward_shaping, the shaped reward trained on and whether the "
                        "scheduled length penalty applied (1)."),
        panel("KL to the reference and its coefficient", [
            q(f"prorl_learner_kl{{{R}}}", "KL"),
            q(f"prorl_learner_kl_coef{{{R}}}", "KL coefficient")], right=("KL coefficient",), log=True,
            description="KL (per token) of the policy to the reference (log scale); it drops to ~0 at each "
                        "reset, which the log axis leaves out."),
        panel("Held-out accuracy per task", [
            q(f"prorl_supervisor_validation_task_accuracy{{{R}}}", "{{task}}"),
            q(f"prorl_supervisor_validation_accuracy{{{R}}}", "training tasks")], unit="percentunit",
            min_=0, max_=1, description="Validation: pass@1 averaged over the samples, at validation.* settings."),
        panel("Clipped tokens", [
            q(f"prorl_learner_clip_frac_low{{{R}}}", "clipped low (1 - eps_low)"),
            q(f"prorl_learner_clip_frac_high{{{R}}}", "clipped high (1 + eps_high)"),
            q(f"prorl_learner_kl_capped_frac{{{R}}}", "k3 KL capped")], w=8, unit="percentunit",
            description="DAPO's decoupled clipping: the share of tokens at each bound (non-zero from the second "
                        "mini-batch of a step on), and the share whose k3 KL value hit algorithm.k3_cap."),
        panel("Dynamic sampling", [
            q(f"prorl_supervisor_kept_groups_frac{{{R}}}", "groups kept"),
            q(f"prorl_supervisor_keep_rate{{{R}}}", "keep rate (running)"),
            q(f"prorl_supervisor_gen_rounds{{{R}}}", "generation rounds"),
            q(f"prorl_supervisor_surplus_groups{{{R}}}", "surplus groups"),
            q(f"prorl_supervisor_carried_groups{{{R}}}", "carried groups")], w=8, unit="percentunit",
            right=("generation rounds", "surplus groups", "carried groups"),
            units={"generation rounds": "none", "surplus groups": "none", "carried groups": "none"},
            description="Groups whose rewards are not all equal, the running keep rate that sizes each round, "
                        "the rounds needed to fill the batch, the informative groups generated beyond it, and "
                        "those of them the next batch began with (within the staleness bound)."),
        panel("Responses", [
            q(f"prorl_generator_response_length_tokens{{{R}}}", "mean length (tokens)"),
            q(f"prorl_generator_truncated_frac{{{R}}}", "truncated")], w=8, right=("truncated",),
            units={"truncated": "percentunit"}),
        row("Throughput"),
        panel("Tokens per second", [
            q(f"prorl_generator_tokens_per_second{{{R}}}", "generated"),
            q(f"prorl_learner_tokens_per_second{{{R}}}", "trained"),
            q(f"prorl_learner_pad_frac{{{R}}}", "learner padding share")], w=8, unit="none",
            right=("learner padding share",), units={"learner padding share": "percentunit"},
            description="Generated and trained tokens per second; the share of the positions the learner "
                        "computed that were padding (learner.max_tokens_per_micro_batch keeps it low)."),
        panel("Time per phase", [q(f'prorl_supervisor_phase_seconds{{{R}, phase!~"generate|verify"}}', "{{phase}}"),
                                 q(f'sum(prorl_supervisor_phase_seconds{{{R}, phase=~"generate|verify"}})',
                                   "generate + verify (the batch's own)")], w=8, unit="s", stack=True,
              description="Where each step's time goes (stacked: the step time): waiting for its batch, the "
                          "reference, the update, the weights. The batch's own generation and verification "
                          "overlap the previous steps when supervisor.max_staleness > 0."),
        panel("Progress", [
            q(f"prorl_supervisor_step{{{R}}}", "step"),
            q(f"prorl_supervisor_num_steps{{{R}}}", "of"),
            q(f"prorl_learner_policy_version{{{R}}}", "policy version"),
            q(f"prorl_supervisor_last_checkpoint_step{{{R}}}", "last checkpoint"),
            q(f"sum(prorl_supervisor_reference_resets_total{{{R}}})", "reference resets"),
            q(f"time() - prorl_supervisor_last_progress_timestamp_seconds{{{R}}}", "since last step (s)")],
            w=8, kind="stat"),
        row("Pipeline"),
        panel("Staleness", [
            q(f"prorl_supervisor_staleness_mean{{{R}}}", "mean"),
            q(f"prorl_supervisor_staleness_max{{{R}}}", "max"),
            q(f"prorl_supervisor_max_staleness{{{R}}}", "bound"),
            q(f"prorl_supervisor_buffered_batches{{{R}}}", "batches made ahead"),
            q(f"prorl_supervisor_version_span_max{{{R}}}", "versions within one response"),
            q(f"increase(prorl_generator_in_flight_updates_total{{{R}}}[$__rate_interval])", "in-flight updates")],
            w=8, unit="none",
            description="Policy versions between the weights that sampled the trained rows (their oldest token) "
                        "and the learner's (never above supervisor.max_staleness), the batches waiting for the "
                        "learner, and with generator.in_flight_updates the newer weights taken between decoding "
                        "pieces and the most versions one response's tokens spanned."),
        panel("Who waits for whom", [
            q(f"prorl_generator_idle_frac{{{R}}}", "generators idle"),
            q(f"prorl_generator_bound_wait_frac{{{R}}}", "next batch held by the bound"),
            q(f"prorl_learner_idle_frac{{{R}}}", "learner idle"),
            q(f"prorl_learner_wait_frac{{{R}}}", "step waiting for its batch")], w=8, unit="percentunit",
            min_=0, max_=1,
            description="Generators idle because the learner has not made the weights the next batch needs: "
                        "the learner is the bottleneck (raise max_staleness or give it more GPUs). The step "
                        "waiting for its batch: generation is (more generators)."),
        panel("Sampler vs learner", [
            q(f"prorl_learner_logp_mismatch_k3{{{R}}}", "KL(sampler || learner), k3"),
            q(f"prorl_learner_logp_gap_over_log2_frac{{{R}}}", "tokens > 2x apart"),
            q(f"prorl_learner_is_weight_mean{{{R}}}", "mean correction weight"),
            q(f"prorl_learner_is_masked_frac{{{R}}}", "tokens masked by the correction"),
            q(f"prorl_learner_logp_gap_max{{{R}}}", "largest |log ratio|")], w=8, unit="none", log=False,
            right=("mean correction weight", "largest |log ratio|"),
            description="How far the generator's token probabilities are from the learner's (other kernels, "
                        "and older weights when max_staleness > 0), and what the off-policy correction "
                        "(algorithm.off_policy_correction) does about it."),
        row("Health"),
        panel("Actor restarts", [
            q(f"increase(prorl_supervisor_actor_restarts_total{{{R}}}[$__rate_interval])", "{{role}}"),
            q(f"increase(prorl_supervisor_rollbacks_total{{{R}}}[$__rate_interval])", "learner rollbacks"),
            q(f"increase(prorl_supervisor_resumes_total{{{R}}}[$__rate_interval])", "driver resumes")], w=8,
            description="Actors replaced after dying (generators and verifiers inside a step, the reference "
                        "by rebuilding it, the learner by a rollback to the last checkpoint)."),
        panel("Failures", [
            q(f"increase(prorl_learner_skipped_updates_total{{{R}}}[$__rate_interval])", "non-finite updates"),
            q(f"sum(increase(prorl_verifier_errors_total{{{R}}}[$__rate_interval]))", "verifier errors"),
            q(f"sum(increase(prorl_verifier_timeouts_total{{{R}}}[$__rate_interval]))", "verifier timeouts"),
            q(f"increase(prorl_supervisor_item_rejects_total{{{R}}}[$__rate_interval])", "rows rejected ({{split}})")],
            w=8, description="Each is counted, never fatal: a verifier that throws scores 0, a non-finite loss "
                             "skips its update, a malformed row is left out."),
        panel("Targets up", [
            q('up{job="prorl"}', "exporter {{instance}}"),
            q(f'sum(up{{job="ray", {R}}})', "Ray metrics endpoints up"),
            q(f"max(ray_cluster_active_nodes{{{R}}})", "Ray nodes")], w=8,
            description="The run's exporter and Ray's own metrics (nodes, actors, object store)."),
    ]
    return dashboard("prorl-overview", "prorl-actors: run overview",
                     "One ProRL run: entropy, reward, KL, throughput and health.", panels, variables())


def tasks() -> dict:
    T = 'run="$run", task="$task"'
    task_var = {"name": "task", "label": "task", "type": "query", "datasource": DS,
                "query": {"query": 'label_values(prorl_supervisor_validation_task_accuracy{run="$run"}, task)',
                          "refId": "task"},
                "definition": 'label_values(prorl_supervisor_validation_task_accuracy{run="$run"}, task)',
                "refresh": 2, "sort": 1, "multi": True, "includeAll": True, "current": {}, "options": [], "hide": 0,
                "regex": ""}
    panels = [
        row("$task", repeat="task"),
        panel("Training reward and accuracy", [
            q(f"prorl_verifier_task_reward{{{T}}}", "reward"),
            q(f"prorl_verifier_task_accuracy{{{T}}}", "accuracy")], w=6, unit="percentunit", min_=0, max_=1),
        panel("Held-out accuracy, solved at least once", [
            q(f"prorl_supervisor_validation_task_accuracy{{{T}}}", "accuracy"),
            q(f"prorl_supervisor_validation_task_solved_frac{{{T}}}", "solved at least once")], w=6,
            unit="percentunit", min_=0, max_=1),
        panel("Held-out pass@k", [q(f"prorl_supervisor_validation_task_pass_at_k{{{T}}}", "pass@{{k}}")], w=4,
              unit="percentunit", min_=0, max_=1),
        panel("Entropy", [q(f"prorl_learner_task_entropy{{{T}}}", "entropy")], w=4, unit="none"),
        panel("Verifier failures", [
            q(f"increase(prorl_verifier_errors_total{{{T}}}[$__rate_interval])", "errors"),
            q(f"increase(prorl_verifier_timeouts_total{{{T}}}[$__rate_interval])", "timeouts")], w=4),
    ]
    return dashboard("prorl-tasks", "prorl-actors: per task",
                     "Each task of a run: training reward, held-out accuracy and pass@k, entropy, verifier "
                     "failures.", panels, variables(task_var))


DASHBOARDS = {"prorl-overview.json": overview, "prorl-tasks.json": tasks}


def render(build) -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    OUT.mkdir(exist_ok=True)
    for name, build in DASHBOARDS.items():
        path, text = OUT / name, render(build)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python {Path(__file__).as_posix()}): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
