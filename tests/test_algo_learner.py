"""Tests of the learner's fused, flat math (k3 cap, row scales, the clipped surrogate per token,
chunked log-probs and entropy, round sizes, the token objective) and of the off-policy
correction, against hand-computed values."""
import math

import pytest
import torch
from torch.testing import assert_close

from prorl_actors.algo import (AGG_MODES, aggregate_loss, entropy_from_logits, get_adv_estimator, group_advantages,
                               informative_groups, kl_penalty, policy_loss)
from tests.test_algo import ADV, _logps, t

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
