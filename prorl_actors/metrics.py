"""Run-directory records: metrics.jsonl (one object per step), validation.jsonl and
events.jsonl. One writer, append-only, flushed every line so a crash loses nothing.

A resume or a rollback to the checkpoint of step k first calls `roll_back_records(run_dir, k, v)`:
the lines of steps after k move to rolled_back.jsonl (the steps are done again, and each
step appears once in the records), except the events of the run's own life (deaths,
restarts, resumes, preemptions), which stay where they happened. Validations after the
checkpoint's last one (v: a stop in the middle of step k's validation leaves v < k) move too,
since they are done again."""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from enum import StrEnum
from functools import partial
from pathlib import Path

from prorl_actors.events import LIFE_EVENTS, Event


# the phases of a step, timed in every metrics.jsonl line as time/<phase>_s (with time/other_s):
# generate and verify are the step's batch's own (made ahead, in the background, when
# supervisor.max_staleness > 0); wait is how long the step waited for it; wait + reference + learn
# + sync + other is the step's wall time (sync: staging the new version, and pushing the batch's)
class Phase(StrEnum):
    GENERATE = "generate"
    VERIFY = "verify"
    WAIT = "wait"
    REFERENCE = "reference"
    LEARN = "learn"
    SYNC = "sync"


PHASES = tuple(Phase)
RECORD_PHASES = (*PHASES, "other")
STEP_PHASES = (Phase.WAIT, Phase.REFERENCE, Phase.LEARN, Phase.SYNC, "other")   # these add up to step_s

# the keys every metrics.jsonl line has (others are added per task: reward/<task>, ...)
STEP_KEYS = ("step", "reward_mean", "accuracy", "entropy", "kl", "kl_coef", "clip_frac_low",
             "clip_frac_high", "kept_groups_frac", "gen_rounds", "response_len_mean", "truncated_frac",
             "reference_resets", "step_s", "gen_tokens_per_s", "answer_format_frac", "verify_errors",
             "verify_timeouts", "generate_errors")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null says "not measured"
    return v


class JsonlLog:
    def __init__(self, path: Path, on_write=None):
        """on_write(record): called with every record written (as given, NaN included)."""
        self.path, self.on_write = path, on_write
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        if self.on_write is not None:
            self.on_write(record)

    def close(self) -> None:
        self.f.close()


class RunRecords:
    def __init__(self, run_dir: Path, sinks=()):
        """sinks: what sees the records as they stand whenever the files are opened (at the start,
        after a roll-back; with the rolled-back lines) and every record written after that, through
        `load(steps, validations, events, rolled_back)` and `observe(file, record)`: the Prometheus
        exporter (exporter.Exporter) and the experiment trackers (trackers.Trackers).

        The records also count the events of the run's life (deaths, restarts, rollbacks,
        resumes: events.LIFE_EVENTS), over every driver of the run: `life_count`."""
        self.run_dir, self.sinks = run_dir, [s for s in sinks if s is not None]
        self._life: Counter = Counter()       # (event, role or None) -> how many, in events.jsonl
        self._open()

    def _open(self) -> None:
        names = ("metrics", "validation", "events")
        events = read_jsonl(self.run_dir / "events.jsonl")
        self._life = Counter((e["event"], e.get("role")) for e in events if e.get("event") in LIFE_EVENTS)
        if self.sinks:
            standing = [read_jsonl(self.run_dir / f"{n}.jsonl") for n in names[:2]] + [events]
            rolled_back = read_jsonl(self.run_dir / "rolled_back.jsonl")
            for sink in self.sinks:
                sink.load(*standing, rolled_back=rolled_back)
        self.metrics, self.validation, self.events = (
            JsonlLog(self.run_dir / f"{n}.jsonl", partial(self._observe, n) if self.sinks else None) for n in names)

    def _observe(self, file: str, record: dict) -> None:
        for sink in self.sinks:
            sink.observe(file, record)

    def roll_back_to(self, step: int, validated_to: int | None = None) -> int:
        """roll_back_records on the open files (closed, rewritten, reopened) -> lines moved."""
        self.close()
        moved = roll_back_records(self.run_dir, step, validated_to)
        self._open()
        return moved

    def event(self, kind: Event, step: int, **fields) -> None:
        """An events.jsonl line; `kind` must be an Event (ValueError otherwise)."""
        kind = Event(kind)
        self.events.write({"event": kind, "step": step, "time": time.time(), **fields})
        if kind in LIFE_EVENTS:
            self._life[(kind, fields.get("role"))] += 1

    def life_count(self, kind: Event, role: str | None = None) -> int:
        """How many `kind` events (of LIFE_EVENTS; of `role`'s actors, when given) the run has
        had, over all its drivers."""
        if kind not in LIFE_EVENTS:
            raise ValueError(f"{kind} is not counted: not one of events.LIFE_EVENTS")
        if role is not None:
            return self._life[(kind, role)]
        return sum(n for (k, _), n in self._life.items() if k == kind)

    def close(self) -> None:
        for log in (self.metrics, self.validation, self.events):
            log.close()


def roll_back_records(run_dir: Path, step: int, validated_to: int | None = None) -> int:
    """Move every record of a step after `step` (life events excepted), and every validation
    after `validated_to` (default: `step`), to rolled_back.jsonl, tagged with its file -> the
    number of lines moved. Files are replaced atomically."""
    moved = 0
    with open(run_dir / "rolled_back.jsonl", "a") as out:
        for name in ("metrics.jsonl", "validation.jsonl", "events.jsonl"):
            path = run_dir / name
            last = validated_to if name == "validation.jsonl" and validated_to is not None else step
            keep = []
            for rec in read_jsonl(path):
                if rec.get("step", 0) <= last or rec.get("event") in LIFE_EVENTS:
                    keep.append(rec)
                else:
                    out.write(json.dumps({"file": name, "rolled_back_to": step, **rec}) + "\n")
                    moved += 1
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, path)
    return moved


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:   # the last line cut short by a kill: the lines before it stand
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({e})") from e
    return out
