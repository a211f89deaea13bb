"""The KL-coefficient controller, the reset triggers and overlong handling: hand-computed
values, and the controller's dynamics on a small simulated plant."""
import json
import math
import pickle
import random

import pyarrow as pa
import pytest
import torch

from prorl_actors.algo import (KLController, ResetPolicy, kl_coef_for_entropy, kl_coef_for_kl, kl_share, mask_truncated,
                               overlong_penalty, scale_for_entropy, validation_dropped, validation_stalled)
from prorl_actors.algo.resets import Reason

STEP = dict(rate=0.2, kp=1.0, coef_min=1e-6, coef_max=1.0)
L = math.log(1e-3)


# ------------------------------------------------------------------------------ one step
def test_entropy_step_hand_values():
    # error e = (target - entropy) / band, clipped to [-2, 2]; integral += rate * e; coef = exp(integral + kp * e)
    li, c = kl_coef_for_entropy(L, 1.0, 1.0, 0.1, **STEP)                  # on target: the integral's value
    assert li == L and c == pytest.approx(1e-3)
    li, c = kl_coef_for_entropy(L, 1.05, 1.0, 0.1, **STEP)                 # half a band above the target
    assert li == pytest.approx(L - 0.1) and c == pytest.approx(1e-3 * math.exp(-0.1 - 0.5))
    li, c = kl_coef_for_entropy(L, 0.85, 1.0, 0.1, **STEP)                 # 1.5 bands below
    assert li == pytest.approx(L + 0.3) and c == pytest.approx(1e-3 * math.exp(0.3 + 1.5))
    li, c = kl_coef_for_entropy(L, 0.2, 1.0, 0.1, **STEP)                  # far below: the error clips at 2
    assert li == pytest.approx(L + 0.4) and c == pytest.approx(1e-3 * math.exp(0.4 + 2.0))
    li, c = kl_coef_for_entropy(L, 1.15, 1.0, 0.1, **STEP)
    assert li == pytest.approx(L - 0.3) and c == pytest.approx(1e-3 * math.exp(-0.3 - 1.5))


def test_entropy_step_bounds_and_nan():
    li, c = kl_coef_for_entropy(math.log(0.9), 0.0, 1.0, 0.1, **STEP)      # capped at coef_max, no wind-up
    assert c == 1.0 and li == 0.0
    li, c = kl_coef_for_entropy(math.log(1e-6), 5.0, 1.0, 0.1, **STEP)     # floored at coef_min
    assert c == 1e-6 and li == pytest.approx(math.log(1e-6))
    assert kl_coef_for_entropy(L, math.nan, 1.0, 0.1, **STEP) == (L, pytest.approx(1e-3))
    assert kl_coef_for_entropy(L, math.inf, 1.0, 0.1, **STEP) == (L, pytest.approx(1e-3))


def test_kl_target_step_hand_values():
    assert kl_coef_for_kl(0.1, 0.15, 0.1, horizon=10) == pytest.approx(0.1 * (1 + 0.2 / 10))   # error clipped at 0.2
    assert kl_coef_for_kl(0.1, 0.09, 0.1, horizon=10) == pytest.approx(0.1 * (1 - 0.1 / 10))
    assert kl_coef_for_kl(0.1, 0.0, 0.1, horizon=10, n_steps=5) == pytest.approx(0.1 * (1 - 0.2 * 5 / 10))
    assert kl_coef_for_kl(0.1, math.nan, 0.1, horizon=10) == 0.1
    assert kl_coef_for_kl(0.1, 1.0, 0.1, horizon=1, coef_max=0.11) == 0.11


# ------------------------------------------------------------------------------ dynamics
def _plant(ctrl: KLController, steps: int, h0: float, drift: float, gain: float, noise: float = 0.0,
           measurement_noise: float = 0.0, seed: int = 0):
    """Entropy falls by `drift` a step and the KL penalty lifts it by gain * coef (+ process
    noise); the controller sees it with measurement noise."""
    rng = random.Random(seed)
    h, hs, coefs = h0, [], []
    for _ in range(steps):
        hs.append(h)
        coefs.append(ctrl.update(h + rng.gauss(0.0, measurement_noise), kl=0.0))
        h = h - drift + gain * ctrl.value + rng.gauss(0.0, noise)
    return hs, coefs


