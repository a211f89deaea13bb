"""Experiment trackers: TensorBoard and Weights & Biases, fed from the run's records as the
Prometheus exporter is (`metrics.trackers: [tensorboard, wandb]`).

RunRecords hands its sinks every record it writes, and the records as they stand whenever it
opens its files (at the start, after a resume or a rollback). A tracker logs, at x = the step:
  metrics.jsonl     every finite number of the step's record under its own key (entropy, kl,
                    reward/<task>, time/generate_s, ...: the keys of metrics.jsonl)
  validation.jsonl  the same under validation/<key> (validation/pass@64/<task>, ...)
  events.jsonl      events/<kind>: how many events of that kind the run has had (resets,
                    checkpoints, actor deaths, rollbacks, ...)
Steps that are done again after a resume or a rollback: TensorBoard hides the old ones (the
writer reopens with `purge_step`, and TensorBoard drops what an earlier writer logged from that
step on); W&B's history is append-only, so its x axis is the training step (`define_metric`)
and a step done again shows twice, the later point being the one that stands.

Both are imported when a run names them (the `trackers` extra). A tracker that cannot start
stops the run at its start, before anything is trained; one that fails on a record is logged
and counted (`errors`), and the run goes on: tracking never stops training.
"""
from __future__ import annotations

import dataclasses
import math
import os
import secrets
from collections import Counter
from pathlib import Path
from typing import Protocol

from prorl_actors.errors import InputError

SKIP_KEYS = ("step", "time", "event")   # the x axis, wall time and the event's kind are not figures
INSTALL_HINT = "pip install 'prorl-actors[trackers]'"


def figures(file: str, record: dict, event_counts: Counter) -> dict[str, float]:
    """One record -> the scalars a tracker logs (see the module's docstring). `event_counts`
    is updated with an event's kind."""
    if file == "events":
        kind = str(record.get("event"))
        event_counts[kind] += 1
        return {f"events/{kind}": float(event_counts[kind])}
    prefix = "validation/" if file == "validation" else ""
    return {prefix + k: float(v) for k, v in record.items()
            if k not in SKIP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker(Protocol):
    name: str

    def rewind(self, step: int) -> None:
        """The records after `step` no longer stand (steps after it are done again)."""

    def write(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, logdir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise InputError(f"metrics.trackers: tensorboard needs the tensorboard package ({INSTALL_HINT}): {e}")
        self.SummaryWriter, self.logdir, self.writer = SummaryWriter, Path(logdir), None

    def rewind(self, step: int) -> None:
        if self.writer is not None:
            self.writer.close()
        earlier = any(self.logdir.glob("events.out.tfevents.*"))
        # purge_step: TensorBoard drops what earlier files logged at steps >= it (one writer per
        # opening: the records as they stand up to `step`, what comes after is new)
        self.writer = self.SummaryWriter(str(self.logdir), purge_step=step + 1 if earlier else None)

    def write(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()   # one record a step: a crash loses nothing the records have

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker:
    """One W&B run per prorl run: its id is kept in <run_dir>/wandb_run_id, so a resume (a new
    driver) continues the same W&B run."""
    name = "wandb"

    def __init__(self, spec, run_name: str, run_dir: Path, config: dict, log=print):
        """spec: metrics.wandb (WandbSpec)."""
        try:
            import wandb
        except ImportError as e:
            raise InputError(f"metrics.trackers: wandb needs the wandb package ({INSTALL_HINT}): {e}")
        id_file = Path(run_dir) / "wandb_run_id"
        if not id_file.exists():
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(secrets.token_hex(4) + "\n")
        self.run_id = id_file.read_text().strip()
        mode = spec.mode or os.environ.get("WANDB_MODE") or "offline"
        # W&B's service, inherited from whatever started this driver (WANDB_SERVICE), would hold that
        # process's streams: a driver killed before this one can leave this run's id "in use" there
        # (the survival test's drivers inherited pytest's). Each driver starts its own.
        os.environ.pop("WANDB_SERVICE", None)
        wandb_dir = Path(spec.dir or run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        # console="off": the driver's terminal stays ours (W&B would wrap stdout to copy it);
        # silent: no W&B banner, the line below says where the run is; disable_git: W&B would look
        # for a git checkout at `dir` (the run directory: none) and warn; the spec is in the config
        self.run = wandb.init(project=spec.project, entity=spec.entity, group=spec.group, tags=list(spec.tags),
                              name=run_name, id=self.run_id, resume="allow", dir=str(wandb_dir), mode=mode,
                              config=config, settings=wandb.Settings(console="off", silent=True, disable_git=True))
        self.run.define_metric("step", hidden=True)
        self.run.define_metric("*", step_metric="step")   # x = the training step, which a rollback re-does
        where = self.run.url if mode == "online" and self.run.url else \
            f"{self.run.dir.rsplit('/files', 1)[0]} (`wandb sync` uploads it)"
        log(f"wandb: run {self.run_id} ({mode}): {where}")

    def rewind(self, step: int) -> None:
        pass   # append-only: the steps done again are logged again at their step

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class Trackers:
    """The run's trackers, as one sink of RunRecords (load / observe, as the exporter)."""

    def __init__(self, trackers: list, log=print):
        self.trackers, self.log = trackers, log
        self.event_counts: Counter = Counter()
        self.errors: Counter = Counter()   # per tracker: records it could not write

    @classmethod
    def from_spec(cls, spec, log=print) -> "Trackers | None":
        """The trackers `spec.metrics.trackers` names, started (None when it names none)."""
        m = spec.metrics
        made = []
        try:
            for name in m.trackers:
                if name == "tensorboard":
                    made.append(TensorBoardTracker(Path(m.tensorboard.dir or spec.run_dir / "tensorboard")))
                elif name == "wandb":
                    made.append(WandbTracker(m.wandb, spec.name, spec.run_dir, dataclasses.asdict(spec), log=log))
        except BaseException:
            for t in made:
                t.close()
            raise
        return cls(made, log) if made else None

    def load(self, steps: list[dict], validations: list[dict], events: list[dict], rolled_back=()) -> None:
        """The records as they stand: what was logged after them is no longer the run's."""
        self.event_counts = Counter(str(e.get("event")) for e in events)
        last = max((r.get("step", 0) for r in (*steps, *validations)), default=0)
        for t in self.trackers:
            self._guard(t, t.rewind, last)

    def observe(self, file: str, record: dict) -> None:
        try:
            values = figures(file, record, self.event_counts)
            step = int(record.get("step", 0))
        except (TypeError, ValueError) as e:   # a record with a step that is not a number
            for t in self.trackers:
                self._count(t, e)
            return
        if values:
            for t in self.trackers:
                self._guard(t, t.write, step, values)

    def _guard(self, tracker, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a tracker's failure costs its figures, not the run
            self._count(tracker, e)

    def _count(self, tracker, e: Exception) -> None:
        self.errors[tracker.name] += 1
        if self.errors[tracker.name] <= 3:
            self.log(f"{tracker.name}: could not log a record ({type(e).__name__}: {e}); the run goes on")

    def close(self) -> None:
        for t in self.trackers:
            self._guard(t, t.close)
            if self.errors[t.name]:
                self.log(f"{t.name}: {self.errors[t.name]} record(s) could not be logged")
