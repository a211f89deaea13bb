"""The run's Prometheus exporter: every per-step figure as `prorl_<role>_<quantity>`.

The run's records (RunRecords) hand the exporter exactly what they write: each step's record,
each validation, each event. RunFigures folds them as they come: gauges hold the latest value
(a figure not measured in a step, NaN, keeps the last measured one, except the reward, where
NaN is the news), counters count everything that happened in the run. At a resume or a
rollback the figures are folded again from the records on disk: gauges from the records that
stand, counters also from the steps done again (rolled_back.jsonl), so no counter ever goes
down (Prometheus would read that as a reset and count the whole total as new). Every series
has the label `run`.

The HTTP server (prometheus-client's) listens on `metrics.prometheus.address:port` (127.0.0.1
and any free port by default) and the exporter writes a file_sd target file for it, and one
for the Ray nodes' own metrics, into `targets_dir`, where monitoring/prometheus/prometheus.yml
looks. A run that ends (complete or stopped by a signal) removes them; a driver that crashes
or is killed leaves them, so Prometheus sees its target down (the ProrlRunDown alert), until
the run's next start clears the files of its dead drivers.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from prorl_actors.events import Event
from prorl_actors.metrics import RECORD_PHASES
from prorl_actors.roles import Role

ROLES = tuple(Role)

# gauges from the last step record: (metric, record key, help)
STEP_GAUGES = (
    ("prorl_supervisor_step", "step", "last completed training step"),
    ("prorl_supervisor_step_seconds", "step_s", "wall time of the last step"),
    ("prorl_supervisor_kept_groups_frac", "kept_groups_frac",
     "share of sampled prompt groups dynamic sampling kept (rewards not all equal)"),
    ("prorl_supervisor_gen_rounds", "gen_rounds", "generation rounds dynamic sampling needed to fill the batch"),
    ("prorl_supervisor_keep_rate", "keep_rate",
     "running share of groups dynamic sampling keeps, which sizes each generation round"),
    ("prorl_supervisor_surplus_groups", "surplus_groups",
     "informative groups beyond the last step's batch (the next step's when the staleness bound allows)"),
    ("prorl_supervisor_carried_groups", "carried_groups",
     "groups of the step before's surplus that the last step's batch began with"),
    ("prorl_supervisor_trained_groups", "trained_groups", "prompt groups trained on in the last step"),
    ("prorl_supervisor_entropy_signal", "entropy_signal", "the entropy the controller holds (nats/token)"),
    ("prorl_supervisor_entropy_target", "entropy_target", "entropy target (entropy-target mode, nats/token)"),
    ("prorl_supervisor_entropy_band", "entropy_band", "half-width of the entropy band around the target"),
    ("prorl_learner_entropy", "entropy", "policy entropy on the trained tokens (nats/token)"),
    ("prorl_learner_kl", "kl", "KL to the reference policy (per token)"),
    ("prorl_learner_kl_coef", "kl_coef", "KL penalty coefficient beta used in the last update"),
    ("prorl_learner_entropy_coef", "entropy_coef", "entropy bonus coefficient used in the last update"),
    ("prorl_learner_pg_loss", "pg_loss", "clipped policy-gradient loss"),
    ("prorl_learner_clip_frac_low", "clip_frac_low", "share of tokens clipped at 1 - eps_low"),
    ("prorl_learner_clip_frac_high", "clip_frac_high", "share of tokens clipped at 1 + eps_high"),
    ("prorl_learner_grad_norm", "grad_norm", "gradient norm before clipping"),
    ("prorl_learner_kl_capped_frac", "kl_capped_frac", "share of tokens whose k3 KL value was capped (algorithm.k3_cap)"),
    ("prorl_learner_pad_frac", "pad_frac", "share of the positions the learner computed that were padding"),
    ("prorl_learner_lr", "lr", "learning rate"),
    ("prorl_learner_policy_version", "policy_version", "version of the policy's weights (one per update)"),
    ("prorl_learner_tokens_per_second", "train_tokens_per_s", "trained tokens per second of the update"),
    ("prorl_learner_sampler_logp_gap", "sampler_logp_gap",
     "mean |logp(sampler) - logp(learner)| on the same weights (engine mismatch)"),
    ("prorl_learner_sync_megabytes", "sync_mb", "size of the weights sent to the generators after each update"),
    ("prorl_learner_sync_megabytes_per_second", "sync_mb_per_s",
     "weight sync throughput (weight_sync.method), learner to every generator"),
    ("prorl_generator_tokens_per_second", "gen_tokens_per_s", "generated tokens per second of generation"),
    ("prorl_generator_response_length_tokens", "response_len_mean", "mean response length"),
    ("prorl_generator_truncated_frac", "truncated_frac", "share of responses cut at max_new_tokens"),
    ("prorl_verifier_reward_mean", "reward_mean", "mean reward of every rollout of the last step"),
    ("prorl_verifier_accuracy", "accuracy", "share of rollouts of the last step with reward >= 1"),
    ("prorl_supervisor_shaped_reward_mean", "shaped_reward_mean",
     "mean reward trained on in the last step, after algorithm.reward_shaping (the verifier's without it)"),
    ("prorl_supervisor_length_penalty_on", "length_penalty_on",
     "1 when the scheduled length penalty (algorithm.reward_shaping.length_penalty) applied in the last step"),
    ("prorl_verifier_answer_format_frac", "answer_format_frac", "share of responses in their task's answer format"),
    ("prorl_reference_policy_version", "reference_version", "policy version the reference was last reset to"),
    ("prorl_supervisor_max_staleness", "max_staleness", "the staleness bound (supervisor.max_staleness)"),
    ("prorl_supervisor_staleness_mean", "staleness_mean",
     "policy versions between the trained rows' sampler and the learner, mean over the last batch"),
    ("prorl_supervisor_staleness_max", "staleness_max", "the same, largest in the last batch"),
    ("prorl_supervisor_version_span_max", "version_span_max",
     "in-flight updates: most policy versions the tokens of one trained response spanned, in the last batch"),
    ("prorl_supervisor_buffered_batches", "buffered_batches",
     "batches made ahead of the learner and waiting for it after the last step"),
    ("prorl_generator_idle_frac", "generator_idle_frac",
     "share of the generators' time in the last step spent on no piece of work"),
    ("prorl_generator_bound_wait_frac", "generator_bound_wait_frac",
     "share of the last step during which the next batch could not start: its weights version did not exist yet "
     "(the staleness bound)"),
    ("prorl_learner_idle_frac", "learner_idle_frac", "share of the last step the learner was not updating"),
    ("prorl_learner_wait_frac", "learner_wait_frac", "share of the last step spent waiting for its batch"),
    ("prorl_learner_is_weight_mean", "is_weight_mean",
     "mean off-policy weight of the trained tokens (algorithm.off_policy_correction)"),
    ("prorl_learner_is_masked_frac", "is_masked_frac", "share of trained tokens the correction gave weight 0"),
    ("prorl_learner_logp_mismatch_k3", "logp_mismatch_k3",
     "k3 estimate of KL(sampler || learner) over the trained tokens, per token"),
    ("prorl_learner_logp_gap_max", "logp_gap_max", "largest |logp(learner) - logp(sampler)| of a trained token"),
    ("prorl_learner_logp_gap_over_log2_frac", "logp_gap_over_log2_frac",
     "share of trained tokens whose sampler and learner probabilities differ by more than 2x"),
    ("prorl_reference_temperature_scale", "ref_temperature_scale",
     "the reference's temperature relative to the sampling temperature"),
)
NAN_IS_NEWS = {"reward_mean", "accuracy"}    # never "not measured": NaN is exported as NaN
# gauges per task from the last record that has the task: (metric, key prefix, help)
STEP_TASK_GAUGES = (
    ("prorl_verifier_task_reward", "reward/", "mean reward of the task's rollouts in its last step"),
    ("prorl_verifier_task_accuracy", "accuracy/", "share of the task's rollouts with reward >= 1"),
    ("prorl_learner_task_entropy", "entropy/", "policy entropy on the task's trained tokens"),
)
# counters summed over the step records: (metric, record key, help)
STEP_COUNTERS = (
    ("prorl_learner_skipped_updates_total", "skipped_updates", "updates skipped for a non-finite loss or gradient"),
    ("prorl_learner_optimizer_steps_total", "optimizer_steps", "optimizer steps taken"),
    ("prorl_learner_trained_tokens_total", "trained_tokens", "response tokens trained on"),
    ("prorl_generator_tokens_total", "gen_tokens", "response tokens generated for training"),
    ("prorl_learner_unverified_rows_total", "unverified_rows",
     "responses left out of training because their verification failed (no reward, not a wrong answer)"),
    ("prorl_supervisor_surplus_expired_total", "surplus_expired",
     "surplus informative groups too old for the next step (outside the staleness bound), never trained on"),
    ("prorl_generator_in_flight_updates_total", "in_flight_pushes",
     "newer weights taken by the generators between decoding pieces (generator.in_flight_updates)"),
)
STEP_TASK_COUNTERS = (
    ("prorl_verifier_errors_total", "verify_errors/", "verifier calls that raised (scored 0)"),
    ("prorl_verifier_timeouts_total", "verify_timeouts/", "verifier calls that timed out (scored 0)"),
    ("prorl_generator_errors_total", "generate_errors/",
     "responses whose generation failed (left out of training, not wrong answers)"),
)
VALIDATION_GAUGES = (
    ("prorl_supervisor_validation_accuracy", "accuracy", "held-out accuracy over the training tasks"),
    ("prorl_supervisor_validation_step", "step", "step of the last validation"),
    ("prorl_supervisor_validation_answer_format_frac", "answer_format_frac",
     "held-out answers in their task's format"),
)
VALIDATION_TASK_GAUGES = (
    ("prorl_supervisor_validation_task_accuracy", "accuracy/", "held-out accuracy (pass@1 over the samples)"),
    ("prorl_supervisor_validation_task_solved_frac", "solved_frac/", "held-out prompts solved at least once"),
)
PASS_AT_K = ("prorl_supervisor_validation_task_pass_at_k", "held-out pass@k (unbiased estimator)")
# counters of events: (metric, event kind, label taken from the event (or None), help); an event
# without the label's field counts under "unrecorded". The label `reason` of the reset counter
# (its name predates the field) is the event's `trigger`
LABEL_FIELD = {"reason": "trigger"}
EVENT_COUNTERS = (
    ("prorl_supervisor_reference_resets_total", "reference_reset", "reason",
     "reference resets (reference <- policy), by trigger"),
    ("prorl_supervisor_actor_restarts_total", "actor_restarted", "role", "actors replaced after dying, by role"),
    ("prorl_supervisor_rollbacks_total", "rolled_back", None, "rollbacks to a checkpoint after losing the learner"),
    ("prorl_supervisor_resumes_total", "run_resumed", None, "driver restarts resumed from a checkpoint"),
    ("prorl_supervisor_checkpoints_total", "checkpoint", None, "checkpoints saved"),
    ("prorl_supervisor_item_rejects_total", "item_rejected", "split", "malformed dataset rows rejected"),
)


def _catalog() -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """metric -> (kind, help, labels besides `run`): everything the exporter exposes."""
    cat = {"prorl_supervisor_num_steps": ("gauge", "training steps the run is set to", ()),
           "prorl_supervisor_run_complete": ("gauge", "1 once the run has done every step and its last validation", ()),
           "prorl_supervisor_last_progress_timestamp_seconds": (
               "gauge", "Unix time the run last made progress: a step, a validation or a checkpoint ended, "
                        "the driver started, resumed or rolled back", ()),
           "prorl_supervisor_last_checkpoint_step": ("gauge", "step of the newest checkpoint", ()),
           "prorl_supervisor_exporter_errors_total": ("counter", "records the exporter could not fold (logged)", ()),
           "prorl_supervisor_phase_seconds": ("gauge", "time of each phase in the last step", ("phase",)),
           PASS_AT_K[0]: ("gauge", PASS_AT_K[1], ("task", "k"))}
    for table, kind, labels in ((STEP_GAUGES, "gauge", ()), (STEP_TASK_GAUGES, "gauge", ("task",)),
                                (STEP_COUNTERS, "counter", ()), (STEP_TASK_COUNTERS, "counter", ("task",)),
                                (VALIDATION_GAUGES, "gauge", ()), (VALIDATION_TASK_GAUGES, "gauge", ("task",))):
        for name, _key, help in table:
            cat[name] = (kind, help, labels)
    for name, _kind, label, help in EVENT_COUNTERS:
        cat[name] = ("counter", help, (label,) if label else ())
    return cat


CATALOG = _catalog()


def metric_names() -> set[str]:
    """Every metric the exporter exposes (as scraped: counters end in _total)."""
    return set(CATALOG)


def _num(v) -> float:
    return math.nan if v is None else float(v)


class RunFigures:
    """The run's records folded into what a scrape shows: the last measured value of every
    gauge, running totals of every counter. Adding a record costs the same at step 10 as at
    step 10,000 (a scrape never walks the history)."""

    def __init__(self, reset_reasons=(), roles=ROLES):
        """reset_reasons and roles start their counters at 0, so that the first reset or
        restart is an increase."""
        self.gauges: dict[tuple[str, tuple], float] = {}      # (metric, label values) -> value
        self.counters: dict[tuple[str, tuple], float] = {}
        initial = {"reason": reset_reasons, "role": roles, "split": ("train", "validation")}
        for name, key, help in STEP_COUNTERS:
            self.counters[(name, ())] = 0.0
        for name, kind, label, help in EVENT_COUNTERS:
            for v in (initial[label] if label else [None]):
                self.counters[(name, (v,) if label else ())] = 0.0
        self.last_step = 0
        self.run_end_step = None     # a run prolonged after its end (num_steps raised) is not complete

    @property
    def complete(self) -> bool:
        return self.run_end_step is not None and self.run_end_step >= self.last_step

    @classmethod
    def from_records(cls, steps=(), validations=(), events=(), rolled_back=(), **kw) -> "RunFigures":
        """rolled_back: the lines of rolled_back.jsonl (steps done again), counted, not shown."""
        f = cls(**kw)
        for r in rolled_back:
            if r.get("file") == "metrics.jsonl":
                f._count_step(r)
            elif r.get("file") == "events.jsonl":
                f._count_event(r)
        for r in steps:
            f.add("metrics", r)
        for r in validations:
            f.add("validation", r)
        for r in events:
            f.add("events", r)
        return f

    def add(self, file: str, r: dict) -> None:
        """A record of metrics.jsonl, validation.jsonl or events.jsonl (in the order written)."""
        if file == "metrics":
            self._step(r)
            self._count_step(r)
        elif file == "validation":
            self._validation(r)
        else:
            self._event(r)
            self._count_event(r)

    def _inc(self, name, labels, v):
        self.counters[(name, labels)] = self.counters.get((name, labels), 0.0) + float(v)

    def _set(self, name, labels, v, news=False):
        v = _num(v)
        if not math.isnan(v) or news:   # NaN = not measured: the last measured value stays
            self.gauges[(name, labels)] = v

    def _per_task(self, r, prefix):
        """(task, value) of the record's keys `<prefix><task>`."""
        return [(k[len(prefix):], v) for k, v in r.items() if k.startswith(prefix) and v is not None]

    def _step(self, r):
        for name, key, help in STEP_GAUGES:
            self._set(name, (), r.get(key), news=key in NAN_IS_NEWS)
        for name, prefix, help in STEP_TASK_GAUGES:
            for task, v in self._per_task(r, prefix):
                self._set(name, (task,), v)
        for p in RECORD_PHASES:
            self._set("prorl_supervisor_phase_seconds", (p,), r.get(f"time/{p}_s"))
        self.last_step = r["step"]

    def _count_step(self, r):
        for name, key, help in STEP_COUNTERS:
            if r.get(key) is not None:
                self._inc(name, (), r[key])
        for name, prefix, help in STEP_TASK_COUNTERS:
            for task, v in self._per_task(r, prefix):
                self._inc(name, (task,), v)

    def _validation(self, r):
        for name, key, help in VALIDATION_GAUGES:
            self._set(name, (), r.get(key))
        for name, prefix, help in VALIDATION_TASK_GAUGES:
            for task, v in self._per_task(r, prefix):
                self._set(name, (task,), v)
        for key, v in self._per_task(r, "pass@"):   # key: "<k>/<task>"
            k, task = key.split("/", 1)
            self._set(PASS_AT_K[0], (task, k), v)

    def _event(self, e):
        if e["event"] == Event.RUN_END:
            self.run_end_step = e["step"]
        elif e["event"] == Event.CHECKPOINT:
            self._set("prorl_supervisor_last_checkpoint_step", (), e["step"])

    def _count_event(self, e):
        for name, kind, label, help in EVENT_COUNTERS:
            if e.get("event") == kind:
                v = str(e.get(LABEL_FIELD.get(label, label), "unrecorded")) if label else None
                self._inc(name, (v,) if label else (), 1)


