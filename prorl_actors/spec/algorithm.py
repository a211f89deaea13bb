"""The sections of the RL algorithm and its control: overlong handling, reward shaping, the off-policy
correction, the loss, dynamic sampling, KL control, reference resets and the supervisor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prorl_actors.spec.fields import opt

# the values of a few modes, written once: the spec's fields and algo/ (control.py, resets.py) use them
KLMode = Literal["fixed", "entropy-target", "kl-target"]
KLActuator = Literal["kl_coef", "entropy_coef", "reference_temperature"]
ResetTrigger = Literal["scheduled", "validation", "kl"]

@dataclass
class OverlongSpec:
    """Responses cut off by generator.max_new_tokens (DAPO)."""
    mode: Literal["none", "mask", "soft_punish"] = opt("none", help=(
        "mask: truncated responses get no gradient; soft_punish: a length penalty falling linearly "
        "from 0 to -1 over the last buffer_tokens before the limit is added to the reward"))
    buffer_tokens: int = opt(64, ge=1, help="soft_punish: the length of the penalty ramp")


@dataclass
class OffPolicySpec:
    """The correction for tokens sampled by another policy than the learner's (algo/offpolicy.py)."""
    mode: Literal["none", "tis", "icepop", "seq_mask_tis"] = opt("none", help=(
        "each token's policy-gradient term is multiplied by a weight from r = pi_learner / pi_sampler (the "
        "learner's log-probs before the update over the generator's): none = 1; tis = min(r, high) (truncated "
        "importance sampling); icepop = r inside [low, high], 0 outside (ICE-POP); seq_mask_tis = min(r, high), "
        "0 for whole sequences whose geometric-mean r leaves [low, high] (NeMo-RL's ProRL v2). The vLLM "
        "sampler's kernels are not the learner's, and with supervisor.max_staleness > 0 its weights are older"))
    low: float = opt(0.5, ge=0, le=1, help="icepop, seq_mask_tis: the lower bound of r")
    high: float = opt(5.0, ge=1, help="tis, seq_mask_tis: the truncation; icepop: the upper bound of r")


@dataclass
class LengthPenaltySpec:
    """A scheduled cosine length penalty on the rewards (ProRL v2; algo/shaping.py)."""
    mode: Literal["none", "cosine"] = opt("none", help=(
        "cosine: each reward is multiplied by a factor falling along half a cosine from 1 at free_tokens to "
        "min_scale at generator.max_new_tokens, before baselines and the dynamic-sampling filter (a wrong answer, "
        "reward 0, gains nothing by being short; of two right answers the shorter earns more)"))
    min_scale: float = opt(0.5, ge=0, le=1, help="the factor at generator.max_new_tokens tokens")
    free_tokens: int = opt(0, ge=0, help="responses up to this many tokens are not penalised")
    period_steps: int | None = opt(None, ge=1, help=(
        "the schedule: the penalty applies in the last on_steps steps of every period_steps steps and not in "
        "the others (responses may grow, then are compressed again); null = every step"))
    on_steps: int = opt(1, ge=1, help="steps per period with the penalty on (at most period_steps)")


@dataclass
class RewardShapingSpec:
    """Rewards shaped before baselines and the dynamic-sampling filter (algo/shaping.py); the
    verifier's rewards stay in the `reward` column and the figures, the shaped ones are trained on."""
    stop_properly_coef: float | None = opt(None, ge=0, le=1, help=(
        "the reward of a response that never stopped (cut by generator.max_new_tokens) is multiplied by this: "
        "0 = no reward (ProRL v2 as NeMo-RL ships it), 1 = no penalty; null = off"))
    length_penalty: LengthPenaltySpec = opt(LengthPenaltySpec())


