"""ProRL v2 and BroRL recipes: REINFORCE++-baseline advantages, the stop-properly penalty, the
scheduled cosine length penalty (hand-computed values), shaping before the dynamic-sampling
filter, the specs that ship them, and hundreds of rollouts per prompt cut into bounded pieces."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prorl_actors import batch as rb
from prorl_actors.algo import (cosine_length_factor, get_adv_estimator, informative_groups, length_penalized,
                               length_penalty_on, reinforce_pp_baseline, stop_properly)
from prorl_actors.config import build_spec, load_spec
from prorl_actors.runtime.rows import train_rewards, valid_rows, with_shaped_rewards
from prorl_actors.spec import SpecError

SPECS = Path(__file__).resolve().parents[1] / "specs"
t = lambda *x: torch.tensor(x, dtype=torch.float32)  # noqa: E731


# ------------------------------------------------------------------------------ REINFORCE++-baseline
def test_reinforce_pp_baseline_hand_values_token_weighted():
    # one group of 4: r = 1 0 0 1, mean .5 -> a = .5 -.5 -.5 .5; lengths 2 2 4 4 (16 tokens):
    # token mean (1 - 1 - 2 + 2) / 16 = 0, token var 16 * .25 / 16 = .25 -> adv = a / .5
    got = reinforce_pp_baseline(t(1, 0, 0, 1), 4, lengths=torch.tensor([2, 2, 4, 4]))
    assert got.tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], rel=1e-5)
    # groups of 2: (1 0) (0 1) (1 0) (1 1) -> a = .5 -.5 | -.5 .5 | .5 -.5 | 0 0, lengths 2 2 4 4 1 3 5 5 (26):
    # token mean (1 - 1 - 2 + 2 + .5 - 1.5) / 26 = -1/26; var = sum w (a - mean)^2 / 26
    got = reinforce_pp_baseline(t(1, 0, 0, 1, 1, 0, 1, 1), 2, lengths=torch.tensor([2, 2, 4, 4, 1, 3, 5, 5]))
    a = [.5, -.5, -.5, .5, .5, -.5, 0, 0]
    w = [2, 2, 4, 4, 1, 3, 5, 5]
    m = -1 / 26
    s = math.sqrt(sum(wi * (ai - m) ** 2 for wi, ai in zip(w, a)) / 26)
    assert got.tolist() == pytest.approx([(ai - m) / s for ai in a], rel=1e-5)
    assert abs(sum(wi * g for wi, g in zip(w, got.tolist()))) < 1e-4             # token mean 0 after


def test_reinforce_pp_baseline_rows_without_reward_or_baseline_and_no_lengths():
    # group 0: the middle row's verification failed -> out of the mean (r 1, 0 -> a .5, -.5), adv 0;
    # group 1: one valid row -> no baseline: 0 and out of the statistics
    r = t(1, 7, 0, 1, 0, 0)
    valid = torch.tensor([True, False, True, True, False, False])
    got = reinforce_pp_baseline(r, 3, valid=valid)              # row weights 1: mean 0, var .25
    assert got.tolist() == pytest.approx([1.0, 0.0, -1.0, 0.0, 0.0, 0.0], rel=1e-5)
    # an all-equal group has a baseline: its a = 0 is shifted by the batch mean like the others
    got = reinforce_pp_baseline(t(1, 0, 1, 1), 2, lengths=torch.tensor([1, 1, 2, 2]))
    # a = .5 -.5 0 0, weights 1 1 2 2: mean 0, var (.25 + .25) / 6
    s = math.sqrt(0.5 / 6)
    assert got.tolist() == pytest.approx([.5 / s, -.5 / s, 0.0, 0.0], rel=1e-5)
    assert reinforce_pp_baseline(t(1, 1, 0, 0), 2).tolist() == [0.0] * 4     # no spread at all: 0 (floor 1e-8)
    assert get_adv_estimator("reinforce_pp_baseline") is reinforce_pp_baseline
    with pytest.raises(ValueError, match="NaN"):
        reinforce_pp_baseline(t(1, float("nan")), 2)


# ------------------------------------------------------------------------------ shaping
def test_stop_properly_scales_truncated_rewards():
    r, trunc = t(1, 1, 0.5, 0), torch.tensor([False, True, True, False])
    assert stop_properly(r, trunc, 0.0).tolist() == [1, 0, 0, 0]
    assert stop_properly(r, trunc, 0.5).tolist() == [1, 0.5, 0.25, 0]
    assert stop_properly(r, trunc, 1.0).tolist() == r.tolist()
    with pytest.raises(ValueError):
        stop_properly(r, trunc, 1.5)


def test_cosine_length_factor_and_schedule_hand_values():
    # free 8, max 32: x = (l - 8) / 24 clamped; f = .5 + .5 * (1 + cos(pi x)) / 2
    f = cosine_length_factor(torch.tensor([0, 8, 14, 20, 32, 40]), 32, 0.5, free_tokens=8)
    assert f.tolist() == pytest.approx([1, 1, 0.5 + 0.25 * (1 + math.cos(math.pi / 4)), 0.75, 0.5, 0.5])
    # period 4, on 2: steps 3, 4, 7, 8 on; no period: always
    assert [length_penalty_on(s, 4, 2) for s in range(1, 9)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert length_penalty_on(5, None, 1) == 1.0
    with pytest.raises(ValueError):
        length_penalty_on(1, 2, 3)
    r, lengths = t(1, 1, 0, 0.5), torch.tensor([0, 32, 32, 20])
    assert length_penalized(r, lengths, 1.0, 32, 0.5, 8).tolist() == pytest.approx([1, 0.5, 0, 0.375])
    assert length_penalized(r, lengths, 0.0, 32, 0.5, 8).tolist() == r.tolist()   # off: unchanged


def _rows(rewards, lengths, truncated, G):
    n = len(rewards)
    rows = rb.make_rollouts(prompt_ids=[[1]] * n, response_ids=[[5] * k for k in lengths],
                           sample_logp=[[0.0] * k for k in lengths], response_text=[""] * n, task=["t"] * n,
                           item_index=[0] * n, reference=["{}"] * n, group_id=[i // G for i in range(n)],
                           truncated=truncated, policy_version=[0] * n)
    rows = rb.with_column(rows, rb.REWARD, rewards)
    return rb.with_column(rb.with_column(rows, rb.VERIFY_ERROR, [False] * n), rb.VERIFY_TIMEOUT, [False] * n)


def test_shaping_comes_before_the_filter_and_the_baselines():
    """A group of right answers one of which never stopped is informative under the stop-properly
    penalty (and trained on), not without it; the verifier's reward stays as it was."""
    spec = build_spec({"generator": {"num_samples_per_prompt": 2, "max_new_tokens": 4},
                       "algorithm": {"adv_estimator": "reinforce_pp_baseline",
                                     "reward_shaping": {"stop_properly_coef": 0.0}}})
    rows = _rows([1.0, 1.0, 1.0, 0.0], [2, 4, 1, 3], [False, True, False, False], 2)
    plain = informative_groups(train_rewards(rows, build_spec({}).algorithm.reward_shaping), 2, valid_rows(rows))
    shaped = with_shaped_rewards(rows, spec.algorithm.reward_shaping, 4, step=1)
    assert plain.tolist() == [False, True]
    rs = spec.algorithm.reward_shaping
    assert informative_groups(train_rewards(shaped, rs), 2, valid_rows(shaped)).tolist() == [True, True]
    assert shaped[rb.REWARD].to_pylist() == [1.0, 1.0, 1.0, 0.0]
    assert shaped[rb.SHAPED_REWARD].to_pylist() == [1.0, 0.0, 1.0, 0.0]
    rb.check_batch(shaped, needs=(rb.REWARD, rb.SHAPED_REWARD))
    from prorl_actors.runtime.consumer import trainable_batch
    out, _ = trainable_batch(shaped, spec)
    # a = .5 -.5 .5 -.5, weights 2 4 1 3: mean (1 - 2 + .5 - 1.5) / 10 = -.2, var = sum w (a + .2)^2 / 10
    a, w = torch.tensor([.5, -.5, .5, -.5]), torch.tensor([2., 4, 1, 3])
    s = math.sqrt(float((w * (a + 0.2) ** 2).sum() / 10))
    assert out[rb.ADV].to_pylist() == pytest.approx(((a + 0.2) / s).tolist(), rel=1e-5)
    # overlong mask: the truncated row leaves after its group's baseline and out of the batch's
    # statistics, so the rows trained on have token mean 0: a = .5 .5 -.5, weights 2 1 3
    masked = build_spec({"generator": {"num_samples_per_prompt": 2, "max_new_tokens": 4},
                         "algorithm": {"adv_estimator": "reinforce_pp_baseline", "overlong": {"mode": "mask"},
                                       "reward_shaping": {"stop_properly_coef": 0.0}}})
    out, _ = trainable_batch(shaped, masked)
    a, w = torch.tensor([.5, .5, -.5]), torch.tensor([2., 1, 3])
    m = float((w * a).sum() / 6)
    s = math.sqrt(float((w * (a - m) ** 2).sum() / 6))
    assert out.num_rows == 3 and out[rb.ADV].to_pylist() == pytest.approx(((a - m) / s).tolist(), rel=1e-5)
    # shaping off: the rows are returned as they are (no column added)
    assert with_shaped_rewards(rows, build_spec({}).algorithm.reward_shaping, 4, step=1) is rows