def _in_band(ctrl, hs):
    low, high = ctrl.band_limits()
    return sum(low <= h <= high for h in hs) / len(hs)


def test_step_response_settles_in_the_band():
    ctrl = KLController(mode="entropy-target", value=1e-4, target=1.0, band=0.05)
    hs, coefs = _plant(ctrl, 300, h0=1.2, drift=0.01, gain=1.0)   # equilibrium coefficient 0.01
    assert _in_band(ctrl, hs[100:]) >= 0.9
    assert abs(sum(hs[150:]) / len(hs[150:]) - 1.0) < 0.01          # on the target, not at an edge of the band
    assert coefs[-1] == pytest.approx(0.01, rel=0.5)
    assert max(coefs[150:]) / min(coefs[150:]) < 1.5                # settled, not cycling


def test_integral_action_alone_would_oscillate():
    """The reason for the proportional term: with kp = 0 the same loop cycles for ever."""
    ctrl = KLController(mode="entropy-target", value=1e-4, target=1.0, band=0.05, kp=0.0)
    hs, coefs = _plant(ctrl, 300, h0=1.2, drift=0.01, gain=1.0)
    assert _in_band(ctrl, hs[100:]) < 0.5 and max(coefs[150:]) / min(coefs[150:]) > 100


def test_without_control_entropy_leaves_the_band():
    ctrl = KLController(mode="fixed", value=1e-4)
    hs, coefs = _plant(ctrl, 300, h0=1.0, drift=0.01, gain=1.0)
    assert set(coefs) == {1e-4} and hs[-1] < 0.5


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_runaway_oscillation_under_noise(seed):
    ctrl = KLController(mode="entropy-target", value=1e-3, target=1.0, band=0.05)
    hs, coefs = _plant(ctrl, 600, h0=1.0, drift=0.01, gain=1.0, noise=0.003, measurement_noise=0.02, seed=seed)
    tail = coefs[200:]
    assert max(tail) / min(tail) < 30 and max(tail) < 1.0 and min(tail) > 1e-6   # near 0.01, never pinned
    assert _in_band(ctrl, hs[200:]) >= 0.85


def test_bounds_hold_when_the_target_is_unreachable():
    ctrl = KLController(mode="entropy-target", value=1e-3, target=5.0, band=0.1, coef_max=0.05)
    _, coefs = _plant(ctrl, 100, h0=1.0, drift=0.5, gain=1.0)
    assert max(coefs) == coefs[-1] == 0.05
    ctrl = KLController(mode="entropy-target", value=1e-3, target=0.1, band=0.01, coef_min=1e-5)
    _, coefs = _plant(ctrl, 100, h0=3.0, drift=0.0, gain=1.0)
    assert coefs[-1] == 1e-5


def test_nan_entropy_is_counted_and_ignored():
    ctrl = KLController(mode="entropy-target", value=1e-3, target=1.0, band=0.05)
    ctrl.update(0.5, 0.0)
    before = (ctrl.value, ctrl.smoothed)
    assert ctrl.update(math.nan, 0.0) == before[0] and ctrl.smoothed == before[1] and ctrl.nan_inputs == 1
    ctrl.update(0.5, 0.0)
    assert ctrl.value > before[0] and math.isfinite(ctrl.smoothed)


def test_relative_target_and_state_round_trip():
    ctrl = KLController(mode="entropy-target", value=1e-3, target_relative=0.8, band=0.05)
    ctrl.update(1.5, 0.0)
    assert ctrl.target == pytest.approx(1.2)
    state = ctrl.state_dict()
    a = [ctrl.update(h, 0.0) for h in (1.1, 1.0, 1.3)]
    fresh = KLController(mode="entropy-target", value=0.5, target_relative=0.8, band=0.05)
    fresh.load_state_dict(state)
    assert [fresh.update(h, 0.0) for h in (1.1, 1.0, 1.3)] == a
    fresh.restore_initial()
    assert fresh.value == 1e-3