def families(run: str, num_steps: int, last_progress: float, figures: RunFigures, errors: int = 0):
    """The run's figures -> its metric families (what a scrape returns), each series labelled
    with the run. last_progress: Unix time of the run's last sign of progress; errors: records
    the exporter could not fold."""
    values = {**figures.gauges, **figures.counters, ("prorl_supervisor_exporter_errors_total", ()): float(errors),
              ("prorl_supervisor_num_steps", ()): float(num_steps),
              ("prorl_supervisor_run_complete", ()): float(figures.complete),
              ("prorl_supervisor_last_progress_timestamp_seconds", ()): last_progress}
    by_name: dict[str, list] = {}
    for (name, lv), v in values.items():
        by_name.setdefault(name, []).append((lv, v))
    out = []
    for name, (kind, help, labels) in CATALOG.items():
        f = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, help, labels=["run", *labels])
        for lv, v in sorted(by_name.get(name, [])):
            f.add_metric([run, *lv], v)
        out.append(f)
    return out


class _Collector:
    def __init__(self, exporter: "Exporter"):
        self.exporter = exporter

    def collect(self):
        x = self.exporter
        with x.lock:
            return families(x.run, x.num_steps, x.last_progress, x.figures, x.errors)


PROGRESS_EVENTS = ("checkpoint", "run_resumed", "rolled_back", "run_end")