def test_scheduled_length_penalty_follows_the_step():
    spec = build_spec({"generator": {"max_new_tokens": 32},
                       "algorithm": {"reward_shaping": {"length_penalty": {
                           "mode": "cosine", "min_scale": 0.5, "free_tokens": 8, "period_steps": 4, "on_steps": 2}}}})
    rows = _rows([1.0, 1.0], [8, 32], [False, False], 2)
    rs = spec.algorithm.reward_shaping
    assert with_shaped_rewards(rows, rs, 32, step=2)[rb.SHAPED_REWARD].to_pylist() == [1.0, 1.0]   # off
    assert with_shaped_rewards(rows, rs, 32, step=3)[rb.SHAPED_REWARD].to_pylist() == [1.0, 0.5]   # on


def test_shaping_spec_is_checked_with_its_key_path():
    with pytest.raises(SpecError, match=r"algorithm\.reward_shaping\.stop_properly_coef"):
        build_spec({"algorithm": {"reward_shaping": {"stop_properly_coef": 2.0}}})
    with pytest.raises(SpecError, match=r"algorithm\.reward_shaping\.length_penalty\.on_steps"):
        build_spec({"algorithm": {"reward_shaping": {"length_penalty": {"period_steps": 2, "on_steps": 3}}}})
    with pytest.raises(SpecError, match=r"algorithm\.reward_shaping\.length_penalty\.free_tokens"):
        build_spec({"generator": {"max_new_tokens": 16},
                    "algorithm": {"reward_shaping": {"length_penalty": {"mode": "cosine", "free_tokens": 16}}}})
    with pytest.raises(SpecError, match=r"algorithm\.adv_estimator"):
        build_spec({"algorithm": {"adv_estimator": "reinforce++"}})