def test_scale_for_entropy_bisects_and_clamps():
    """Bumpless transfer at a reset: the reference's temperature scale for a given entropy."""
    calls = []

    def entropy_at(s):          # a two-token distribution with logits (0, -1/s): entropy rises with s
        calls.append(s)
        p = 1 / (1 + math.exp(-1 / s))
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))
    want = entropy_at(1.3)
    s = scale_for_entropy(entropy_at, want, 0.5, 2.0, iters=20)
    assert s == pytest.approx(1.3, rel=1e-4) and len(calls) == 1 + 2 + 20
    assert scale_for_entropy(entropy_at, entropy_at(0.4), 0.5, 2.0) == 0.5       # out of reach: the bounds
    assert scale_for_entropy(entropy_at, math.log(2), 0.5, 2.0) == 2.0
    ctrl = KLController(mode="entropy-target", value=1.0, target=0.2, band=0.01, coef_min=0.8, coef_max=1.5)
    ctrl.set_value(2.0)
    assert ctrl.value == 1.5 and ctrl.log_integral == pytest.approx(math.log(1.5))
    ctrl.set_value(1.2)   # the integral goes on from the value set: at the target only kp * e = 0 is added
    assert ctrl.update(0.2, 0.0) == pytest.approx(1.2)


def test_fixed_mode_never_moves_and_bad_settings_fail():
    ctrl = KLController(mode="fixed", value=1e-4)
    assert [ctrl.update(h, 1.0) for h in (0.1, 5.0, math.nan)] == [1e-4] * 3
    with pytest.raises(ValueError, match="exactly one"):
        KLController(mode="entropy-target", target=1.0, target_relative=0.5)
    with pytest.raises(ValueError, match="kl-target needs target"):
        KLController(mode="kl-target")


# ------------------------------------------------------------------------------ reset triggers
def test_validation_triggers_hand_values():
    assert validation_stalled([0.3, 0.4, 0.39, 0.38, 0.4], patience=3)
    assert not validation_stalled([0.3, 0.4, 0.39, 0.38, 0.41], patience=3)
    assert validation_stalled([0.3, 0.4, 0.39, 0.38, 0.41], patience=3, min_delta=0.02)
    assert not validation_stalled([0.4, 0.3, 0.3], patience=3)          # not enough history
    assert validation_dropped([0.5, 0.6, 0.45], max_drop=0.1)
    assert not validation_dropped([0.5, 0.6, 0.55], max_drop=0.1)
    assert kl_share(-0.02, 0.5, 0.1) == pytest.approx(0.05 / 0.07)
    assert kl_share(0.0, 0.0, 0.0) == 0.0


def test_scheduled_and_min_gap():
    p = ResetPolicy(triggers=("scheduled",), every_steps=5)
    assert [s for s in range(1, 12) if p.due(s) and not p.record(s, "scheduled")] == [5, 10]
    assert p.events == [(5, "scheduled"), (10, "scheduled")]
    p = ResetPolicy(triggers=("kl",), max_kl_share=0.5, min_gap=4)
    p.record(10, "x")
    assert [p.due(s, pg_loss=0.01, kl=1.0, kl_coef=1.0) for s in (11, 12, 13)] == [None] * 3
    assert p.due(14, pg_loss=0.01, kl=1.0, kl_coef=1.0) == "KL share of the loss above 0.5"


def test_validation_trigger_counts_evaluations_since_the_last_reset():
    p = ResetPolicy(triggers=("validation",), patience=2, max_drop=0.2)
    for v in (0.3, 0.5, 0.45):
        p.observe_validation(v)
    assert p.due(30) is None
    p.observe_validation(0.5)
    assert p.due(40) == "validation stalled for 2 evaluations"
    p.record(40, p.due(40))
    assert p.val_since_reset == [] and p.due(41) is None
    for v in (0.6, 0.35):
        p.observe_validation(v)
    assert p.due(50) == "validation dropped by more than 0.2"
    p.observe_validation(math.nan)                      # a failed evaluation is not a value
    assert p.val_since_reset == [0.6, 0.35]