def pid_alive(pid: str) -> bool:
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def target_file_pid(path: Path) -> str:
    """The pid in a target file's name, `<run>-<pid>.prorl.json` or `<run>-<pid>.ray.json`."""
    return path.name.split(".", 1)[0].rsplit("-", 1)[-1]


class Exporter:
    """Serves the run's figures to Prometheus; fed by the run's records, read by scrapes."""

    def __init__(self, run: str, num_steps: int, spec, reset_reasons=(), roles=ROLES, log=print):
        """spec: metrics.prometheus (PrometheusSpec)."""
        self.run, self.num_steps, self.spec, self.log = run, num_steps, spec, log
        self.kw = dict(reset_reasons=tuple(reset_reasons), roles=tuple(roles))
        self.last_progress = time.time()   # the driver's start counts as progress
        self.errors = 0
        self.lock = threading.Lock()     # records arrive on the driver's thread, scrapes on the server's
        self.figures = RunFigures(**self.kw)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self.server = self.thread = None
        self.stem = f"{run}-{os.getpid()}"
        self.target_files: list[Path] = []
        self.ray_targets: list[str] = []
        self.port = None

    # ------------------------------------------------------------------ fed by the run's records
    def observe(self, file: str, record: dict) -> None:
        """A record just written to metrics.jsonl, validation.jsonl or events.jsonl. One the
        exporter cannot fold is logged and counted: monitoring never stops a run."""
        try:
            with self.lock:
                self.figures.add(file, record)
                if file != "events" or record.get("event") in PROGRESS_EVENTS:
                    self.last_progress = time.time()
        except Exception as e:  # noqa: BLE001 - a bad record costs its figures, not the run
            self.errors += 1
            if self.errors <= 3:
                self.log(f"metrics: could not export a {file} record ({type(e).__name__}: {e}); counted in "
                         "prorl_supervisor_exporter_errors_total")

    def load(self, steps: list[dict], validations: list[dict], events: list[dict],
             rolled_back: list[dict] = ()) -> None:
        """The records as they stand (at the start, after a resume or a rollback: progress)."""
        figures = RunFigures.from_records(steps, validations, events, rolled_back, **self.kw)
        with self.lock:
            self.figures, self.last_progress = figures, time.time()

    # ------------------------------------------------------------------ serving
    def start(self, ray_targets: list[str] = ()) -> str:
        """Clear the target files this run's dead drivers left, start the HTTP server, list it
        and the Ray nodes' metrics in targets_dir -> "host:port"."""
        from prometheus_client import start_http_server
        d = Path(self.spec.targets_dir)
        for old in list(d.glob(f"{self.run}-*.prorl.json")) + list(d.glob(f"{self.run}-*.ray.json")):
            pid = target_file_pid(old)
            if old.name.startswith(f"{self.run}-{pid}.") and not pid_alive(pid):
                old.unlink(missing_ok=True)
        try:
            self.server, self.thread = start_http_server(self.spec.port, self.spec.address, registry=self.registry)
        except OSError as e:
            raise RuntimeError(f"metrics.prometheus: cannot listen on {self.spec.address}:{self.spec.port} ({e}); "
                               "port 0 takes any free port") from e
        self.port = self.server.server_port
        host = "127.0.0.1" if self.spec.address in ("0.0.0.0", "::", "") else self.spec.address
        address = f"{host}:{self.port}"
        d.mkdir(parents=True, exist_ok=True)
        self.set_ray_targets(ray_targets)
        self._write_targets(d / f"{self.stem}.prorl.json", [address], {})   # last: its presence means both are there
        return address

    def set_ray_targets(self, targets: list[str]) -> None:
        """The Ray nodes' metrics endpoints (rewritten when nodes come or go), labelled with the run."""
        if self.server is None or sorted(targets) == self.ray_targets:
            return
        self.ray_targets = sorted(targets)
        self._write_targets(Path(self.spec.targets_dir) / f"{self.stem}.ray.json", self.ray_targets, {"run": self.run})

    def _write_targets(self, path: Path, targets: list[str], labels: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")   # Prometheus reads *.json: never a half-written one
        tmp.write_text(json.dumps([{"targets": targets, "labels": labels}]))
        os.replace(tmp, path)
        if path not in self.target_files:
            self.target_files.append(path)

    def scrape(self) -> str:
        """What a scrape returns (Prometheus text format 0.0.4)."""
        from prometheus_client import generate_latest
        return generate_latest(self.registry).decode()

    def close(self, linger_s: float = 0.0, forget: bool = True) -> None:
        """Stop the server after serving linger_s more seconds. forget: remove the target files
        (a run that ended); False leaves them, so Prometheus sees the target down (a crash)."""
        if self.server is None:
            return
        if linger_s:
            self.log(f"metrics: serving {linger_s:g}s more for a last scrape")
            time.sleep(linger_s)
        if forget:
            for p in self.target_files:
                p.unlink(missing_ok=True)
            self.target_files = []
        server, self.server = self.server, None
        threading.Thread(target=server.shutdown, daemon=True).start()
        self.thread.join(timeout=5)
        server.server_close()
