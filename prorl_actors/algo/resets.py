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
- Pure policy: it decides, the caller acts. Usage after optimizer step ``step``:
  ``if resets.due(step): <copy policy weights to the reference>; resets.record(step)``.
  Validation- and KL-triggered resets will extend ``due`` later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def reset_due(step: int, every_steps: int, last_reset_step: int = 0) -> bool:
    """True if a scheduled reset is due after training step ``step`` (counted from 1)."""
    if every_steps < 0:
        raise ValueError(f"every_steps must be >= 0 (0 = never); got {every_steps}")
    if step < 1:
        raise ValueError(f"steps are counted from 1; got step={step}")
    return every_steps > 0 and step - last_reset_step >= every_steps


@dataclass
class ScheduledResets:
    """Reset the reference every ``every_steps`` steps (0 = never); checkpointable."""

    every_steps: int
    last_reset_step: int = 0  # 0 = the initial reference (no reset yet)
    num_resets: int = 0

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0 (0 = never); got {self.every_steps}")

    def due(self, step: int) -> bool:
        """Is a reset due after training step ``step`` (counted from 1)?"""
        return reset_due(step, self.every_steps, self.last_reset_step)

    def record(self, step: int) -> None:
        """Note that the reference was reset after step ``step``."""
        if step < self.last_reset_step:
            raise ValueError(f"reset at step {step} is before the last reset at {self.last_reset_step}")
        self.last_reset_step = step
        self.num_resets += 1

    def state_dict(self) -> dict[str, Any]:
        return {"every_steps": self.every_steps, "last_reset_step": self.last_reset_step, "num_resets": self.num_resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the counters; ``every_steps`` stays as configured (the run spec wins)."""
        self.last_reset_step = int(state["last_reset_step"])
        self.num_resets = int(state["num_resets"])
