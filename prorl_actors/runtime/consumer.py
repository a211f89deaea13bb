"""The consumer of rollouts: a step's kept groups -> advantages -> reference log-probs -> the
learner's update -> the controllers (KL coefficient, entropy) and reference resets.

Interface (what the supervisor's step uses):
    trainable_batch(batch, spec)         -> (rows for the reference and learner, figures)
    Consumer.with_reference(batch, step, timer) -> the rows with the reference's log-probs
    Consumer.update(batch, step, timer)  -> the learner's stats ({} when nothing was trainable);
                                            the policy version moves when the weights did
    Consumer.control(stats, batch, step) -> the controllers see the step; a reset when one is due
    Consumer.state_dict / load_state_dict
and, for the run's lifecycle, `restore_reference` (what a rebuilt reference is given: roles.RESTART).

The consumer owns the policy version and the reference's: `version` counts the learner's
updates, `reference_version` is the version the reference was last reset to.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from prorl_actors import batch as rb
from prorl_actors.algo import (KLController, ResetPolicy, get_adv_estimator, kl_share, mixture_entropy,
                               overlong_penalty, scale_for_entropy)
from prorl_actors.algo.resets import Reason
from prorl_actors.events import Event
from prorl_actors.group import ActorGroup, LearnerGroup
from prorl_actors.metrics import Phase
from prorl_actors.roles import Learner, Reference
from prorl_actors.runtime.rows import train_rewards, valid_rows
from prorl_actors.spec import RunSpec


class Consumer:
    def __init__(self, spec: RunSpec, learner: LearnerGroup, reference: ActorGroup, records, log=print):
        self.spec, self.learner, self.reference, self.records, self.log = spec, learner, reference, records, log
        self.sync = None                    # the weight sync, once the groups are up (set_sync)
        self.kl = make_kl_controller(spec)
        self.resets = ResetPolicy.from_spec(spec.supervisor.resets)
        self.version = 0                    # the learner's: one per update that changed the weights
        self.reference_version = 0
        self.reference_weights_ref = None   # the weights of the reference's last reset (None: a checkpoint's/base)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"policy_version": self.version, "reference_version": self.reference_version,
                "kl": self.kl.state_dict(), "resets": self.resets.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        self.version, self.reference_version = st["policy_version"], st["reference_version"]
        self.kl.load_state_dict(st["kl"])
        self.resets.load_state_dict(st["resets"])

    # ------------------------------------------------------------------ the reference
    def reference_needed(self) -> bool:
        """Whether the step needs the reference's log-probs: a KL penalty in the loss, or a
        controller or reset trigger that reads the KL (beta 0, fixed, no kl trigger: skipped)."""
        k = self.spec.supervisor.kl
        return not (k.mode == "fixed" and k.actuator == "kl_coef" and k.coef == 0
                    and "kl" not in self.spec.supervisor.resets.triggers)

    def restore_reference(self, actor) -> None:
        """A rebuilt reference actor: the weights of the last reset, if there was one since the
        checkpoint it was built from."""
        if self.reference_weights_ref is not None:
            ray.get(actor.reset_to.remote(self.reference_weights_ref, self.reference_version),
                    timeout=max(600.0, self.reference.call_timeout_s))

    # ------------------------------------------------------------------ the update
    def with_reference(self, batch: pa.Table | None, step: int, timer) -> pa.Table | None:
        """The reference's log-probs added to the rows of `trainable_batch`, when the step needs
        them (None: nothing to train)."""
        if batch is None or not self.reference_needed():
            return batch
        with timer(Phase.REFERENCE):
            T = self.spec.generator.temperature * self.ref_temperature_scale()
            return self.reference.map_table(Reference.logprobs, batch, T, rows_per_unit=self.spec.group_size,
                                            step=step)

    def update(self, batch: pa.Table | None, step: int, timer) -> dict:
        """The learner's update on `batch` (None: nothing to train) -> its stats ({} when there
        was none), with the coefficients used and the controller's signal. The version moves
        when the weights did."""
        if batch is None:
            return {}
        with timer(Phase.LEARN):
            kl_coef, entropy_coef = self.coefs()
            stats = self.learner.call_one(Learner.update, batch, kl_coef, entropy_coef, step=step)
        stats["kl_coef_used"], stats["entropy_coef_used"] = kl_coef, entropy_coef
        stats["ref_temperature_scale_used"] = self.ref_temperature_scale()
        stats["entropy_signal"] = self.entropy_signal(stats)
        stats["kl_share"] = kl_share(stats.get("pg_loss", math.nan), stats.get("kl", math.nan), kl_coef)
        if stats["optimizer_steps"] > 0:   # 0: every update was non-finite, the weights unchanged
            self.version += 1
        return stats

    def control(self, stats: dict, batch: pa.Table, step: int) -> None:
        """After an update: the controller sets the next step's coefficient from this step's
        entropy and KL; the reset policy sees the step and resets the reference when due."""
        self.kl.update(stats["entropy_signal"], stats.get("kl", math.nan))
        self.resets.observe_step(stats.get("kl", math.nan), stats["entropy_signal"])
        floor, ceiling = self.reset_entropy_limits()
        decision = self.resets.decide(step, pg_loss=stats.get("pg_loss", math.nan), kl=stats.get("kl", math.nan),
                                      kl_coef=stats["kl_coef_used"], entropy_floor=floor, entropy_ceiling=ceiling)
        if decision and decision[0] == "reset":
            self.reset_reference(decision[1], step, batch)
        elif decision and (decision[0] == "skip" or self.resets.waiting_since == step):
            event = Event.REFERENCE_RESET_SKIPPED if decision[0] == "skip" else Event.REFERENCE_RESET_WAITS
            self.records.event(event, step, trigger=decision[1].trigger, reason=decision[1],
                               entropy_target=self.kl.target)
            self.log(f"step {step}: {event.replace('_', ' ')} ({decision[1]})")

    # ------------------------------------------------------------------ controls
    def coefs(self) -> tuple[float, float]:
        """(beta, entropy bonus coefficient) for the next update: the controller moves one of them
        (or neither: the reference's temperature, ref_temperature_scale)."""
        k = self.spec.supervisor.kl
        if k.actuator == "entropy_coef":
            return k.coef, self.kl.value
        if k.actuator == "reference_temperature":
            return k.coef, self.spec.algorithm.entropy_coef
        return self.kl.value, self.spec.algorithm.entropy_coef

    def entropy_signal(self, stats: dict) -> float:
        """The entropy the controller holds (supervisor.kl.entropy_signal): the batch's token mean,
        or the tasks' token means weighted by their mixture weights (NaN if none was trained)."""
        if self.spec.supervisor.kl.entropy_signal == "batch":
            return stats.get("entropy", math.nan)
        return mixture_entropy({k[len("entropy/"):]: v for k, v in stats.items() if k.startswith("entropy/")},
                               {t.name: t.weight for t in self.spec.data.tasks})

    def ref_temperature_scale(self) -> float:
        """The reference's logprobs are taken at the sampling temperature x this (kl.actuator
        reference_temperature moves it; otherwise reference.temperature_scale)."""
        if self.spec.supervisor.kl.actuator == "reference_temperature":
            return self.kl.value
        return self.spec.reference.temperature_scale

    def reset_entropy_limits(self) -> tuple[float | None, float | None]:
        """A due reset waits while recent entropy is outside [floor, ceiling] (entropy-target
        mode moving beta, with resets.wait_for_entropy; None = no limit): the target plus
        margins in band widths, as the KL penalty holds entropy near the reference's."""
        rs = self.spec.supervisor.resets
        if not (self.kl.mode == "entropy-target" and self.spec.supervisor.kl.actuator == "kl_coef"
                and rs.wait_for_entropy and self.kl.target is not None):
            return None, None
        high = None if rs.entropy_margin_high is None else self.kl.target + rs.entropy_margin_high * self.kl.band
        return self.kl.target + rs.entropy_margin * self.kl.band, high

    def reset_reference(self, reason: Reason, step: int, batch: pa.Table | None = None) -> None:
        """Reference <- current policy; optimizer state re-initialised and the KL coefficient
        restored when the spec says so (or, moving the reference's temperature, the scale chosen
        so that the reference's entropy on this step's responses stays where it was); recorded
        with its trigger and reason."""
        rs, k = self.spec.supervisor.resets, self.spec.supervisor.kl
        match = k.actuator == "reference_temperature" and rs.match_reference_entropy and batch is not None
        T = self.spec.generator.temperature
        entropy = lambda rows, scale: self.reference.call_one(Reference.entropy, rows, T * scale, step=step)  # noqa: E731
        if match:   # at most 128 rows spread over the batch: the entropy of both references on them
            rows = batch.take(np.linspace(0, batch.num_rows - 1, min(batch.num_rows, 128)).round().astype(np.int64))
            scale_before = self.ref_temperature_scale()
            ref_entropy = entropy(rows, scale_before)
        self.reference_weights_ref, self.reference_version = self.sync.weights_ref(self.version), self.version
        self.reference.call_all(Reference.reset_to, self.reference_weights_ref, self.version, step=step)
        if rs.reset_optimizer:
            self.learner.call_one(Learner.reset_optimizer, step=step)
        if rs.restore_kl_coef:
            self.kl.restore_initial()
        extra = {}
        if match:
            self.kl.set_value(scale_for_entropy(lambda sc: entropy(rows, sc), ref_entropy, k.coef_min, k.coef_max))
            after = self.ref_temperature_scale()
            extra = {"ref_temperature_scale_before": scale_before, "ref_temperature_scale": after,
                     "ref_entropy_before": ref_entropy, "ref_entropy": entropy(rows, after)}
        self.resets.record(step, reason)
        self.records.event(Event.REFERENCE_RESET, step, trigger=reason.trigger, reason=reason, policy_version=self.version,
                           optimizer_reset=rs.reset_optimizer, kl_coef=self.coefs()[0], **extra)
        self.log(f"step {step}: reference reset ({reason})")


def make_kl_controller(spec: RunSpec) -> KLController:
    """The controller of what supervisor.kl.actuator names, starting from that value's setting
    (beta: kl.coef; the bonus: algorithm.entropy_coef; the temperature scale:
    reference.temperature_scale), held within coef_min..coef_max."""
    k = spec.supervisor.kl
    start = {"kl_coef": k.coef, "entropy_coef": spec.algorithm.entropy_coef,
             "reference_temperature": spec.reference.temperature_scale}[k.actuator]
    if k.actuator != "kl_coef":
        start = min(max(start, k.coef_min), k.coef_max)
    return KLController.from_spec(k, start)


def trainable_batch(batch: pa.Table, spec: RunSpec) -> tuple[pa.Table, dict]:
    """The kept groups -> (what the reference and the learner get, its figures): ADV added
    (algorithm.adv_estimator on the rewards of the rows whose verification succeeded: shaped
    when algorithm.reward_shaping asks, with DAPO's soft overlong penalty when asked, whose mean
    over the rows is the figure `overlong_penalty`);
    the rows whose verification failed leave here (`unverified_rows`), and under overlong mode
    "mask" the truncated responses (after their group's advantages, which they count in), so
    that neither the reference nor the learner spends a pass on them."""
    G, ol = spec.group_size, spec.algorithm.overlong
    rewards = train_rewards(batch, spec.algorithm.reward_shaping)                         # (B,) shaped, if asked
    lengths = torch.tensor(pc.list_value_length(batch[rb.RESPONSE_IDS]).to_numpy())        # (B,)
    figures = {}
    if ol.mode == "soft_punish":   # DAPO: a length penalty shapes the advantages, not the filter
        penalty = overlong_penalty(lengths, spec.generator.max_new_tokens, ol.buffer_tokens)  # (B,) in [-1, 0]
        rewards = rewards + penalty
        figures["overlong_penalty"] = float(penalty.mean())
    valid = valid_rows(batch)                                                              # (B,)
    trained = lengths
    if ol.mode == "mask":   # batch statistics over the rows that will be trained on
        trained = lengths * ~torch.tensor(batch[rb.TRUNCATED].to_numpy(zero_copy_only=False))
    adv = get_adv_estimator(spec.algorithm.adv_estimator)(rewards, G, valid=valid, lengths=trained)   # (B,)
    batch = rb.with_column(batch, rb.ADV, adv.numpy())
    keep = valid.numpy()                  # a failed verification has no reward: no gradient either
    if ol.mode == "mask":   # truncated responses get no gradient
        keep = keep & ~batch[rb.TRUNCATED].to_numpy(zero_copy_only=False)
    if not keep.all():
        batch = rb.select_rows(batch, keep)
    figures["unverified_rows"] = int((~valid).sum())
    return batch, figures
