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
- Waiting for entropy: with an entropy target, a due reset waits while entropy (the mean
  of the last ``entropy_window`` steps: one step's batch is noisy) is below a floor (the
  supervisor passes the target plus a margin, as the penalty holds entropy a little below
  the reference's), or (with a ceiling) above it; after ``max_wait_steps`` it is skipped,
  and the triggers count again from there. The KL penalty pulls the policy towards the
  reference, so a reference taken from a policy whose entropy has dipped holds entropy down
  there however large the coefficient grows, and each further reset taken low ratchets it
  lower (measured: a scheduled reset right after a dip left a 48-step run pinned at the
  coefficient's cap below the band for the rest of it).
- Pure policy: it decides, the caller acts. Usage after optimizer step ``step``:
  ``policy.observe_step(kl, entropy)``; ``decision = policy.decide(step, ...)``; on
  ``("reset", reason)``: copy the policy weights to the reference and
  ``policy.record(step, reason)``; "wait" and "skip" are for the log (the policy has
  already re-armed itself after a skip). A reason is text for people that carries the
  trigger that gave it (`reason.trigger`), so the records name the trigger as a field and
  nothing parses it back out of the text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from prorl_actors.spec import ResetSpec
from prorl_actors.spec.algorithm import ResetTrigger

TRIGGERS = get_args(ResetTrigger)
_DEFAULT = ResetSpec()   # the defaults are the spec's, written once


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
class Reason(str):
    """Why a reset is due, for people ("KL share of the loss above 0.5"), and the trigger that
    gave it (`trigger`: one of TRIGGERS), for code."""
    trigger: str

    def __new__(cls, text: str, trigger: str) -> Reason:
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown reset trigger {trigger!r}; known: {TRIGGERS}")
        reason = super().__new__(cls, text)
        reason.trigger = trigger
        return reason

    def __reduce__(self):   # pickled (Ray, copy) with its trigger
        return Reason, (str(self), self.trigger)

    def more(self, text: str) -> Reason:
        """The same trigger, with `text` added to the reason."""
        return Reason(f"{self}; {text}", self.trigger)


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
    `kl_ceiling` for `kl_steps` steps in a row. With an entropy floor or ceiling (`decide`), a
    due reset waits while the recent entropy is outside them, and is skipped after
    `max_wait_steps`.
    `last_reset_step` is the step the triggers count from: the last reset or skipped reset.
    """

    triggers: tuple[str, ...] = tuple(_DEFAULT.triggers)
    every_steps: int = _DEFAULT.every_steps
    patience: int = _DEFAULT.patience
    min_delta: float = _DEFAULT.min_delta
    max_drop: float = math.inf           # the spec's null: no limit
    max_kl_share: float = math.inf       # the spec's null
    kl_ceiling: float = math.inf         # the spec's null
    kl_steps: int = _DEFAULT.kl_steps
    min_gap: int = _DEFAULT.min_gap
    max_wait_steps: int = _DEFAULT.max_wait_steps
    entropy_window: int = _DEFAULT.entropy_window
    last_reset_step: int = 0
    num_resets: int = 0
    events: list = field(default_factory=list)          # (step, reason) of every reset
    val_since_reset: list = field(default_factory=list)
    kl_streak: int = 0
    waiting_since: int | None = None                     # a due reset waits for entropy since this step
    recent_entropy: list = field(default_factory=list)  # the last entropy_window steps' entropy
    skipped: list = field(default_factory=list)         # (step, reason) of every skipped reset

    @classmethod
    def from_spec(cls, r: ResetSpec) -> ResetPolicy:
        """The policy supervisor.resets describes."""
        return cls(triggers=tuple(r.triggers), every_steps=r.every_steps, patience=r.patience,
                   min_delta=r.min_delta, max_drop=r.max_drop or math.inf, max_kl_share=r.max_kl_share or math.inf,
                   kl_ceiling=r.kl_ceiling or math.inf, kl_steps=r.kl_steps, min_gap=r.min_gap,
                   max_wait_steps=r.max_wait_steps, entropy_window=r.entropy_window)

    def __post_init__(self) -> None:
        unknown = set(self.triggers) - set(TRIGGERS)
        if unknown:
            raise ValueError(f"unknown reset triggers {sorted(unknown)}; known: {TRIGGERS}")
        if self.every_steps < 0 or self.min_gap < 0 or self.max_wait_steps < 0:
            raise ValueError("every_steps, min_gap and max_wait_steps must be >= 0")
        if self.kl_steps < 1 or self.entropy_window < 1:
            raise ValueError("kl_steps and entropy_window must be >= 1")
        self.triggers = tuple(self.triggers)

    def observe_step(self, kl: float, entropy: float = math.nan) -> None:
        """After every training step: the KL streak above the ceiling (NaN breaks it) and the
        recent entropy (NaN is left out)."""
        self.kl_streak = self.kl_streak + 1 if (math.isfinite(kl) and kl > self.kl_ceiling) else 0
        if math.isfinite(entropy):
            self.recent_entropy = [*self.recent_entropy, float(entropy)][-self.entropy_window:]

    def observe_validation(self, value: float) -> None:
        if math.isfinite(value):
            self.val_since_reset.append(float(value))

    def decide(self, step: int, *, pg_loss: float = math.nan, kl: float = math.nan, kl_coef: float = 0.0,
               entropy_floor: float | None = None, entropy_ceiling: float | None = None,
               ) -> tuple[Literal["reset", "wait", "skip"], Reason] | None:
        """After step `step`: None (nothing due), ("reset", reason), ("wait", reason) or
        ("skip", reason).

        entropy_floor (None: no floor): a due reset waits while the mean of the recent entropy
        is below it; entropy_ceiling (None: no ceiling) likewise above it (with a flattened
        reference a snapshot taken high lifts entropy further). After max_wait_steps of waiting
        it is skipped and the triggers count again from this step. `waiting_since`: the step
        the wait began.
        """
        reason = self.due(step, pg_loss=pg_loss, kl=kl, kl_coef=kl_coef)
        if reason is None:
            self.waiting_since = None          # a trigger that went away (KL fell back) waits no more
            return None
        recent = sum(self.recent_entropy) / len(self.recent_entropy) if self.recent_entropy else math.nan
        low = entropy_floor is not None and recent < entropy_floor
        high = entropy_ceiling is not None and recent > entropy_ceiling
        if not (low or high):
            if self.waiting_since is not None:
                reason = reason.more(f"after waiting {step - self.waiting_since} steps for entropy")
            return "reset", reason
        if self.waiting_since is None:
            self.waiting_since = step
        side = f"below {entropy_floor:.4g}" if low else f"above {entropy_ceiling:.4g}"
        if step - self.waiting_since < self.max_wait_steps:
            return "wait", reason.more(f"entropy {recent:.4g} {side}")
        reason = reason.more(f"entropy outside the window for {step - self.waiting_since} steps")
        self.skipped.append((step, str(reason)))
        self._rearm(step)
        return "skip", reason

    def due(self, step: int, *, pg_loss: float = math.nan, kl: float = math.nan, kl_coef: float = 0.0) -> Reason | None:
        """The reason a reset is due after step `step` (counted from 1; the minimum gap
        respected), or None."""
        if step < 1:
            raise ValueError(f"steps are counted from 1; got step={step}")
        if self.num_resets and step - self.last_reset_step < self.min_gap:
            return None
        if "scheduled" in self.triggers and reset_due(step, self.every_steps, self.last_reset_step):
            return Reason("scheduled", "scheduled")
        if "validation" in self.triggers:
            if validation_stalled(self.val_since_reset, self.patience, self.min_delta):
                return Reason(f"validation stalled for {self.patience} evaluations", "validation")
            if validation_dropped(self.val_since_reset, self.max_drop):
                return Reason(f"validation dropped by more than {self.max_drop:g}", "validation")
        if "kl" in self.triggers:
            if math.isfinite(kl) and math.isfinite(pg_loss) and kl_share(pg_loss, kl, kl_coef) > self.max_kl_share:
                return Reason(f"KL share of the loss above {self.max_kl_share:g}", "kl")
            if self.kl_streak >= self.kl_steps:
                return Reason(f"KL above {self.kl_ceiling:g} for {self.kl_steps} steps", "kl")
        return None

    def record(self, step: int, reason: str) -> None:
        if step < self.last_reset_step:
            raise ValueError(f"reset at step {step} is before the last reset at {self.last_reset_step}")
        self.num_resets += 1
        self.events.append((step, str(reason)))
        self._rearm(step)

    def _rearm(self, step: int) -> None:
        """The triggers count from `step` again (after a reset, or a skipped one)."""
        self.last_reset_step, self.val_since_reset, self.kl_streak, self.waiting_since = step, [], 0, None

    def state_dict(self) -> dict[str, Any]:
        return {"last_reset_step": self.last_reset_step, "num_resets": self.num_resets,
                "events": [list(e) for e in self.events], "val_since_reset": list(self.val_since_reset),
                "kl_streak": self.kl_streak, "waiting_since": self.waiting_since,
                "recent_entropy": list(self.recent_entropy),
                "skipped": [list(e) for e in self.skipped]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the history; the thresholds stay as configured (the run spec wins)."""
        self.last_reset_step, self.num_resets = int(state["last_reset_step"]), int(state["num_resets"])
        self.events = [tuple(e) for e in state["events"]]
        self.val_since_reset = [float(v) for v in state["val_since_reset"]]
        self.kl_streak = int(state["kl_streak"])
        self.waiting_since = state["waiting_since"]
        self.recent_entropy = [float(v) for v in state["recent_entropy"]]
        self.skipped = [tuple(e) for e in state["skipped"]]
