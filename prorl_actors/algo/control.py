"""Controllers for the KL coefficient (ProRL keeps policy entropy stable with a KL penalty).

Algorithmic choices:
- entropy-target: the KL penalty pulls the policy towards the reference, whose entropy is
  higher than a collapsing policy's, so entropy *below* the target raises the coefficient and
  entropy *above* it lowers the coefficient. A PI controller in log space (the right scale
  spans orders of magnitude) on the error e = (target - entropy) / band, in band widths,
  clipped to [-2, 2]: the integral moves by rate * e per step, so the entropy's mean settles
  on the target, not somewhere in the band (with a dead band it sat at the lower edge and
  noise carried it out); the output is exp(integral + kp * e), both within
  [coef_min, coef_max] (anti-windup: the integral stays within the bounds too). Entropy
  responds to the coefficient with a lag (it integrates its effect), so integral action
  alone oscillates; the proportional part damps it (tests/test_control.py simulates both).
  An optional moving average of the measured entropy (smoothing < 1) adds lag, so it is off
  by default. NaN entropy changes nothing.
  A KL penalty can only pull entropy towards the *reference's*; a reference reset taken while
  entropy is below the target would anchor it there, so the reset policy waits (resets.py).
  The same controller can move another actuator (supervisor.kl.actuator; the sign is the same,
  more of it raises entropy): the entropy bonus's coefficient, or the temperature scale s of the
  reference's logprobs with beta fixed: KL(pi || ref^(1/s)) = -H(pi) - (1/s) E_pi[log ref] + const,
  so s > 1 pulls entropy above the snapshot's and s < 1 below it, whatever the snapshot's entropy.
- kl-target: the adaptive rule of Ziegler et al. (2019), used by OpenRLHF and (in a
  stepwise form) RLlib: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon.
- fixed: the paper's default; the coefficient never changes.

Pure functions plus one small checkpointable state object. No Ray, no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, get_args

from prorl_actors.spec import KLControlSpec
from prorl_actors.spec.algorithm import KLActuator, KLMode

MODES = get_args(KLMode)
ACTUATORS = get_args(KLActuator)
# checkpoint keys -> attributes (the keys predate the names `value` and `initial_value`)
_STATE = {"coef": "value", "log_integral": "log_integral", "target": "target", "smoothed": "smoothed",
          "steps": "steps", "nan_inputs": "nan_inputs", "initial_coef": "initial_value"}
_DEFAULT = KLControlSpec()   # the defaults are the spec's, written once


def entropy_band(target: float, band: float) -> tuple[float, float]:
    """The band [low, high] around the target entropy (nats per token)."""
    return target - band, target + band


def kl_coef_for_entropy(log_integral: float, entropy: float, target: float, band: float, *, rate: float,
                        kp: float, coef_min: float, coef_max: float) -> tuple[float, float]:
    """One entropy-target step of a PI controller in log space -> (new log_integral, coef).

    log_integral: the integral part, log of the coefficient the controller settles on;
    entropy: measured entropy (nats/token); target +- band is the band it must stay in.
    e = (target - entropy) / band clipped to [-2, 2] (> 0: entropy too low, raise beta);
    log_integral += rate * e, kept within [log coef_min, log coef_max] (anti-windup);
    coef = exp(log_integral + kp * e) within [coef_min, coef_max].
    A non-finite entropy changes nothing.
    """
    lo, hi = math.log(coef_min), math.log(coef_max)
    if not math.isfinite(entropy):
        return log_integral, min(max(math.exp(log_integral), coef_min), coef_max)
    e = min(max((target - entropy) / band, -2.0), 2.0)
    log_integral = min(max(log_integral + rate * e, lo), hi)
    return log_integral, min(max(math.exp(log_integral + kp * e), coef_min), coef_max)


def kl_coef_for_kl(coef: float, kl: float, target: float, *, horizon: float, n_steps: int = 1,
                   coef_min: float = 0.0, coef_max: float = math.inf) -> float:
    """One KL-target (adaptive KL) step: the new coefficient; NaN KL leaves it unchanged."""
    if not math.isfinite(kl) or not math.isfinite(coef):
        return coef
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return min(max(coef * (1.0 + error * n_steps / horizon), coef_min), coef_max)


def scale_for_entropy(entropy_at: Callable[[float], float], target: float, lo: float, hi: float,
                      iters: int = 12) -> float:
    """The temperature scale s in [lo, hi] at which entropy_at(s) = target, by bisection in log s.

    entropy_at: a distribution's entropy at the temperature scale s (it rises with s);
    a target out of reach gives the nearer bound. Used at a reference reset to keep the
    reference's entropy (what the KL penalty pulls towards) where it was (bumpless transfer).
    """
    if entropy_at(lo) >= target:
        return lo
    if entropy_at(hi) <= target:
        return hi
    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if entropy_at(math.exp(mid)) < target:
            a = mid
        else:
            b = mid
    return math.exp(0.5 * (a + b))


def ema(previous: float | None, value: float, alpha: float) -> float:
    """Exponential moving average: alpha = weight of the new value (1 = no smoothing)."""
    if previous is None or not math.isfinite(previous):
        return value
    return alpha * value + (1.0 - alpha) * previous


@dataclass
class KLController:
    """What the controller moves (`actuator`: beta = kl_coef, the entropy bonus's coefficient,
    or the reference's temperature scale), its current `value`, and the state the controller
    needs; checkpointable.

    mode: fixed | entropy-target | kl-target. For entropy-target, `target` is absolute, or
    (target_relative set) that fraction of the entropy measured on the first update step.
    `coef_min` and `coef_max` bound the value whatever the actuator (the spec's names).
    """
    mode: str = _DEFAULT.mode
    value: float = _DEFAULT.coef
    actuator: str = _DEFAULT.actuator
    target: float | None = None          # entropy (nats/token) or KL target; None until known
    target_relative: float | None = None
    band: float = _DEFAULT.band
    rate: float = _DEFAULT.rate
    kp: float = _DEFAULT.kp
    coef_min: float = _DEFAULT.coef_min
    coef_max: float = _DEFAULT.coef_max
    smoothing: float = _DEFAULT.smoothing   # EMA weight of the newest entropy (1 = none)
    horizon: float = _DEFAULT.horizon       # kl-target only
    initial_value: float = field(init=False)
    log_integral: float = field(init=False)
    smoothed: float | None = None
    steps: int = 0
    nan_inputs: int = 0

    @classmethod
    def from_spec(cls, k: KLControlSpec, start: float) -> KLController:
        """The controller supervisor.kl describes, its actuator starting at `start`."""
        target = k.entropy_target if k.mode == "entropy-target" else k.kl_target
        return cls(mode=k.mode, value=start, actuator=k.actuator, target=target,
                   target_relative=k.entropy_target_relative, band=k.band, rate=k.rate, kp=k.kp,
                   coef_min=k.coef_min, coef_max=k.coef_max, smoothing=k.smoothing, horizon=k.horizon)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        if self.actuator not in ACTUATORS:
            raise ValueError(f"actuator must be one of {ACTUATORS}; got {self.actuator!r}")
        if self.mode == "entropy-target" and (self.target is None) == (self.target_relative is None):
            raise ValueError("entropy-target needs exactly one of target and target_relative")
        if self.mode == "kl-target" and self.target is None:
            raise ValueError("kl-target needs target (the KL to hold)")
        self.initial_value = self.value
        self.restore_initial()

    def update(self, entropy: float, kl: float) -> float:
        """After a training step with measured entropy and KL: the actuator's value for the next."""
        self.steps += 1
        signal = entropy if self.mode == "entropy-target" else kl
        if not math.isfinite(signal):
            self.nan_inputs += 1
            return self.value
        if self.mode == "entropy-target":
            if self.target is None:                      # relative target: fixed by the first step
                self.target = self.target_relative * entropy
            self.smoothed = ema(self.smoothed, entropy, self.smoothing)
            self.log_integral, self.value = kl_coef_for_entropy(
                self.log_integral, self.smoothed, self.target, self.band, rate=self.rate, kp=self.kp,
                coef_min=self.coef_min, coef_max=self.coef_max)
        elif self.mode == "kl-target":
            self.value = kl_coef_for_kl(self.value, kl, self.target, horizon=self.horizon,
                                        coef_min=self.coef_min, coef_max=self.coef_max)
        return self.value

    def band_limits(self) -> tuple[float, float] | None:
        if self.mode != "entropy-target" or self.target is None:
            return None
        return entropy_band(self.target, self.band)

    def set_value(self, value: float) -> None:
        """Move the output (and the integral, so the next step goes on from it) to `value`."""
        self.value = min(max(value, self.coef_min), self.coef_max)
        self.log_integral = math.log(self.value)                # coef_min > 0 (the spec's rule)

    def restore_initial(self) -> None:
        """After a reference reset (optional): start again from the initial value."""
        self.value = self.initial_value
        self.log_integral = math.log(min(max(self.value, self.coef_min), self.coef_max))

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, attr) for key, attr in _STATE.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, attr in _STATE.items():
            setattr(self, attr, state[key])
