"""Run-directory records: metrics.jsonl (one object per step), validation.jsonl and
events.jsonl. One writer, append-only, flushed every line so a crash loses nothing."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

# the keys every metrics.jsonl line has (others are added per task: reward/<task>, ...)
STEP_KEYS = ("step", "reward_mean", "accuracy", "entropy", "kl", "kl_coef", "clip_frac_low",
             "clip_frac_high", "kept_groups_frac", "gen_rounds", "response_len_mean", "truncated_frac",
             "reference_resets", "step_s", "gen_tokens_per_s", "answer_format_frac", "verify_errors",
             "verify_timeouts")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null says "not measured"
    return v


class JsonlLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        self.f.close()


class RunRecords:
    def __init__(self, run_dir: Path):
        self.metrics = JsonlLog(run_dir / "metrics.jsonl")
        self.validation = JsonlLog(run_dir / "validation.jsonl")
        self.events = JsonlLog(run_dir / "events.jsonl")

    def event(self, kind: str, step: int, **fields) -> None:
        self.events.write({"event": kind, "step": step, "time": time.time(), **fields})

    def close(self) -> None:
        for log in (self.metrics, self.validation, self.events):
            log.close()


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
