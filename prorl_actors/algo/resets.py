"""Reference-policy reset policy (ProRL).

Algorithmic choices:
- ProRL periodically hard-resets the reference policy to the current policy (and, in
  the paper, the optimizer state) so the KL penalty does not keep dragging a prolonged
  run back towards a stale starting point.
- Here: a scheduled reset every ``every_steps`` training steps; ``every_steps = 0`` means
  never. Steps are counted from 1 (step 1 = the first optimizer step). A reset is due
  when at least ``every_steps`` steps have passed since the last recorded reset (or since
  step 0), so with only scheduled resets they land on steps N, 2N, 3N, ...; a reset
  recorded for another reason re-starts the count.
- Triggered resets too (validation stalled or dropped; the KL term's share of the loss, or
  KL above a ceiling for M steps), a minimum gap between resets, each recorded with its reason.
- Pure policy: it decides, the caller acts. Usage after optimizer step ``step``:
  ``if (reason := policy.due(step, ...)): <copy policy weights to the reference>;
  policy.record(step, reason)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def reset_due(step: int, every_steps: int, last_reset_step: int = 0) -> bool:
    """True if a scheduled reset is due after training step ``step`` (counted from 1)."""
    if every_steps < 0:
        raise ValueError(f"every_steps must be >= 0 (0 = never); got {every_steps}")
    if step < 1:
        raise ValueError(f"steps are counted from 1; got step={step}")
    return every_steps > 0 and step - last_reset_step >= every_steps


# ---------------------------------------------------------------------------------------------
# Triggered resets
# ---------------------------------------------------------------------------------------------
TRIGGERS = ("scheduled", "validation", "kl")


def validation_stalled(values: list[float], patience: int, min_delta: float = 0.0) -> bool:
    """The last `patience` evaluations did not beat the best before them by more than
    min_delta (values: the validation metric since the last reset, oldest first)."""
    if patience < 1 or len(values) <= patience:
        return False
    best_before = max(values[:-patience])
    return max(values[-patience:]) <= best_before + min_delta


def validation_dropped(values: list[float], max_drop: float) -> bool:
    """The newest evaluation is more than max_drop below the best since the last reset."""
    return len(values) >= 2 and values[-1] < max(values[:-1]) - max_drop


def kl_share(pg_loss: float, kl: float, kl_coef: float) -> float:
    """The KL term's share of the loss's magnitude: beta*KL / (|pg_loss| + beta*KL)."""
    term = kl_coef * kl
    denom = abs(pg_loss) + term
    return term / denom if denom > 0 else 0.0


@dataclass
class ResetPolicy:
    """When to reset the reference: any of the enabled triggers, never within `min_gap`
    steps of the last reset. Pure decisions; the caller acts and calls `record`.

    scheduled: every `every_steps` steps. validation: the metric has not improved for
    `patience` evaluations, or dropped by more than `max_drop` (evaluations since the last
    reset). kl: the KL term's share of the loss above `max_kl_share`, or KL above
    `kl_ceiling` for `kl_steps` steps in a row.
    """

    triggers: tuple[str, ...] = ("scheduled",)
    every_steps: int = 200
    patience: int = 3
    min_delta: float = 0.0
    max_drop: float = math.inf
    max_kl_share: float = math.inf
    kl_ceiling: float = math.inf
    kl_steps: int = 1
    min_gap: int = 1
    last_reset_step: int = 0
    num_resets: int = 0
    events: list = field(default_factory=list)          # (step, reason) of every reset
    val_since_reset: list = field(default_factory=list)
    kl_streak: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.triggers) - set(TRIGGERS)
        if unknown:
            raise ValueError(f"unknown reset triggers {sorted(unknown)}; known: {TRIGGERS}")
        if self.every_steps < 0 or self.min_gap < 0 or self.kl_steps < 1:
            raise ValueError("every_steps and min_gap must be >= 0, kl_steps >= 1")
        self.triggers = tuple(self.triggers)

    def observe_step(self, kl: float) -> None:
        """After every training step: the KL streak above the ceiling (NaN breaks it)."""
        self.kl_streak = self.kl_streak + 1 if (math.isfinite(kl) and kl > self.kl_ceiling) else 0

    def observe_validation(self, value: float) -> None:
        if math.isfinite(value):
            self.val_since_reset.append(float(value))

    def due(self, step: int, *, pg_loss: float = math.nan, kl: float = math.nan, kl_coef: float = 0.0) -> str | None:
        """The reason a reset is due after step `step` (counted from 1), or None."""
        if step < 1:
            raise ValueError(f"steps are counted from 1; got step={step}")
        if self.num_resets and step - self.last_reset_step < self.min_gap:
            return None
        if "scheduled" in self.triggers and reset_due(step, self.every_steps, self.last_reset_step):
            return "scheduled"
        if "validation" in self.triggers:
            if validation_stalled(self.val_since_reset, self.patience, self.min_delta):
                return f"validation stalled for {self.patience} evaluations"
            if validation_dropped(self.val_since_reset, self.max_drop):
                return f"validation dropped by more than {self.max_drop:g}"
        if "kl" in self.triggers:
            if math.isfinite(kl) and math.isfinite(pg_loss) and kl_share(pg_loss, kl, kl_coef) > self.max_kl_share:
                return f"KL share of the loss above {self.max_kl_share:g}"
            if self.kl_streak >= self.kl_steps:
                return f"KL above {self.kl_ceiling:g} for {self.kl_steps} steps"
        return None

    def record(self, step: int, reason: str) -> None:
        if step < self.last_reset_step:
            raise ValueError(f"reset at step {step} is before the last reset at {self.last_reset_step}")
        self.last_reset_step, self.num_resets = step, self.num_resets + 1
        self.events.append((step, reason))
        self.val_since_reset, self.kl_streak = [], 0

    def state_dict(self) -> dict[str, Any]:
        return {"last_reset_step": self.last_reset_step, "num_resets": self.num_resets,
                "events": [list(e) for e in self.events], "val_since_reset": list(self.val_since_reset),
                "kl_streak": self.kl_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the history; the thresholds stay as configured (the run spec wins)."""
        self.last_reset_step, self.num_resets = int(state["last_reset_step"]), int(state["num_resets"])
        self.events = [tuple(e) for e in state["events"]]
        self.val_since_reset = [float(v) for v in state["val_since_reset"]]
        self.kl_streak = int(state["kl_streak"])