@dataclass
class AlgorithmSpec:
    adv_estimator: Literal["grpo", "dr_grpo", "reinforce_pp_baseline"] = opt("grpo", help=(
        "grpo divides by the group std; dr_grpo (Dr.GRPO) does not; reinforce_pp_baseline (REINFORCE++-baseline, "
        "ProRL v2) subtracts the group mean, then normalises over the whole batch's response tokens"))
    eps_low: float = opt(0.2, ge=0, lt=1)
    eps_high: float = opt(0.4, ge=0, help="DAPO clip-higher: a larger upper bound keeps low-probability tokens alive")
    dual_clip_c: float | None = opt(None, gt=1)
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                      "seq-mean-token-sum-norm"] = opt(
        "token-mean", help="token-mean (DAPO) weights every token equally; seq-mean biases towards short answers")
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k3")
    k3_cap: float | None = opt(10.0, gt=0, help=(
        "k3's per-token value is cut to at most this (verl: 10), so that a few tokens the reference finds far "
        "likelier cannot dominate the KL term; the share of capped tokens is reported (kl_capped_frac). null = "
        "no cap"))
    entropy_coef: float = opt(0.0, ge=0, help="entropy bonus: loss -= entropy_coef * entropy (0 = none, the paper's)")
    overlong: OverlongSpec = opt(OverlongSpec())
    reward_shaping: RewardShapingSpec = opt(RewardShapingSpec())
    off_policy_correction: OffPolicySpec = opt(OffPolicySpec())


@dataclass
class DynamicSamplingSpec:
    """DAPO's dynamic sampling: only groups with different rewards are trained on; every round
    asks for as many prompts as the measured keep rate says it takes to fill the batch."""
    enabled: bool = opt(True, help="DAPO: drop groups whose rewards are all equal and sample more")
    max_rounds: int = opt(4, ge=1, help="generation rounds per step before training on what it has")
    fill_confidence: float = opt(0.9, ge=0.5, lt=1, help=(
        "each round asks for enough prompts that the missing groups are all kept with this probability, at "
        "the running keep rate (binomial); the groups beyond the batch are not trained on (counted as "
        "surplus_groups). Higher: fewer rounds, more surplus"))
    keep_rate_decay: float = opt(0.5, ge=0, lt=1, help=(
        "the running keep rate is kept groups / generated groups, older rounds weighted by this per round "
        "(0 = the last round alone); 1.0 before the first round"))
    max_oversample: float = opt(4.0, ge=1, help="a round asks for at most this many times the missing prompts")


@dataclass
class KLControlSpec:
    mode: KLMode = opt("fixed", help=(
        "fixed: the paper's constant beta; entropy-target: move beta to hold policy entropy in a band "
        "(up when entropy is below it, down when above); kl-target: the adaptive-KL rule of "
        "Ziegler et al. / OpenRLHF, for comparison"))
    coef: float = opt(1e-4, ge=0, help="beta of the KL penalty to the reference policy (the start value "
                                       "for the controllers)")
    actuator: KLActuator = opt("kl_coef", help=(
        "entropy-target: what the controller moves: kl_coef = beta (ProRL's lever; a penalty can only pull "
        "entropy towards the reference's), entropy_coef = the entropy bonus's coefficient, starting from "
        "algorithm.entropy_coef, with beta fixed at coef (Skywork-OR1's adaptive entropy control), "
        "reference_temperature = the reference's temperature scale, starting from "
        "reference.temperature_scale, with beta fixed at coef (> 1 flattens the reference so the penalty "
        "lifts entropy, < 1 sharpens it so the penalty lowers it, whatever the snapshot's entropy); "
        "coef_min / coef_max bound whichever it moves"))
    entropy_target: float | None = opt(None, gt=0, help="entropy-target: the target, nats per token")
    entropy_target_relative: float | None = opt(None, gt=0, help=(
        "entropy-target: the target as this fraction of the entropy measured on the first step"))
    entropy_signal: Literal["batch", "task_mean"] = opt("batch", help=(
        "entropy-target: the entropy controlled: batch = the token mean over the step's trained tokens "
        "(moves with the batch's task mix, which dynamic sampling shifts); task_mean = each task's token mean "
        "weighted by data.tasks' weights (over the tasks in the batch)"))
    band: float = opt(0.05, gt=0, help="entropy-target: the band is target +- band (nats per token)")
    rate: float = opt(0.2, gt=0, help="entropy-target: integral gain, log(beta) per step per band width of error")
    kp: float = opt(1.0, ge=0, help="entropy-target: proportional gain (damps the loop)")
    smoothing: float = opt(1.0, gt=0, le=1, help="entropy-target: weight of the newest entropy in a moving "
                                                 "average (1 = none; smoothing adds lag)")
    coef_min: float = opt(1e-6, gt=0)
    coef_max: float = opt(1.0, gt=0)
    kl_target: float | None = opt(None, gt=0, help="kl-target: the KL to hold")
    horizon: float = opt(10.0, gt=0, help="kl-target: steps over which a 20% error is corrected")


