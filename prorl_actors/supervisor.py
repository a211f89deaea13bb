"""The supervisor: owns the run and reads like the recipe.

The rollout producer (runtime/producer.py) makes the batches: prompts -> generate (G per
prompt) -> verify -> dynamic sampling (groups whose rewards are all equal dropped, more
prompts sampled, up to `max_rounds` rounds), sampled with the weights of step
k - 1 - supervisor.max_staleness, so that with a staleness above 0 they are made while the
learner trains. One step (`train_step`) takes its batch, then the consumer
(runtime/consumer.py) trains on it:
  group advantages -> reference logprobs -> learner update (KL penalty in the loss, off-policy
  correction) -> the new version published to the producer -> controllers, reference reset
  when due -> metrics.
Validation (accuracy and pass@k per task on held-out prompts) runs at step 0, every
`validation.every_steps` and at the end.

The run's life apart from its steps (actors, state, resume, rollback, stop, checkpoints) is
runtime/lifecycle.py, the base of the supervisor.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prorl_actors import batch as rb
from prorl_actors.algo import length_penalty_on, pass_at_k_mean
from prorl_actors.engines.generation import SamplingSpec, generation_chunks
from prorl_actors.events import Event
from prorl_actors.group import ActorLost, Preempted
from prorl_actors.metrics import PHASES, Phase, read_jsonl
from prorl_actors.roles import Generator, Verifier
from prorl_actors.runtime.consumer import trainable_batch
from prorl_actors.runtime.lifecycle import RunLifecycle, StopFlag
from prorl_actors.runtime.producer import Fill
from prorl_actors.runtime.rows import check_staleness, train_rewards, valid_rows

__all__ = ["PhaseTimer", "StopFlag", "Supervisor", "summary_table", "trainable_batch"]


class PhaseTimer:
    def __init__(self):
        self.s = {p: 0.0 for p in PHASES}

    @contextmanager
    def __call__(self, phase: Phase):
        t0 = time.perf_counter()
        yield
        self.s[phase] += time.perf_counter() - t0


class Supervisor(RunLifecycle):
    def _rollouts(self, prompts: pa.Table, sp: SamplingSpec) -> pa.Table:
        """Generate and verify (a validation: the generators hold the current version)."""
        g = self.spec.generator
        fill = g.vllm.max_num_seqs if g.engine == "vllm" else g.hf_batch_size
        chunks = generation_chunks(prompts.num_rows, sp.n, g.num_actors, g.chunks_per_actor, fill)
        rollouts = self.generators.map_table(Generator.generate, prompts, sp, num_chunks=chunks, step=self.step)
        check_staleness(rollouts, self.consumer.version, 0, self.step)
        return self.verifiers.map_table(Verifier.verify, rollouts, rows_per_unit=sp.n, step=self.step)

    def train_step(self) -> dict:
        """One step of the recipe: its batch (made ahead by the producer, within the staleness
        bound) -> advantages -> reference log-probs -> update -> the new version published ->
        controllers and resets."""
        timer, t0 = PhaseTimer(), time.perf_counter()
        with timer(Phase.WAIT):
            fill = self.producer.take(self.step)
        try:
            batch, n_groups, ages, shaping = self._batch_of(fill)
            batch = self.consumer.with_reference(batch, self.step, timer)
        except Preempted:
            self.producer.untake(fill)     # stopped before the update: the batch is trained on after the resume
            raise
        self.interruptible = False         # from here the step is let finish: the learner's state moves
        stats = self.consumer.update(batch, self.step, timer)
        stats.update(shaping if stats else {})
        updated = bool(stats) and stats["optimizer_steps"] > 0
        if stats and not updated:          # every update was non-finite: the weights unchanged
            self.records.event(Event.UPDATE_SKIPPED, self.step, skipped_updates=stats["skipped_updates"])
        with timer(Phase.SYNC) if updated else nullcontext():
            self._publish()                # the step is done (on the same version when nothing changed)
        if updated:
            self.consumer.control(stats, batch, self.step)
        return self._step_metrics(fill, n_groups, stats, ages, timer, time.perf_counter() - t0)

    def _batch_of(self, fill: Fill) -> tuple[pa.Table | None, int, dict, dict]:
        """A fill -> (the rows to train on or None, kept groups, their ages, figures), its events
        recorded. Ages: "staleness" (B,) versions behind the learner (of a row's oldest token),
        "span" (B,) versions between its oldest and newest token (in-flight updates)."""
        spec, G = self.spec, self.spec.group_size
        for kind, fields in fill.events:
            if kind == Event.ITEM_REJECTED:
                self.num_item_rejects += 1
            self.records.event(kind, fill.step, **fields)
        batch = fill.batch(spec.supervisor.num_prompts_per_step, G)
        n_groups = batch.num_rows // G if batch is not None else 0
        if n_groups < spec.supervisor.num_prompts_per_step:
            self.records.event(Event.BATCH_SHORT, self.step, groups=n_groups,
                               wanted=spec.supervisor.num_prompts_per_step, rounds=fill.rounds)
        if batch is None:
            self.records.event(Event.NO_INFORMATIVE_GROUPS, self.step, rounds=fill.rounds)
            return None, 0, {}, {}
        stale = check_staleness(batch, self.consumer.version, spec.supervisor.max_staleness, self.step)   # (B,)
        oldest = batch[rb.POLICY_VERSION].to_numpy()
        newest = batch[rb.POLICY_VERSION_MAX].to_numpy() if rb.POLICY_VERSION_MAX in batch.column_names else oldest
        ages = {"staleness": stale, "span": newest - oldest}
        batch, shaping = trainable_batch(batch, spec)
        if not batch.num_rows:   # every response truncated, under overlong mask
            self.records.event(Event.NO_TRAINABLE_ROWS, self.step, groups=n_groups)
            batch = None
        return batch, n_groups, ages, shaping

    def _step_metrics(self, fill: Fill, n_kept: int, stats: dict, ages: dict, timer: PhaseTimer, step_s: float) -> dict:
        G = self.spec.group_size
        if not fill.made and not fill.carried:
            raise RuntimeError(f"step {self.step}: no usable prompt in {fill.rounds} rounds (see events.jsonl)")
        # what was generated for the step (none when the last step's surplus filled its batch)
        allr = rb.concat(fill.made) if fill.made else fill.kept[0].slice(0, 0)
        failed = allr[rb.GENERATE_ERROR].to_numpy(zero_copy_only=False) if rb.GENERATE_ERROR in allr.column_names \
            else np.zeros(allr.num_rows, bool)                      # (B,) generations that failed: no response
        avg = lambda x: float(x[~failed].mean()) if (~failed).any() else math.nan  # noqa: E731
        valid = valid_rows(allr).numpy()                     # a failed verification is no reward at all
        rewards = allr[rb.REWARD].to_numpy()
        resp_len = pc.list_value_length(allr[rb.RESPONSE_IDS]).to_numpy()
        tasks = np.array(allr[rb.TASK].to_pylist())
        lp = self.spec.algorithm.reward_shaping.length_penalty
        penalty_on = length_penalty_on(self.step, lp.period_steps, lp.on_steps) if lp.mode != "none" else 0.0
        beta_next, bonus_next = self.consumer.coefs()
        entropy_target = self.consumer.kl.mode == "entropy-target"
        trained_tokens = stats.get("trained_tokens", 0)
        now, (last_end, last_busy, last_bound) = time.monotonic(), self._last_step_end
        busy, bound = self.producer.gen.busy_s, self.producer.bound_seconds()
        window = max(now - last_end, 1e-9)      # since the last step ended (its validation, checkpoint included)
        self._last_step_end = (now, busy, bound)
        frac = lambda x: min(1.0, max(0.0, x))  # noqa: E731
        pushes = self.producer.take_pushes()
        mean_of = lambda x, keep: float(x[keep].mean()) if keep.any() else math.nan  # noqa: E731
        m = {
            "step": self.step, "time": time.time(), "policy_version": self.consumer.version,
            "reference_version": self.consumer.reference_version,
            "reward_mean": mean_of(rewards, valid), "accuracy": mean_of(rewards >= 1.0, valid),
            # the rewards trained on (algorithm.reward_shaping; the verifier's without it) and the
            # length penalty's schedule this step (1 = on)
            "shaped_reward_mean": mean_of(train_rewards(allr, self.spec.algorithm.reward_shaping).numpy(), valid),
            "length_penalty_on": penalty_on,
            "entropy": stats.get("entropy", math.nan), "entropy_signal": stats.get("entropy_signal", math.nan),
            "kl": stats.get("kl", math.nan),
            "kl_coef": stats.get("kl_coef_used", beta_next), "kl_coef_next": beta_next,
            "entropy_coef": stats.get("entropy_coef_used", bonus_next),
            "ref_temperature_scale": stats.get("ref_temperature_scale_used", self.consumer.ref_temperature_scale()),
            "kl_share": stats.get("kl_share", math.nan),
            "entropy_target": self.consumer.kl.target if entropy_target and self.consumer.kl.target is not None else math.nan,
            "entropy_band": self.consumer.kl.band if entropy_target else math.nan,
            **{k: stats.get(k, math.nan) for k in (
                "pg_loss", "clip_frac_low", "clip_frac_high", "clip_frac", "dual_clip_frac", "approx_kl",
                "grad_norm", "lr", "optimizer_steps", "sampler_logp_gap", "kl_capped_frac", "pad_frac",
                "overlong_penalty", "unverified_rows", "is_weight_mean", "is_masked_frac", "logp_mismatch_k3", "logp_gap_max",
                "logp_gap_over_log2_frac")},
            "kept_groups_frac": (fill.n_kept - fill.carried) / (allr.num_rows // G) if allr.num_rows else math.nan,
            "trained_groups": n_kept, "gen_rounds": fill.rounds,
            # informative groups beyond the batch (to the next step, when the bound allows); groups
            # of the last step's surplus this batch began with, and those too old for it
            "surplus_groups": fill.n_kept - n_kept, "carried_groups": fill.carried, "surplus_expired": fill.expired,
            "keep_rate": fill.keep_rate,
            # how old the trained rows were (policy versions behind the learner's), how far ahead
            # generation runs, and who waited for whom
            "max_staleness": self.spec.supervisor.max_staleness,
            "staleness_mean": float(ages["staleness"].mean()) if ages else math.nan,
            "staleness_max": int(ages["staleness"].max()) if ages else math.nan,
            "version_span_max": int(ages["span"].max()) if ages else math.nan,
            "in_flight_pushes": fill.in_flight_pushes,
            "buffered_batches": self.producer.buffered(),
            "generator_idle_frac": frac(1.0 - (busy - last_busy) / (len(self.generators) * window)),
            "generator_bound_wait_frac": frac((bound - last_bound) / window),
            "learner_idle_frac": frac(1.0 - (timer.s[Phase.LEARN] + timer.s[Phase.SYNC]) / window),
            "learner_wait_frac": frac(timer.s[Phase.WAIT] / window),
            "response_len_mean": avg(resp_len),
            "answer_format_frac": avg(allr[rb.FORMATTED].to_numpy(zero_copy_only=False)),
            "truncated_frac": avg(allr[rb.TRUNCATED].to_numpy(zero_copy_only=False)),
            "verify_errors": int(allr[rb.VERIFY_ERROR].to_numpy(zero_copy_only=False).sum()),
            "verify_timeouts": int(allr[rb.VERIFY_TIMEOUT].to_numpy(zero_copy_only=False).sum()),
            "skipped_updates": stats.get("skipped_updates", 0),
            "item_rejects": self.num_item_rejects,
            "reference_resets": self.consumer.resets.num_resets,
            "reference_reset_waiting": int(self.consumer.resets.waiting_since is not None),
            "reference_resets_skipped": len(self.consumer.resets.skipped),
            **{f"actor_restarts/{grp.role}": grp.restarts for grp in self.groups},
            "rollbacks": self.rollbacks, "resumes": self.resumes,
            "last_checkpoint_step": self.last_checkpoint_step(),
            "step_s": step_s,
            "gen_tokens": int(resp_len.sum()),
            "gen_tokens_per_s": float(resp_len.sum()) / max(fill.times[Phase.GENERATE], 1e-9),
            "trained_tokens": trained_tokens,
            "train_tokens_per_s": trained_tokens / timer.s[Phase.LEARN] if trained_tokens else math.nan,
            # the weights pushed to the generators during the step (a version, when a batch starts on it)
            "sync_mb": pushes[-1]["sync_mb"] if pushes else math.nan,
            "sync_mb_per_s": sum(p["sync_mb"] for p in pushes) / max(sum(p["sync_s"] for p in pushes), 1e-9)
            if pushes else math.nan,
        }
        errors = allr[rb.VERIFY_ERROR].to_numpy(zero_copy_only=False)
        timeouts = allr[rb.VERIFY_TIMEOUT].to_numpy(zero_copy_only=False)
        m["generate_errors"] = int(failed.sum())
        for t in sorted(set(tasks)):
            m[f"reward/{t}"] = mean_of(rewards, valid & (tasks == t))
            m[f"accuracy/{t}"] = mean_of(rewards >= 1.0, valid & (tasks == t))
            m[f"verify_errors/{t}"] = int(errors[tasks == t].sum())
            m[f"verify_timeouts/{t}"] = int(timeouts[tasks == t].sum())
            m[f"generate_errors/{t}"] = int(failed[tasks == t].sum())
            m[f"entropy/{t}"] = stats.get(f"entropy/{t}", math.nan)    # trained tokens of the task
        timer.s[Phase.GENERATE], timer.s[Phase.VERIFY] = fill.times[Phase.GENERATE], fill.times[Phase.VERIFY]   # the batch's own
        for p in PHASES:
            m[f"time/{p}_s"] = timer.s[p]
        # what the step waited on: its batch (the generation the learner could not hide), then its own phases
        m["time/other_s"] = step_s - sum(timer.s[p] for p in (Phase.WAIT, Phase.REFERENCE, Phase.LEARN, Phase.SYNC))
        return m

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict:
        v, g = self.spec.validation, self.spec.generator
        sp = SamplingSpec(n=v.num_samples, temperature=v.temperature, top_p=v.top_p,
                          max_new_tokens=g.max_new_tokens, seed=self.spec.seed)
        self._generators_at_current()
        with self.producer.generators_held():
            rollouts = self._rollouts(self.val_prompts, sp)
        correct = (rollouts[rb.REWARD].to_numpy() >= 1.0).reshape(-1, v.num_samples)  # (prompts, n)
        rewards = rollouts[rb.REWARD].to_numpy().reshape(-1, v.num_samples)          # (prompts, n)
        tasks = np.array(rollouts[rb.TASK].to_pylist()[::v.num_samples])               # (prompts,)
        formatted = rollouts[rb.FORMATTED].to_numpy(zero_copy_only=False).reshape(-1, v.num_samples)
        train = np.isin(tasks, list(self.train_task_names))   # evaluation-only tasks are reported apart
        ok = formatted[train].reshape(-1)
        out = {"step": self.step, "accuracy": float(correct[train].mean()),
               # how much of the accuracy is following the answer format, how much is being right
               "answer_format_frac": float(ok.mean()),
               "accuracy_when_formatted": float(correct[train].reshape(-1)[ok].mean()) if ok.any() else 0.0,
               "verify_errors": int(rollouts[rb.VERIFY_ERROR].to_numpy(zero_copy_only=False).sum()),
               "verify_timeouts": int(rollouts[rb.VERIFY_TIMEOUT].to_numpy(zero_copy_only=False).sum())}
        for t in sorted(set(tasks)):
            c = correct[tasks == t].sum(1)                                           # (prompts,)
            out[f"accuracy/{t}"] = float(correct[tasks == t].mean())
            out[f"reward/{t}"] = float(rewards[tasks == t].mean())
            out[f"format_frac/{t}"] = float(formatted[tasks == t].mean())
            out[f"solved_frac/{t}"] = float((c > 0).mean())
            for k in v.ks:
                out[f"pass@{k}/{t}"] = pass_at_k_mean(c.tolist(), v.num_samples, k)[0]
        return out

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        """Train to num_steps (from the start, or from where a resumed run was) -> results, with
        "preempted": True when a SIGTERM stopped it first (after a checkpoint)."""
        spec = self.spec
        if self.step == 0 and self.last_validation_step < 0:
            self.records.event(Event.RUN_START, 0, model=str(self.model_path), num_steps=spec.num_steps)
            for bad in self.val_rejected:
                self.records.event(Event.ITEM_REJECTED, 0, split="validation", **bad)
            for note in self.data_notes:
                self.records.event(note.pop("event"), 0, **note)
            for task, skipped in self.mixture.skipped_rows().items():
                self.records.event(Event.ROWS_SKIPPED, 0, task=task, count=len(skipped), first=skipped[:5])
                self.log(f"task {task}: {len(skipped)} bad rows skipped (first: {skipped[0]})")
        while True:
            try:
                if self.last_validation_step < self.step and (self.step == 0 or self._validation_due()):
                    self._validate_and_record()      # at step 0, or one a stop interrupted
                while self.step < spec.num_steps and not self.stop.requested:
                    self._one_step()
                if not self.stop.requested and not self.complete:
                    self._validate_and_record()      # the final evaluation
                    self.complete = True
                    self.checkpoint()
                    self.records.event(Event.RUN_END, self.step, policy_version=self.consumer.version)
                break
            except ActorLost as e:   # a role whose restart is ROLL_BACK (roles.RESTART: the learner)
                self.rollback(e)
            except Preempted:
                break   # nothing of an interrupted step was kept: the state is the last complete step's
        preempted = self.stop.requested and not self.complete
        if preempted:
            self._preempted()
        self.records.close()
        val = read_jsonl(self.run_dir / "validation.jsonl")
        return {"first_val": val[0] if val else None, "final_val": val[-1] if val else None,
                "first": self.history[0] if self.history else None,
                "last": self.history[-1] if self.history else None,
                "history": self.history, "preempted": preempted}

    def _one_step(self) -> None:
        """One training step, its records, and the validation and checkpoint due after it. A stop
        request before the learner update leaves the state as the previous step ended it."""
        spec, before = self.spec, self._own_state()
        self.interruptible = True
        try:
            self.step += 1
            m = self.train_step()
        except Preempted:
            self.load_state_dict(before)   # the counters as the last complete step left them (the batch went back)
            raise
        self.records.metrics.write(m)
        self.history.append(m)
        if self.exporter is not None:   # nodes that joined or left the cluster
            self.exporter.set_ray_targets(self._ray_metrics_targets())
        if self.step % spec.metrics.print_every_steps == 0 or self.step == spec.num_steps:
            self.log(f"step {self.step:4d}/{spec.num_steps}  reward {m['reward_mean']:.3f}  acc {m['accuracy']:.3f}"
                     f"  entropy {m['entropy']:.3f}  kl {m['kl']:.2e}  kept {m['kept_groups_frac']:.2f}"
                     f"  rounds {m['gen_rounds']}  clip_hi {m['clip_frac_high']:.3f}  resets {m['reference_resets']}"
                     f"  {m['step_s']:.1f}s  {m['gen_tokens_per_s']:.0f} tok/s")
        if self._validation_due():
            self._validate_and_record()
        ce = spec.checkpoint.every_steps
        if ce and self.step % ce == 0 and self.step != spec.num_steps:
            self.checkpoint()

    def _validation_due(self) -> bool:
        """A periodic validation after this step (the final one is the run's last act)."""
        ve = self.spec.validation.every_steps
        return bool(ve) and self.step % ve == 0 and self.step != self.spec.num_steps

    def _validate_and_record(self) -> None:
        self.interruptible = True
        val = self.validate()
        self.records.validation.write(val)
        self.consumer.resets.observe_validation(val["accuracy"])
        self.last_validation_step = self.step
        self.log(f"step {self.step} validation: accuracy {val['accuracy']:.3f}")


def summary_table(result: dict) -> str:
    """Start versus end of a run, for people."""
    fv, lv, f, l = result["first_val"], result["final_val"], result["first"], result["last"]
    hist = result["history"]
    tail = hist[-5:]
    head = hist[:5]
    avg = lambda rows, k: float(np.nanmean([r[k] for r in rows]))  # noqa: E731
    rows = [("validation accuracy (held-out)", fv["accuracy"], lv["accuracy"])]
    for k in sorted(fv):
        if k.startswith(("accuracy/", "pass@")):
            rows.append((f"  {k}", fv[k], lv.get(k, math.nan)))
    rows += [("  answers in their family's format", fv["answer_format_frac"], lv["answer_format_frac"]),
             ("  accuracy of formatted answers", fv["accuracy_when_formatted"], lv["accuracy_when_formatted"])]
    rows += [("training reward (mean of 5 steps)", avg(head, "reward_mean"), avg(tail, "reward_mean")),
             ("entropy", f["entropy"], l["entropy"]),
             ("KL to reference", f["kl"], l["kl"]),
             ("reference resets", 0, l["reference_resets"])]
    w = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':{w}}{'start':>10}{'end':>10}{'change':>10}"]
    for name, a, b in rows:
        lines.append(f"{name:{w}}{a:10.4g}{b:10.4g}{b - a:+10.3g}")
    return "\n".join(lines)