def test_kl_ceiling_needs_m_steps_in_a_row():
    p = ResetPolicy(triggers=("kl",), kl_ceiling=0.1, kl_steps=3)
    for kl, expect in ((0.2, None), (0.3, None), (math.nan, None), (0.2, None), (0.2, None),
                       (0.2, "KL above 0.1 for 3 steps")):
        p.observe_step(kl)
        assert p.due(5, kl=kl) == expect
    state = p.state_dict()
    p.record(6, "kl")
    assert p.kl_streak == 0
    q = ResetPolicy(triggers=("kl",), kl_ceiling=0.1, kl_steps=3)
    q.load_state_dict(state)
    assert q.due(5, kl=0.2) == "KL above 0.1 for 3 steps"
    with pytest.raises(ValueError, match="unknown reset triggers"):
        ResetPolicy(triggers=("weekly",))


def test_a_reset_reason_carries_its_trigger():
    """Each trigger's reason names it as a field; text added later (waits) keeps it."""
    p = ResetPolicy(triggers=("scheduled", "validation", "kl"), every_steps=100, patience=1, kl_ceiling=0.1,
                    kl_steps=1)
    p.observe_validation(0.5)
    p.observe_validation(0.4)
    assert (p.due(2), p.due(2).trigger) == ("validation stalled for 1 evaluations", "validation")
    p.observe_step(kl=0.2)
    p.val_since_reset = []
    assert (p.due(3), p.due(3).trigger) == ("KL above 0.1 for 1 steps", "kl")
    p.recent_entropy = [0.5]
    action, reason = p.decide(3, kl=0.2, entropy_floor=1.0)
    assert action == "wait" and reason.trigger == "kl" and reason.startswith("KL above 0.1 for 1 steps; entropy")
    assert ResetPolicy(every_steps=4).due(4).trigger == "scheduled"
    again = pickle.loads(pickle.dumps(reason))
    assert (again, again.trigger) == (reason, "kl") and json.dumps({"reason": reason}) == json.dumps({"reason": str(reason)})
    with pytest.raises(ValueError, match="unknown reset trigger"):
        Reason("by hand", "by hand")


def test_a_due_reset_waits_for_entropy_then_resets_or_is_skipped():
    p = ResetPolicy(triggers=("scheduled",), every_steps=5, max_wait_steps=3, entropy_window=2)
    decisions = {}
    for step, h in enumerate([1.2, 1.1, 1.0, 0.95, 0.9, 0.9, 1.2, 1.0], start=1):
        p.observe_step(0.0, h)
        decisions[step] = p.decide(step, entropy_floor=1.0)
        if decisions[step] and decisions[step][0] == "reset":
            p.record(step, decisions[step][1])
    # step 5: mean(0.95, 0.9) < 1 -> wait; 6: still; 7: mean(0.9, 1.2) = 1.05 -> reset, saying it waited
    assert decisions[5] == ("wait", "scheduled; entropy 0.925 below 1")  # began at 5: "after waiting 2 steps" at 7
    assert decisions[6][0] == "wait" and decisions[7] == ("reset", "scheduled; after waiting 2 steps for entropy")
    assert p.events == [(7, decisions[7][1])] and p.waiting_since is None and decisions[8] is None
    for step in range(9, 16):                                   # due at 12; waits 12, 13, 14; skipped at 15
        p.observe_step(0.0, 0.5)
        decisions[step] = p.decide(step, entropy_floor=1.0)
    assert [decisions[s][0] if decisions[s] else None for s in range(9, 16)] == [None] * 3 + ["wait"] * 3 + ["skip"]
    assert p.skipped == [(15, "scheduled; entropy outside the window for 3 steps")] and p.num_resets == 1
    assert p.last_reset_step == 15 and p.decide(16, entropy_floor=1.0) is None   # the schedule counts from the skip
    assert p.decide(20, entropy_floor=None) == ("reset", "scheduled")            # no floor: never waits
    p.record(20, "scheduled")
    p.observe_step(0.0, 2.0)                                    # mean(0.5, 2.0) = 1.25: above a ceiling
    assert p.decide(25, entropy_floor=1.0, entropy_ceiling=1.2) == ("wait", "scheduled; entropy 1.25 above 1.2")
    p.observe_step(0.0, 1.0)                                    # mean(2.0, 1.0) = 1.5 still above
    assert p.decide(26, entropy_floor=1.0, entropy_ceiling=1.2)[0] == "wait"
    p.observe_step(0.0, 1.1)
    p.observe_step(0.0, 1.1)
    assert p.decide(27, entropy_floor=1.0, entropy_ceiling=1.2)[0] == "reset"