@dataclass
class ResetSpec:
    triggers: list[ResetTrigger] = opt(["scheduled"], help=(
        "any of: scheduled (every every_steps), validation (no improvement for patience evaluations or a "
        "drop above max_drop), kl (the KL term's share of the loss above max_kl_share, or KL above "
        "kl_ceiling for kl_steps steps); [] = never"))
    every_steps: int = opt(200, ge=1)
    patience: int = opt(3, ge=1, help="validation: evaluations without improvement since the last reset")
    min_delta: float = opt(0.0, ge=0, help="validation: an improvement must exceed this")
    max_drop: float | None = opt(None, gt=0, help="validation: reset when accuracy falls this far below its best")
    max_kl_share: float | None = opt(None, gt=0, le=1, help="kl: beta*KL / (|pg loss| + beta*KL) above this")
    kl_ceiling: float | None = opt(None, gt=0, help="kl: KL above this for kl_steps steps in a row")
    kl_steps: int = opt(3, ge=1)
    min_gap: int = opt(1, ge=1, help="steps between two resets at least")
    reset_optimizer: bool = opt(True, help="re-initialise the learner's optimizer state at a reset")
    restore_kl_coef: bool = opt(False, help="start what the controller moves (beta, the bonus or the "
                                           "reference's temperature scale: kl.actuator) again from its start "
                                           "value at a reset")
    match_reference_entropy: bool = opt(True, help=(
        "kl.actuator reference_temperature: at a reset the reference's temperature scale is chosen again so "
        "that the new reference's entropy on the step's responses equals the old one's (the penalty's pull "
        "does not jump at the reset; bumpless transfer), within kl.coef_min..coef_max"))
    wait_for_entropy: bool = opt(True, help=(
        "kl.mode entropy-target moving kl_coef: a due reset waits until entropy (kl.entropy_signal, the mean "
        "of the last entropy_window steps) reaches the target + entropy_margin band widths, since the KL penalty holds "
        "entropy just below the reference's; it is skipped after max_wait_steps and the triggers count "
        "again. No effect in the other modes"))
    entropy_margin: float = opt(0.5, ge=-1, le=2, help=(
        "wait_for_entropy: band widths above the target to wait for (below it, if negative: with a "
        "flattened reference, reference.temperature_scale > 1, the penalty lifts entropy above the snapshot's)"))
    entropy_margin_high: float | None = opt(None, ge=0, le=2, help=(
        "wait_for_entropy: band widths above the target beyond which a due reset waits too (None: no "
        "limit); for a flattened reference, whose snapshot taken high lifts entropy further"))
    max_wait_steps: int = opt(20, ge=0, help="wait_for_entropy: steps a due reset waits before it is skipped")
    entropy_window: int = opt(3, ge=1, help="wait_for_entropy: steps averaged (one step's entropy is noisy)")


@dataclass
class SupervisorSpec:
    num_prompts_per_step: int = opt(256, ge=1)
    max_staleness: int = opt(0, ge=0, help=(
        "how many policy versions old a rollout may be when it is trained on: step k's batch is sampled with "
        "the weights of step k - 1 - max_staleness. 0 = synchronous (generation waits for the learner's "
        "weights, the learner for the batch); 1 = one-step-off (the next batch is sampled while the learner "
        "trains); more lets generation run further ahead. A fixed schedule: runs stay reproducible, resumes "
        "exact (with weight_sync.method broadcast, up to 1: beyond, a batch may be sampled with weights newer "
        "than the schedule's, whichever the learner holds when the generators are free). Rows sampled by older "
        "weights are corrected by algorithm.off_policy_correction"))
    dynamic_sampling: DynamicSamplingSpec = opt(DynamicSamplingSpec())
    kl: KLControlSpec = opt(KLControlSpec())
    resets: ResetSpec = opt(ResetSpec())
