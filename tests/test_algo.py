"""Tests for prorl_actors.algo against hand-computed values."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from prorl_actors.algo import (AGG_MODES, KL_KINDS, ResetPolicy, aggregate_loss, boundary_verdict, entropy_from_logits,
                               get_adv_estimator, group_advantages, informative_groups, k3_of_log_ratio, kl_penalty,
                               masked_mean, ngrams, novel_ngrams, pass_at_k, pass_at_k_diff, pass_at_k_mean,
                               policy_loss, reset_due)
from tests.conftest import brute_pass_at_k


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


# ---------------------------------------------------------------- advantages


def test_group_advantages_unbiased_std():
    # [1,0,0,0]: mean 0.25, var = (0.75^2 + 3 * 0.25^2) / 3 = 0.75 / 3 = 0.25, std 0.5
    adv = group_advantages(t([1, 0, 0, 0]), group_size=4, eps=0.0)
    assert_close(adv, t([1.5, -0.5, -0.5, -0.5]))
    # the biased std (sqrt(0.1875)) would give 0.75 / 0.4330 = 1.732 instead of 1.5
    assert abs(adv[0].item() - 0.75 / math.sqrt(0.1875)) > 0.2


def test_group_advantages_two_groups_default_eps():
    # group 2 = [1,1,0,0]: mean 0.5, var = 4 * 0.25 / 3 = 1/3
    adv = group_advantages(t([1, 0, 0, 0, 1, 1, 0, 0]), group_size=4)
    s2 = math.sqrt(1 / 3) + 1e-6
    expected = [0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001,
                0.5 / s2, 0.5 / s2, -0.5 / s2, -0.5 / s2]
    assert_close(adv, t(expected))


def test_dr_grpo_no_std():
    adv = group_advantages(t([1, 0, 0, 0, 3, 1]), group_size=2, normalize_std=False)
    assert_close(adv, t([0.5, -0.5, 0.0, 0.0, 1.0, -1.0]))
    assert_close(get_adv_estimator("dr_grpo")(t([1, 0, 0, 0]), 4), t([0.75, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError, match="grpo"):
        get_adv_estimator("ppo")


def test_group_of_size_one_is_zero_not_nan():
    adv = group_advantages(t([0.3, 1.0, 0.0]), group_size=1)
    assert torch.equal(adv, torch.zeros(3))


def test_all_equal_group_is_exactly_zero():
    # 0.1 is not exactly representable: the mean of three 0.1s need not equal 0.1
    adv = group_advantages(t([0.1, 0.1, 0.1, 1.0, 0.0, 0.0]), group_size=3, eps=0.0)
    assert torch.equal(adv[:3], torch.zeros(3))
    # group 2 = [1,0,0]: mean 1/3, var = ((2/3)^2 + 2 * (1/3)^2) / 2 = 1/3
    s = math.sqrt(1 / 3)
    assert_close(adv[3:], t([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s]))


def test_group_advantages_validation():
    with pytest.raises(ValueError):
        group_advantages(t([1, 0, 0]), group_size=2)
    with pytest.raises(ValueError):
        group_advantages(t([1.0, float("nan")]), group_size=2)
    with pytest.raises(ValueError):
        group_advantages(t([[1.0, 0.0]]), group_size=2)


def test_group_advantages_int_rewards():
    assert_close(group_advantages(torch.tensor([1, 0]), 2, eps=0.0), t([0.7071067811865476, -0.7071067811865476]))


# ---------------------------------------------------------------- dynamic sampling


def test_informative_groups():
    r = t([1, 1, 0, 1, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.5, 0.5, 0.5])
    assert informative_groups(r, 4).tolist() == [True, False, False, True]
    assert informative_groups(r, 1).tolist() == [False] * 16
    assert informative_groups(r, 1).dtype == torch.bool
    with pytest.raises(ValueError):
        informative_groups(r, 3)


# ---------------------------------------------------------------- aggregation

LOSS = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", (1 + 2 + 4) / 3),
        ("seq-mean-token-mean", ((1 + 2) / 2 + 4 / 1) / 2),
        ("seq-mean-token-sum", ((1 + 2) + 4) / 2),
        ("seq-mean-token-sum-norm", (1 + 2 + 4) / (2 * 3)),
    ],
)
def test_aggregate_modes(mode, expected):
    mask = t([[1, 1, 0], [1, 0, 0]])
    assert_close(aggregate_loss(t(LOSS), mask, mode), torch.tensor(expected))
    # bool masks work the same
    assert_close(aggregate_loss(t(LOSS), mask.bool(), mode), torch.tensor(expected))


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", 3 / 2),
        ("seq-mean-token-mean", 1.5),  # the empty row is skipped
        ("seq-mean-token-sum", 3.0),  # the empty row is skipped
        ("seq-mean-token-sum-norm", 3 / 6),  # constant divisor B * T
    ],
)
def test_aggregate_fully_masked_row(mode, expected):
    loss = t([[1.0, 2.0, 3.0], [float("inf"), float("nan"), 6.0]])  # garbage under the mask
    mask = t([[1, 1, 0], [0, 0, 0]])
    assert_close(aggregate_loss(loss, mask, mode), torch.tensor(expected))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_all_masked_is_zero_with_graph(mode):
    loss_mat = t(LOSS, requires_grad=True)
    out = aggregate_loss(loss_mat, torch.zeros(2, 3), mode)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss_mat.grad, torch.zeros(2, 3))


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(t(LOSS), torch.ones(2, 3), "mean")


def test_masked_mean():
    assert_close(masked_mean(t([1.0, 2.0, 3.0]), t([1, 0, 1])), torch.tensor(2.0))
    assert masked_mean(t([1.0, 2.0]), t([0, 0])).item() == 0.0
    assert_close(masked_mean(t([[1.0, 3.0], [5.0, 7.0]]), t([[1, 1], [0, 1]]), dim=-1), t([2.0, 7.0]))


# ---------------------------------------------------------------- policy loss

# row 0: adv = +2, ratios 1.5 (clipped high), 1.0, 0.5 (not clipped: adv > 0)
# row 1: adv = -1, ratios 0.5 (clipped low), 1.2, 4.0 (dual clip region for c = 3)
RATIOS = [[1.5, 1.0, 0.5], [0.5, 1.2, 4.0]]
ADV = [2.0, -1.0]
# per-token loss = -min(ratio * adv, clip(ratio, 0.8, 1.4) * adv)
LOSS_NO_DUAL = [[-1.4 * 2, -1.0 * 2, -0.5 * 2], [0.8 * 1, 1.2 * 1, 4.0 * 1]]
LOSS_DUAL3 = [[-2.8, -2.0, -1.0], [0.8, 1.2, 3.0]]  # 4.0 bounded by -c * adv = 3


def _logps():
    logp = torch.log(t(RATIOS)).requires_grad_(True)
    old_logp = torch.zeros(2, 3)
    return logp, old_logp


def test_policy_loss_decoupled_clip_values_and_stats():
    logp, old = _logps()
    loss, stats = policy_loss(logp, old, t(ADV), torch.ones(2, 3))
    assert_close(loss, torch.tensor((-2.8 - 2.0 - 1.0 + 0.8 + 1.2 + 4.0) / 6))
    assert stats["clip_frac_low"] == pytest.approx(1 / 6)
    assert stats["clip_frac_high"] == pytest.approx(1 / 6)
    assert stats["clip_frac"] == pytest.approx(2 / 6)
    assert stats["dual_clip_frac"] == 0.0
    assert stats["ratio_mean"] == pytest.approx((1.5 + 1.0 + 0.5 + 0.5 + 1.2 + 4.0) / 6)
    k3 = [r - 1 - math.log(r) for r in (1.5, 1.0, 0.5, 0.5, 1.2, 4.0)]
    assert stats["approx_kl"] == pytest.approx(sum(k3) / 6, rel=1e-5)
    assert stats["pg_loss"] == pytest.approx(0.2 / 6, rel=1e-4)
    assert all(isinstance(v, float) for v in stats.values())


def test_k3_of_log_ratio_by_hand_and_never_negative_in_rounding():
    # e^0.5 - 1.5 = 0.148721..., e^-0.5 - 0.5 = 0.106531..., 0 at d = 0
    got = k3_of_log_ratio(torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64))
    assert_close(got, torch.tensor([math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5, 0.0], dtype=torch.float64))
    d = torch.linspace(-1e-3, 1e-3, 2001)          # float32: exp(d) - 1 - d is below 0 at 200 of these
    assert ((d.exp() - 1 - d) < 0).any()           # (a CI run's logp_mismatch_k3 was -5e-10)
    assert (k3_of_log_ratio(d) >= 0).all()


def test_policy_loss_gradient_zero_on_clipped_tokens():
    logp, old = _logps()
    loss, _ = policy_loss(logp, old, t(ADV), torch.ones(2, 3))
    loss.backward()
    # d/dlogp of -adv * ratio = -adv * ratio, / 6 tokens; clipped tokens get 0
    expected = t([[0.0, -2.0 * 1.0 / 6, -2.0 * 0.5 / 6], [0.0, 1.2 / 6, 4.0 / 6]])
    assert_close(logp.grad, expected)


def test_policy_loss_dual_clip():
    logp, old = _logps()
    loss, stats = policy_loss(logp, old, t(ADV), torch.ones(2, 3), dual_clip_c=3.0)
    assert_close(loss, torch.tensor((-2.8 - 2.0 - 1.0 + 0.8 + 1.2 + 3.0) / 6))
    assert stats["dual_clip_frac"] == pytest.approx(1 / 6)
    assert stats["clip_frac"] == pytest.approx(2 / 6)
    loss.backward()
    assert logp.grad[1, 2].item() == 0.0  # bounded token: constant -c * adv
    assert_close(logp.grad[1, 1], torch.tensor(1.2 / 6))
    for c in (1.0, 0.5):
        with pytest.raises(ValueError):
            policy_loss(logp, old, t(ADV), torch.ones(2, 3), dual_clip_c=c)


def test_policy_loss_mask_and_agg_and_token_adv():
    logp, old = _logps()
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, stats = policy_loss(logp, old, t(ADV), mask)
    assert_close(loss, torch.tensor((-2.8 - 2.0 - 1.0 + 0.8 + 1.2) / 5))
    assert stats["ratio_mean"] == pytest.approx((1.5 + 1.0 + 0.5 + 0.5 + 1.2) / 5)
    loss_s, _ = policy_loss(logp, old, t(ADV), mask, agg="seq-mean-token-mean")
    assert_close(loss_s, torch.tensor(((-2.8 - 2.0 - 1.0) / 3 + (0.8 + 1.2) / 2) / 2))
    # per-token (B, T) advantages equal to the broadcast ones give the same loss
    loss_t, _ = policy_loss(logp, old, t([[2.0] * 3, [-1.0] * 3]), mask)
    assert_close(loss_t, loss)
    with pytest.raises(ValueError):
        policy_loss(logp, old, t([1.0, 2.0, 3.0]), mask)


def test_policy_loss_custom_eps():
    logp, old = _logps()
    # eps_low = eps_high = 0.1: row 0 token 0 -> -1.1 * 2, row 1 token 0 -> 0.9
    loss, _ = policy_loss(logp, old, t(ADV), torch.ones(2, 3), eps_low=0.1, eps_high=0.1)
    assert_close(loss, torch.tensor((-2.2 - 2.0 - 1.0 + 0.9 + 1.2 + 4.0) / 6))


def test_policy_loss_extreme_log_ratios_finite():
    logp = t([[50.0, -50.0, -50.0, 50.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    adv = t([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 4))
    # tokens: -1.4 (clipped high), 0.8 (clipped low), -exp(-20), exp(20) (adv < 0, huge ratio)
    assert_close(loss, torch.tensor((-1.4 + 0.8 - math.exp(-20) + math.exp(20)) / 4))
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in stats.values())
    loss_d, _ = policy_loss(logp, old, adv, torch.ones(1, 4), dual_clip_c=3.0)
    assert_close(loss_d, torch.tensor((-1.4 + 0.8 - math.exp(-20) + 3.0) / 4))


def test_policy_loss_empty_mask():
    logp, old = _logps()
    loss, stats = policy_loss(logp, old, t(ADV), torch.zeros(2, 3), dual_clip_c=3.0)
    assert loss.item() == 0.0
    assert all(v == 0.0 for v in stats.values())
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))


# ---------------------------------------------------------------- KL


def test_kl_penalty_values():
    ln2 = math.log(2.0)
    logp = t([[0.0, ln2, 0.0]])
    ref = t([[0.0, 0.0, ln2]])
    assert_close(kl_penalty(logp, ref, "k1"), t([[0.0, ln2, -ln2]]))
    assert_close(kl_penalty(logp, ref, "k2"), t([[0.0, 0.5 * ln2**2, 0.5 * ln2**2]]))
    # k3 = ref/pi - log(ref/pi) - 1: ratio 1/2 -> 0.5 + ln2 - 1; ratio 2 -> 2 - ln2 - 1
    assert_close(kl_penalty(logp, ref, "k3"), t([[0.0, ln2 - 0.5, 1.0 - ln2]]))


def test_kl_penalty_extreme_finite():
    logp = t([[50.0, -50.0, 1e-8]])
    ref = t([[0.0, 0.0, 0.0]])
    # log-ratio clamped to +-20
    assert_close(kl_penalty(logp, ref, "k1"), t([[20.0, -20.0, 1e-8]]))
    assert_close(kl_penalty(logp, ref, "k2"), t([[200.0, 200.0, 5e-17]]))
    k3 = kl_penalty(logp, ref, "k3")
    assert torch.isfinite(k3).all() and (k3 >= 0).all()
    assert_close(k3, t([[math.exp(-20) + 20 - 1, math.exp(20) - 20 - 1, 0.0]]))


def test_kl_penalty_unknown_kind_lists_valid():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    assert KL_KINDS == ("k1", "k2", "k3")


def test_kl_term_of_the_loss():
    """The learner's KL term: aggregate_loss(kl_penalty(...)) under the loss's aggregation."""
    ln2 = math.log(2.0)
    logp = t([[ln2, 0.0], [0.0, 0.0]], requires_grad=True)
    ref = t([[0.0, ln2], [ln2, 5.0]])
    mask = t([[1, 1], [1, 0]])
    out = aggregate_loss(kl_penalty(logp, ref, "k1"), mask, "token-mean")
    assert_close(out, torch.tensor((ln2 - ln2 - ln2) / 3))
    out = aggregate_loss(kl_penalty(logp, ref, "k3"), mask, "seq-mean-token-mean")
    # row 0: (ln2 - 0.5 + 1 - ln2) / 2 = 0.25; row 1: 1 - ln2
    assert_close(out, torch.tensor((0.25 + (1 - ln2)) / 2))
    out.backward()
    # d k3 / d logp = 1 - ref/pi; row 0 / (2 tokens * 2 seqs), row 1 / (1 token * 2 seqs)
    assert_close(logp.grad, t([[(1 - 0.5) / 4, (1 - 2.0) / 4], [(1 - 2.0) / 2, 0.0]]))


# ---------------------------------------------------------------- entropy


def test_entropy_from_logits():
    logits = t([[[0.0, 0.0, 0.0, 0.0], [1000.0, 1000.0, -1000.0, -1000.0]],
                [[0.0, 0.0, -math.inf, -math.inf], [3.0, -math.inf, -math.inf, -math.inf]]])
    logits.requires_grad_(True)
    h = entropy_from_logits(logits)
    assert h.shape == (2, 2)
    assert_close(h, t([[math.log(4), math.log(2)], [math.log(2), 0.0]]))
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_two_point():
    # p = (0.25, 0.75): logits log(1), log(3)
    h = entropy_from_logits(t([[[0.0, math.log(3.0)]]]))
    assert_close(h, t([[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]]))


# ---------------------------------------------------------------- pass@k


def test_pass_at_k_brute_force():
    for n in range(1, 8):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k([1] * c + [0] * (n - c), k), abs=1e-12)


def test_pass_at_k_literals_and_types():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c = 1 < k
    assert isinstance(pass_at_k(np.int64(5), np.int32(2), 2), float)
    assert pass_at_k(torch.tensor(5), torch.tensor(2), torch.tensor(2)) == pytest.approx(0.7)
    for args in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


def test_pass_at_k_mean_brute_force_over_prompts():
    # each prompt's samples as a 0/1 list: pass@k over prompts = the chance that a random k-subset of a
    # random prompt's samples holds a correct one, enumerated; the standard error by hand
    prompts = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]]
    for k in range(1, 6):
        per = [brute_pass_at_k(p, k) for p in prompts]
        mean, se = pass_at_k_mean([sum(p) for p in prompts], 5, k)
        assert mean == pytest.approx(np.mean(per), abs=1e-12)
        assert se == pytest.approx(np.std(per, ddof=1) / 2, abs=1e-12)   # sqrt(4 prompts) = 2
    assert pass_at_k_mean([3], 8, 2) == (pytest.approx(1 - 10 / 28), 0.0)   # one prompt: no spread
    with pytest.raises(ValueError):
        pass_at_k_mean([], 8, 2)


def test_pass_at_k_diff_is_paired():
    # the same prompts, each one a little easier for the model: the per-prompt differences (pass@2 with n = 4)
    base, model = [0, 1, 2, 4], [1, 2, 3, 4]
    d = [pass_at_k(4, a, 2) - pass_at_k(4, b, 2) for a, b in zip(model, base)]   # 1/2, 1/3, 1/6, 0
    mean, se = pass_at_k_diff(model, base, 4, 2)
    assert mean == pytest.approx(0.25) and se == pytest.approx(np.std(d, ddof=1) / 2)
    # far below the unpaired error, which carries the spread of difficulty over prompts
    assert se < 0.5 * math.hypot(pass_at_k_mean(model, 4, 2)[1], pass_at_k_mean(base, 4, 2)[1])
    with pytest.raises(ValueError):
        pass_at_k_diff([1, 2], [1], 4, 2)


def test_boundary_verdicts():
    assert boundary_verdict((0.0, 0.0), (0.10, 0.01), 0.02, 2.0, 48) == "expands"     # the largest k decides first
    assert boundary_verdict((0.30, 0.01), (-0.05, 0.01), 0.02, 2.0, 48) == "shrinks"  # better pass@1, narrower boundary
    assert boundary_verdict((0.30, 0.01), (0.01, 0.0), 0.02, 2.0, 48) == "sharpens"
    assert boundary_verdict((-0.10, 0.01), (0.0, 0.0), 0.02, 2.0, 48) == "dulls"
    assert boundary_verdict((0.02, 0.0), (-0.02, 0.0), 0.02, 2.0, 48) == "unchanged"  # within the margin, both ends
    # 0.06 is past the margin but within 2 standard errors of 0.035: noise, not a narrower boundary
    assert boundary_verdict((0.40, 0.05), (-0.06, 0.035), 0.02, 2.0, 48) == "sharpens"
    assert boundary_verdict((0.40, 0.05), (-0.06, 0.035), 0.02, 1.0, 48) == "shrinks"
    assert boundary_verdict((0.40, 0.0), (0.5, 0.0), 0.02, 2.0, 1) == "too few prompts"   # no spread to judge by


def test_novel_ngrams_by_hand():
    assert ngrams("\\boxed{12}", 2) == {("\\", "boxed"), ("boxed", "{"), ("{", "12"), ("12", "}")}
    assert ngrams("a b", 3) == set()
    # 3-grams of "x y z w": xyz, yzw; the base said "x y z" somewhere: 1 of 2 novel. "a a a a" has one
    # distinct 3-gram (a a a), novel; "q" has none and does not count
    assert novel_ngrams(["x y z w", "a a a a", "q"], ["u x y z", "v"], 3) == (2, 3)
    assert novel_ngrams(["x y z"], [], 3) == (1, 1)


# ---------------------------------------------------------------- resets


def test_scheduled_resets():
    r = ResetPolicy(triggers=("scheduled",), every_steps=3)
    assert [r.due(s) for s in (1, 2, 3)] == [None, None, "scheduled"]
    r.record(3, "scheduled")
    assert [r.due(s) for s in (4, 5, 6)] == [None, None, "scheduled"]
    r.record(5, "validation")  # a triggered reset restarts the count
    assert r.due(7) is None and r.due(8) == "scheduled"
    state = r.state_dict()
    assert state["last_reset_step"] == 5 and state["num_resets"] == 2
    assert state["events"] == [[3, "scheduled"], [5, "validation"]]
    r2 = ResetPolicy(triggers=("scheduled",), every_steps=3)
    r2.load_state_dict(state)
    assert r2 == r


def test_resets_never_and_validation():
    for r in (ResetPolicy(triggers=("scheduled",), every_steps=0), ResetPolicy(triggers=())):
        assert not any(r.due(s) for s in range(1, 100))
    assert reset_due(4, every_steps=2, last_reset_step=2) is True
    assert reset_due(3, every_steps=2, last_reset_step=2) is False
    with pytest.raises(ValueError):
        ResetPolicy(every_steps=-1)
    with pytest.raises(ValueError):
        r.due(0)


def test_mixture_entropy_hand_values():
    """Tasks' entropies weighted by the mixture: (1 * 0.1 + 3 * 0.4) / 4 = 0.325, whatever the
    batch's mix; unmeasured (NaN) or unknown tasks are left out; none measured gives NaN."""
    from prorl_actors.algo import mixture_entropy
    w = {"a": 1.0, "b": 3.0, "c": 1.0}
    assert mixture_entropy({"a": 0.1, "b": 0.4}, w) == pytest.approx(0.325)
    assert mixture_entropy({"a": 0.1, "b": 0.4, "c": math.nan, "held_out": 9.0}, w) == pytest.approx(0.325)
    assert mixture_entropy({"a": 0.1}, w) == pytest.approx(0.1)
    assert math.isnan(mixture_entropy({"c": math.nan}, w)) and math.isnan(mixture_entropy({}, w))