def test_a_waiting_kl_trigger_that_goes_away_waits_no_more_and_state_round_trips():
    p = ResetPolicy(triggers=("kl",), max_kl_share=0.5)
    p.observe_step(1.0, 0.2)
    assert p.decide(3, pg_loss=0.01, kl=1.0, kl_coef=1.0, entropy_floor=0.3)[0] == "wait" and p.waiting_since == 3
    state = p.state_dict()
    q = ResetPolicy(triggers=("kl",), max_kl_share=0.5)
    q.load_state_dict(state)
    assert (q.waiting_since, q.recent_entropy) == (3, [0.2])
    assert p.decide(4, pg_loss=0.01, kl=0.001, kl_coef=1.0, entropy_floor=0.3) is None and p.waiting_since is None
    p.observe_step(math.nan, math.nan)                          # NaN entropy is left out of the window
    assert p.recent_entropy == [0.2]


def _anchored_plant(wait: bool, seed: int, steps: int = 300):
    """Entropy falls by 0.01 a step; the KL penalty pulls it towards the *reference's*
    entropy, harder the larger the coefficient; scheduled resets move the reference to the
    current policy. Measured with noise, as one batch's entropy is."""
    rng = random.Random(seed)
    ctrl = KLController(mode="entropy-target", value=0.01, target=1.0, band=0.05, coef_min=0.01, coef_max=10.0)
    policy = ResetPolicy(triggers=("scheduled",), every_steps=25)
    h = ref = 1.2
    hs = []
    for step in range(1, steps + 1):
        hs.append(h)
        measured = h + rng.gauss(0.0, 0.02)
        ctrl.update(measured, 0.0)
        policy.observe_step(0.0, measured)
        decision = policy.decide(step, entropy_floor=ctrl.target if wait else None)
        if decision and decision[0] == "reset":
            policy.record(step, decision[1])
            ref = h
        h = ref + (h - ref) * math.exp(-0.5 * ctrl.value) - 0.01 + rng.gauss(0.0, 0.005)
    return _in_band(ctrl, hs[50:]), policy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resets_taken_below_the_target_ratchet_entropy_down_and_waiting_prevents_it(seed):
    waited, policy = _anchored_plant(True, seed)
    not_waited, _ = _anchored_plant(False, seed)
    assert waited >= 0.9 and not_waited < 0.3
    assert policy.num_resets >= 1 and policy.skipped       # some resets happen, some are skipped


# ------------------------------------------------------------------------------ overlong
def test_overlong_penalty_and_mask_hand_values():
    lengths = torch.tensor([5, 6, 7, 8, 10, 12])
    assert overlong_penalty(lengths, max_len=10, buffer=4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_len=10, buffer=0)
    mask = torch.ones(3, 4)                                   # (B, T)
    mask[2, 3] = 0
    out = mask_truncated(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]]


def test_the_supervisor_holds_the_signal_the_spec_names():
    """supervisor.kl.entropy_signal: batch -> the batch's token mean; task_mean -> the tasks'
    entropies weighted by data.tasks' weights (here (1 * 0.2 + 3 * 0.4) / 4 = 0.35, not 0.3)."""
    from types import SimpleNamespace

    from prorl_actors.config import build_spec
    from prorl_actors.runtime.consumer import Consumer
    tasks = [{"name": "a", "dataset": "chain_sum", "weight": 1.0}, {"name": "b", "dataset": "chain_sum", "weight": 3.0}]
    stats = {"entropy": 0.3, "entropy/a": 0.2, "entropy/b": 0.4}
    for signal, want in (("batch", 0.3), ("task_mean", 0.35)):
        spec = build_spec({"data": {"tasks": tasks}, "supervisor": {"kl": {"entropy_signal": signal}}})
        assert Consumer.entropy_signal(SimpleNamespace(spec=spec), stats) == pytest.approx(want)