# ------------------------------------------------------------------------------ the shipped specs
def test_v2_and_brorl_specs_hold_their_recipes():
    v2, bro = (load_spec(SPECS / f) for f in ("prorl-v2-1.5b.yaml", "brorl-1.5b.yaml"))
    for s in (v2, bro):
        a = s.algorithm
        assert (a.adv_estimator, a.eps_low, a.eps_high, a.kl_estimator) == ("reinforce_pp_baseline", 0.2, 0.27, "k2")
        assert (a.off_policy_correction.mode, a.off_policy_correction.low, a.off_policy_correction.high) == \
            ("icepop", 0.5, 5.0)
        assert a.reward_shaping.stop_properly_coef == 0.0 and a.reward_shaping.length_penalty.mode == "cosine"
        ds = s.supervisor.dynamic_sampling
        assert (ds.max_rounds, ds.max_oversample) == (10, 1.5) and s.supervisor.kl.coef == 1e-4
        assert s.supervisor.resets.triggers == ["scheduled"] and s.supervisor.resets.reset_optimizer
    assert v2.group_size == 16 and bro.group_size == 512          # ProRL's n, BroRL's N
    assert bro.supervisor.num_prompts_per_step * bro.group_size == 64 * 512


# ------------------------------------------------------------------------------ hundreds of rollouts
def test_a_group_of_512_is_filtered_and_baselined_exactly():
    G = 512
    r = torch.zeros(3 * G)
    r[G + 7] = 1.0                                  # group 1: one right answer in 512
    r[2 * G:] = 1.0                                 # group 2: all right
    assert informative_groups(r, G).tolist() == [False, True, False]
    adv = reinforce_pp_baseline(r[G:2 * G], G)      # a = 1 - 1/512 once, -1/512 elsewhere; var = (1/512)(1 - 1/512)
    p = 1 / G
    s = math.sqrt(p * (1 - p))
    assert adv[7].item() == pytest.approx((1 - p) / s, rel=1e-4)
    assert adv[0].item() == pytest.approx(-p / s, rel=1e-4)


