"""Tests for prorl_actors.algo against hand-computed values."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from tests.conftest import brute_pass_at_k

from prorl_actors.algo import (
    AGG_MODES,
    KL_KINDS,
    ResetPolicy,
    aggregate_loss,
    entropy_from_logits,
    get_adv_estimator,
    group_advantages,
    informative_groups,
    k3_of_log_ratio,
    kl_penalty,
    masked_mean,
    boundary_verdict,
    ngrams,
    novel_ngrams,
    pass_at_k,
    pass_at_k_diff,
    pass_at_k_mean,
    policy_loss,
    reset_due,
)


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


# ---------------------------------------------------------------- the learner's fused, flat math


def test_k3_is_capped_and_its_gradient_is_zero_above_the_cap():
    logp = t([[0.0, 0.0, math.log(0.5)]], requires_grad=True)
    ref = t([[15.0, 1.0, 0.0]])                  # ref/pi = e^15, e, 2
    k3 = kl_penalty(logp, ref, "k3", k3_cap=10.0)
    e = math.e
    assert_close(k3, t([[10.0, e - 1 - 1, 2 - math.log(2) - 1]]))
    k3.sum().backward()
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() == pytest.approx(1 - e)
    assert_close(kl_penalty(logp, ref, "k1", k3_cap=0.5), kl_penalty(logp, ref, "k1"))   # k3 only


def test_loss_row_scale_hand_values_and_any_split_sums_to_the_aggregate():
    from prorl_actors.algo import loss_row_scale
    lengths = torch.tensor([3, 2, 0])
    assert_close(loss_row_scale(lengths, "token-mean"), t([1 / 5, 1 / 5, 0]))
    assert_close(loss_row_scale(lengths, "seq-mean-token-mean"), t([1 / 6, 1 / 4, 0]))
    assert_close(loss_row_scale(lengths, "seq-mean-token-sum"), t([1 / 2, 1 / 2, 0]))
    assert_close(loss_row_scale(lengths, "seq-mean-token-sum-norm", norm_len=4), t([1 / 12, 1 / 12, 0]))
    with pytest.raises(ValueError, match="token-mean"):
        loss_row_scale(lengths, "sum")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g)
    mask = (torch.rand(7, 5, generator=g) > 0.4).float()
    mask[3] = 0
    for mode in AGG_MODES:
        scale = loss_row_scale(mask.sum(1), mode, norm_len=5)                     # (B,)
        whole = aggregate_loss(x, mask, mode)
        parts = sum((scale[rows, None] * x[rows] * mask[rows]).sum() for rows in ([0, 5], [1, 2, 3], [4, 6]))
        assert_close(parts, whole, msg=mode)


def test_clipped_surrogate_on_flat_tokens_is_policy_loss_per_token():
    from prorl_actors.algo import clipped_surrogate
    logp, old = _logps()
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, stats = policy_loss(logp, old, t(ADV), mask)
    m = mask.bool()
    adv_tok = t(ADV)[:, None].expand(2, 3)[m]
    pg, ratio, log_ratio, low, high, dual = clipped_surrogate(logp[m], old[m], adv_tok)      # (5,)
    assert_close(pg.mean(), loss)
    # ratio 1.5 with adv 2 is clipped high, ratio 0.5 with adv -1 clipped low: one each of 5 tokens
    assert low.float().mean().item() == pytest.approx(stats["clip_frac_low"]) == pytest.approx(1 / 5)
    assert high.float().mean().item() == pytest.approx(stats["clip_frac_high"]) == pytest.approx(1 / 5)
    assert (ratio - 1 - log_ratio).mean().item() == pytest.approx(stats["approx_kl"], rel=1e-5)


def test_token_logp_entropy_by_hand_and_chunked_equals_plain():
    from prorl_actors.algo import token_logp_entropy
    # one position, logits (0, ln 3, -inf) at T = 1: p = (1/4, 3/4, 0)
    w = t([[0.0], [math.log(3.0)], [-math.inf]])                                   # (V=3, H=1) head weight
    head = lambda h: h @ w.T                                                        # noqa: E731
    logp, ent = token_logp_entropy(head, t([[1.0]]), torch.tensor([1]), 1.0, chunk_tokens=8)
    assert_close(logp, t([math.log(0.75)]))
    assert_close(ent, t([-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]))
    # at T = 2 the logits halve: p = (1, sqrt 3) / (1 + sqrt 3)
    logp, _ = token_logp_entropy(head, t([[1.0]]), torch.tensor([0]), 2.0, chunk_tokens=8)
    assert_close(logp, t([-math.log(1 + math.sqrt(3.0))]))
    # chunked (with recomputation in backward) = one chunk = log_softmax + entropy_from_logits
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(6, 11, bias=False)
    hidden0 = torch.randn(10, 6, generator=g)
    tokens = torch.randint(0, 11, (10,), generator=g)
    grads = []
    for chunk in (None, 10, 3, 1):
        lin.zero_grad()
        hidden = hidden0.clone().requires_grad_(True)
        if chunk is None:
            logits = lin(hidden) / 1.3
            logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
            ent = entropy_from_logits(logits)
        else:
            logp, ent = token_logp_entropy(lin, hidden, tokens, 1.3, chunk_tokens=chunk, entropy_grad=True)
        (logp * torch.arange(10) - 0.7 * ent).sum().backward()
        grads.append((logp.detach(), ent.detach(), hidden.grad, lin.weight.grad.clone()))
    for got in grads[1:]:
        for a, b in zip(got, grads[0]):
            assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the entropy only reported: no gradient through it
    hidden = hidden0.clone().requires_grad_(True)
    _, ent = token_logp_entropy(lin, hidden, tokens, 1.3, chunk_tokens=3)
    assert not ent.requires_grad


def test_round_size_fills_with_the_asked_confidence():
    from prorl_actors.algo import KeepRate, round_size
    assert round_size(10, 1.0, 0.9, 4.0) == 10          # everything kept: ask for what is missing
    assert round_size(10, 0.5, 0.5, 4.0) == 19          # binomial median: P(Bin(19, 1/2) >= 10) = 1/2
    assert round_size(5, 0.01, 0.9, 4.0) == 20          # capped at max_oversample x missing
    assert round_size(0, 0.5, 0.9, 4.0) == 0

    def p_fill(n, q, m):   # exact P(Bin(n, q) >= m)
        return sum(math.comb(n, k) * q ** k * (1 - q) ** (n - k) for k in range(m, n + 1))

    for m, q in ((64, 0.82), (64, 0.5), (12, 0.7), (200, 0.3)):
        n = round_size(m, q, 0.9, 8.0)
        assert 0.86 < p_fill(n, q, m) and p_fill(n - 2, q, m) < 0.9, (m, q, n)
    rate = KeepRate(decay=0.5)
    assert rate.rate == 1.0
    rate.observe(8, 10)
    rate.observe(2, 10)                                   # (0.5 * 8 + 2) / (0.5 * 10 + 10)
    assert rate.rate == pytest.approx(6 / 15)
    again = KeepRate(decay=0.5)
    again.load_state_dict(rate.state_dict())
    assert again.rate == rate.rate


def test_token_objective_by_hand():
    from prorl_actors.algo import token_objective
    logp = torch.log(t([1.5, 0.5])).requires_grad_(True)          # ratios to old_logp = 0
    ln2 = math.log(2.0)
    ref = t([math.log(1.5), math.log(0.5) + ln2])                   # k3: 0, then 2 - ln 2 - 1
    loss, terms = token_objective(logp, torch.zeros(2), t([2.0, -1.0]), t([0.5, 0.5]), ref, t([1.0, 2.0]),
                                  kl_coef=0.1, entropy_coef=0.01)
    # surrogate: -min(1.5 * 2, 1.4 * 2) = -2.8; -min(0.5 * -1, 0.8 * -1) = 0.8
    want = 0.5 * -2.8 + 0.5 * 0.8 + 0.1 * 0.5 * (1 - ln2) - 0.01 * (0.5 * 1.0 + 0.5 * 2.0)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert terms["clip_high"].tolist() == [True, False] and terms["clip_low"].tolist() == [False, True]
    assert_close(terms["kl"], t([0.0, 1 - ln2]))
    no_ref, terms = token_objective(logp, torch.zeros(2), t([2.0, -1.0]), t([0.5, 0.5]))
    assert no_ref.item() == pytest.approx(0.5 * -2.8 + 0.5 * 0.8) and "kl" not in terms


# ---------------------------------------------------------------- off-policy correction
def _r_table():
    """Two sequences, r = pi_learner / pi_sampler per token: row 0 (2, 1/2, 1), row 1 (1/8, 1, pad)."""
    sample = torch.log(t([[0.25, 0.5, 0.5], [0.5, 0.25, 0.9]]))
    old = torch.log(t([[0.5, 0.25, 0.5], [0.0625, 0.25, 0.1]]))
    mask = t([[1, 1, 1], [1, 1, 0]])
    return old, sample, mask


@pytest.mark.parametrize("mode, low, high, want", [
    ("none", 0.5, 5.0, [[1, 1, 1], [1, 1, 0]]),
    ("tis", 0.5, 1.5, [[1.5, 0.5, 1], [0.125, 1, 0]]),                 # min(r, 1.5)
    ("icepop", 0.5, 1.5, [[0, 0.5, 1], [0, 1, 0]]),                   # r inside [0.5, 1.5], else 0
    ("icepop", 0.1, 2.0, [[2, 0.5, 1], [0.125, 1, 0]]),               # bounds inclusive
    # row 0's geometric mean (2 * 1/2 * 1)^(1/3) = 1 stays (tokens truncated at 1.5); row 1's
    # (1/8 * 1)^(1/2) = 0.354 < 0.5: the whole row goes
    ("seq_mask_tis", 0.5, 1.5, [[1.5, 0.5, 1], [0, 0, 0]]),
    ("seq_mask_tis", 0.3, 1.5, [[1.5, 0.5, 1], [0.125, 1, 0]]),
])
def test_off_policy_weights_by_hand(mode, low, high, want):
    from prorl_actors.algo import off_policy_weights
    old, sample, mask = _r_table()
    w, st = off_policy_weights(old, sample, mask, mode, low, high)
    assert_close(w, t(want))
    assert not w.requires_grad
    assert st["is_weight_mean"].item() == pytest.approx(sum(map(sum, want)) / 5)
    assert st["is_masked_frac"].item() == pytest.approx(sum(x == 0 for row in want for x in row[:3]) / 5 - 1 / 5)
    # k3 = r - 1 - log r over the 5 real tokens; |log r| > log 2 only for 1/8 (2 is exactly log 2)
    k3 = [r - 1 - math.log(r) for r in (2, 0.5, 1, 0.125, 1)]
    assert st["logp_mismatch_k3"].item() == pytest.approx(sum(k3) / 5, rel=1e-5)
    assert st["logp_gap_max"].item() == pytest.approx(math.log(8), rel=1e-5)
    assert st["logp_gap_over_log2_frac"].item() == pytest.approx(1 / 5)


def test_off_policy_weights_flat_equal_padded_and_reject_bad_input():
    from prorl_actors.algo import off_policy_weights, token_weights
    old, sample, mask = _r_table()
    m = mask.bool()
    for mode in ("tis", "icepop", "seq_mask_tis"):
        w, _ = off_policy_weights(old, sample, mask, mode, 0.5, 1.5)
        flat, _ = token_weights(old[m], sample[m], t([7, 7, 7, 3, 3]).long(), mode, 0.5, 1.5)   # any row ids
        assert_close(flat, w[m])
    with pytest.raises(ValueError, match="valid: \\['none', 'tis', 'icepop', 'seq_mask_tis'\\]"):
        off_policy_weights(old, sample, mask, "is")
    with pytest.raises(ValueError, match="need 0 <= low <= 1 <= high"):
        off_policy_weights(old, sample, mask, "tis", 0.5, 0.9)
    with pytest.raises(ValueError, match="must all be \\(B, T\\)"):
        off_policy_weights(old, sample[:, :2], mask)


def test_token_objective_weights_only_the_policy_gradient_term():
    """Decoupled PPO: the correction multiplies the clipped surrogate (whose ratio stays pi / pi_old),
    not the KL penalty or the entropy bonus."""
    from prorl_actors.algo import token_objective
    logp = torch.log(t([1.5, 0.5])).requires_grad_(True)
    ref = t([math.log(1.5), math.log(0.5) + math.log(2.0)])
    kw = dict(kl_coef=0.1, entropy_coef=0.01)
    base, _ = token_objective(logp, torch.zeros(2), t([2.0, -1.0]), t([0.5, 0.5]), ref, t([1.0, 2.0]), **kw)
    loss, terms = token_objective(logp, torch.zeros(2), t([2.0, -1.0]), t([0.5, 0.5]), ref, t([1.0, 2.0]),
                                  t([0.5, 0.0]), **kw)
    # pg terms -2.8 and 0.8 become -1.4 and 0: the loss moves by 0.5 * (1.4 + -0.8)
    assert loss.item() == pytest.approx(base.item() + 0.5 * 1.4 - 0.5 * 0.8, rel=1e-5)
    assert_close(terms["pg"].detach(), t([-1.4, 0.0]))
    loss.backward()
    g = logp.grad.clone()
    logp.grad = None
    kl_only, _ = token_objective(logp, torch.zeros(2), t([2.0, -1.0]), t([0.5, 0.5]), ref, t([1.0, 2.0]),
                                 t([0.0, 0.0]), **kw)
    kl_only.backward()
    assert logp.grad[1].item() == pytest.approx(g[1].item())        # token 2: weight 0 leaves the KL's gradient


# ---------------------------------------------------------------- verification failures
def test_failed_verifications_are_left_out_of_baselines_and_the_filter():
    """A failed verification is no reward, not a 0: the group's mean and std are over its valid rows,
    the failed rows get advantage 0, and a group needs two valid rows to be informative."""
    r = t([1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0])
    v = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0]).bool()
    adv = group_advantages(r, 4, valid=v)
    # group 0 over (1, 0, 1): mean 2/3, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert_close(adv[:4], t([(1 / 3) / (s + 1e-6), (-2 / 3) / (s + 1e-6), (1 / 3) / (s + 1e-6), 0.0]))
    assert adv[4:].tolist() == [0.0] * 8     # group 1: its valid rows agree; group 2: one valid row
    assert informative_groups(r, 4, v).tolist() == [True, False, False]
    assert informative_groups(r, 4).tolist() == [True, True, True]              # as if failures were wrong
    assert_close(group_advantages(r, 4, valid=torch.ones(12).bool()), group_advantages(r, 4))   # all valid: as before
    dr = get_adv_estimator("dr_grpo")(r, 4, valid=v)
    assert_close(dr[:4], t([1 / 3, -2 / 3, 1 / 3, 0.0]))