def test_the_reference_is_skipped_only_when_nothing_reads_the_kl():
    from types import SimpleNamespace

    from prorl_actors.config import build_spec
    from prorl_actors.runtime.consumer import Consumer
    cases = [({"kl": {"mode": "fixed", "coef": 0.0}}, False),                          # beta 0: no pass
             ({"kl": {"mode": "fixed", "coef": 1e-4}}, True),
             ({"kl": {"mode": "fixed", "coef": 0.0}, "resets": {"triggers": ["kl"], "kl_ceiling": 0.1}}, True),
             ({"kl": {"mode": "kl-target", "coef": 0.0, "kl_target": 0.01}}, True),
             ({"kl": {"mode": "entropy-target", "coef": 0.0, "entropy_target": 0.3}}, True)]
    for sup, needed in cases:
        spec = build_spec({"supervisor": sup})
        assert Consumer.reference_needed(SimpleNamespace(spec=spec)) is needed, sup


def test_trainable_batch_advantages_then_truncated_rows_leave():
    """Under overlong mask the truncated responses count in their group's advantages, then leave
    the batch before the reference and the learner; soft_punish shapes the rewards instead."""
    from prorl_actors import batch as rb
    from prorl_actors.config import build_spec
    from prorl_actors.runtime.consumer import trainable_batch
    t = rb.make_rollouts(prompt_ids=[[1]] * 4, response_ids=[[5, 6], [5, 6, 7, 8], [5], [5, 6, 7, 8]],
                        sample_logp=[[0.0, 0.0], [0.0] * 4, [0.0], [0.0] * 4], response_text=[""] * 4,
                        task=["t"] * 4, item_index=[0] * 4, reference=["{}"] * 4, group_id=[0, 0, 1, 1],
                        truncated=[False, True, False, True], policy_version=[0] * 4)
    t = rb.with_column(t, rb.REWARD, [1.0, 0.0, 0.0, 1.0])
    t = rb.with_column(rb.with_column(t, rb.VERIFY_ERROR, [False] * 4), rb.VERIFY_TIMEOUT, [False] * 4)
    base = {"generator": {"num_samples_per_prompt": 2, "max_new_tokens": 4}}
    masked, figures = trainable_batch(t, build_spec({**base, "algorithm": {"overlong": {"mode": "mask"}}}))
    assert figures == {"unverified_rows": 0}
    s = 1 / math.sqrt(0.5)                     # (r - mean) / unbiased std of {0, 1}
    assert masked[rb.ADV].to_pylist() == pytest.approx([0.5 * s, -0.5 * s], rel=1e-5)   # rows 0, 2 stay (std + 1e-6)
    assert masked[rb.GROUP_ID].to_pylist() == [0, 1] and rb.group_bounds(masked).tolist() == [0, 1, 2]
    kept, _ = trainable_batch(t, build_spec(base))
    assert kept.num_rows == 4 and kept[rb.ADV].to_pylist() == pytest.approx([0.5 * s, -0.5 * s, -0.5 * s, 0.5 * s], rel=1e-5)
    soft, figures = trainable_batch(t, build_spec({**base, "algorithm": {"overlong": {"mode": "soft_punish",
                                                                                       "buffer_tokens": 2}}}))
    # lengths 2, 4, 1, 4 against a ramp over the last 2 tokens before 4: penalties 0, -1, 0, -1
    assert soft[rb.ADV].to_pylist() == pytest.approx([0.5 * s, -0.5 * s, 0.0, 0.0], rel=1e-5)
    assert figures == {"overlong_penalty": -0.5, "unverified_rows": 0}
    # a verification that raised is no reward: its row leaves, its group has no baseline left
    failed = rb.with_column(t, rb.VERIFY_ERROR, [False, False, True, False])
    out, figures = trainable_batch(failed, build_spec(base))
    assert out[rb.GROUP_ID].to_pylist() == [0, 0, 1] and figures["unverified_rows"] == 1
    assert out[rb.ADV].to_pylist() == pytest.approx([0.5 * s, -0.5 * s, 0.0], rel=1e-5)