@pytest.mark.parametrize("share", [False, True])
def test_groups_of_hundreds_are_cut_into_micro_batches_within_the_budget(share):
    """Four prompts of 512 rollouts each: no pass of the learner or the reference holds a whole
    group; every pass stays within its token budget (or row limit) and every row is in one pass."""
    rng = np.random.default_rng(0)
    G, n = 512, 4
    gid = np.repeat(np.arange(n), G)
    plen = np.repeat(rng.integers(30, 60, n), G)
    rlen = rng.integers(1, 200, n * G)
    rows = np.arange(n * G)
    for max_tokens, max_rows in ((4096, 64), (None, 64)):
        (plan,) = rb.plan_micro_batches(rows, gid, plen, rlen, 1, max_tokens, max_rows, share)
        assert sorted(int(i) for m in plan for u in m for i in u) == rows.tolist()
        for m in plan:
            assert sum(len(u) for u in m) < G
            if max_tokens is None:
                assert sum(len(u) for u in m) <= max_rows
            else:
                assert rb.pass_positions(m, plen, rlen, share)[0] <= max_tokens


def test_hf_generation_of_hundreds_of_samples_runs_in_bounded_batches(tiny_model):
    """96 samples of one prompt come back as one group of 96, generated 32 sequences at a time
    (generator.hf_batch_size): the engine never holds more."""
    from prorl_actors.engines.generation import HFEngine, SamplingSpec
    from prorl_actors.spec import GeneratorSpec
    hf = HFEngine(str(tiny_model), "float32", GeneratorSpec(engine="hf", hf_batch_size=32))
    sizes, real = [], hf.model.generate

    def generate(**kw):
        sizes.append(kw["input_ids"].shape[0])
        return real(**kw)
    hf.model.generate = generate
    prompt = hf.tok("Compute 1 + 2.", add_special_tokens=False)["input_ids"]
    (group,) = hf.generate([prompt], SamplingSpec(n=96, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0))
    assert len(group) == 96 and sizes == [32, 32, 32]
    assert len({tuple(s.response_ids) for s in group}) > 1          # sampled, not one sample copied