def test_a_failed_generation_is_rows_that_count_and_never_train():
    """A chunk whose generation raised on every try: G rows per prompt with no response and no
    reward, marked GENERATE_ERROR; valid_rows leaves them out (of baselines, filter and loss)
    while a row whose generation worked stays in; a group without two valid rows is not kept."""
    from prorl_actors import batch as rb
    from prorl_actors.algo import informative_groups
    from prorl_actors.runtime.rows import failed_generation, valid_rows
    prompts = pa.table({rb.PROMPT_IDS: pa.array([[1, 2], [3]], pa.list_(pa.int32())), rb.TASK: ["a", "b"],
                        rb.ITEM_INDEX: pa.array([4, 5], pa.int64()), rb.REFERENCE: ["{}", "{}"],
                        rb.GROUP_ID: pa.array([7, 8], pa.int64())})
    rows = failed_generation(prompts, 3, version=2)
    assert rows.num_rows == 6 and rows[rb.GROUP_ID].to_pylist() == [7, 7, 7, 8, 8, 8]
    assert rows[rb.TASK].to_pylist() == ["a"] * 3 + ["b"] * 3 and rows[rb.POLICY_VERSION].to_pylist() == [2] * 6
    assert rows[rb.RESPONSE_IDS].to_pylist() == [[]] * 6 and rows[rb.REWARD].to_pylist() == [0.0] * 6
    assert rows[rb.GENERATE_ERROR].to_pylist() == [True] * 6 and not valid_rows(rows).any()
    rb.check_batch(rows)
    ok = rb.with_column(rows, rb.GENERATE_ERROR, [False, True, True, False, False, False])
    ok = rb.with_column(ok, rb.REWARD, [1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    assert valid_rows(ok).tolist() == [True, False, False, True, True, True]
    keep = informative_groups(torch.tensor(ok[rb.REWARD].to_numpy()), 3, valid_rows(ok))
    assert keep.tolist() == [False, True]       # group 7 has one valid row: no baseline, not kept


def test_generation_chunks_fill_the_engine():
    from prorl_actors.engines.generation import generation_chunks
    assert generation_chunks(64, 8, 1, 2, 256) == 1                 # one generator: one call
    assert generation_chunks(64, 8, 2, 2, 256) == 2                 # 512 sequences: 2 x 256, not 4 x 128
    assert generation_chunks(256, 16, 4, 2, 256) == 8               # 4096 sequences: 8 chunks of 512
    assert generation_chunks(8, 8, 4, 2, 256) == 4                  # too few to fill: each generator one share
    assert generation_chunks(3, 8, 4, 2, 256) == 3                  # never more pieces than prompts


def test_mini_batches_are_equal_within_one_group_and_weights_travel_in_the_generators_dtype():
    from types import SimpleNamespace

    from prorl_actors.actors.learner import LearnerActor, _cast
    for n, per in ((64, 32), (50, 32), (7, 3), (3, 8)):
        me = SimpleNamespace(spec=SimpleNamespace(num_prompts_per_mini_batch=per), world_size=1,
                             _same_on_every_rank=lambda p: p)
        mbs = LearnerActor._mini_batches(me, n)
        sizes = [len(m) for m in mbs]
        assert len(mbs) == math.ceil(n / per) and max(sizes) - min(sizes) <= 1 and sum(sizes) == n
        assert sorted(int(g) for m in mbs for g in m) == list(range(n))
    sd = {"w": torch.ones(2, dtype=torch.float32), "step": torch.tensor(3)}
    out = _cast(sd, "bfloat16")
    assert out["w"].dtype == torch.bfloat16 and out["step"].dtype == torch.int64 and _cast(sd, None) is sd
