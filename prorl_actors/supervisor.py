"""The supervisor: owns the run and reads like the recipe.

The rollout producer (runtime/producer.py) makes the batches: prompts -> generate (G per
prompt) -> verify -> dynamic sampling (groups whose rewards are all equal dropped, more
prompts sampled, up to `max_rounds` rounds), sampled with the weights of step
k - 1 - supervisor.max_staleness, so that with a staleness above 0 they are made while the
learner trains. One step (the consumer) =
  its batch (recorded short if it is) -> group advantages -> reference logprobs
  -> learner update (KL penalty in the loss, off-policy correction) -> the new version
  published to the producer -> reference reset when due -> metrics.
Validation (accuracy and pass@k per task on held-out prompts) runs at step 0, every
`validation.every_steps` and at the end.

Surviving (see group.py for the stateless roles):
- a checkpoint every `checkpoint.every_steps`, at the end and on SIGTERM holds the whole
  state; a run started on a directory with one continues from it (`resume`);
- a dead generator or verifier is replaced and its work sent again, inside the step;
- a dead reference is rebuilt from what it was last set to (the checkpoint's reference or
  the weights of its last reset), and its call repeated;
- a dead learner takes its optimizer state with it: the run rolls back to the last
  checkpoint, in-process, and does those steps again (their records move aside);
- SIGTERM (`ray job stop`, preemption) interrupts generation or validation at once, or lets
  a learner update finish, then checkpoints the last complete step and returns.
"""
from __future__ import annotations

import functools
import json
import math
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from prorl_actors import batch as B
from prorl_actors.actors.generator import GENERATOR_ENV, GeneratorActor
from prorl_actors.actors.learner import LearnerActor
from prorl_actors.actors.reference import ReferenceActor
from prorl_actors.actors.verifier import VerifierActor
from prorl_actors.algo import (KLController, ResetPolicy, get_adv_estimator, kl_share, mixture_entropy, overlong_penalty,
                               pass_at_k_mean, scale_for_entropy)
from prorl_actors.checkpoint import REFERENCE_DIR, read_state, save_checkpoint
from prorl_actors.engines.generation import SamplingSpec, generation_chunks
from prorl_actors.exporter import Exporter
from prorl_actors.group import ActorGroup, ActorLost, LearnerGroup, Preempted
from prorl_actors.metrics import PHASES, RunRecords, read_jsonl
from prorl_actors.placement import Placement
from prorl_actors.runtime.producer import Fill, RolloutProducer, check_staleness, valid_rows
from prorl_actors.spec import RunSpec
from prorl_actors.sync import WeightSync
from prorl_actors.tasks import Item, TaskMixture, validation_items
from prorl_actors.tinymodel import load_tokenizer

class PhaseTimer:
    def __init__(self):
        self.s = {p: 0.0 for p in PHASES}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.s[phase] += time.perf_counter() - t0


class StopFlag:
    """Set by the SIGTERM/SIGINT handler; the supervisor stops at the next safe point."""

    def __init__(self):
        self.requested, self.signal = False, None


class Supervisor:
    def __init__(self, spec: RunSpec, model_path: Path, log=print, resume_from: Path | None = None,
                 stop: StopFlag | None = None):
        """resume_from: a checkpoint to continue from (the run directory's records after its step
        are rolled back first)."""
        self.spec, self.log, self.model_path = spec, log, Path(model_path)
        self.run_dir = spec.run_dir
        self.stop = stop or StopFlag()
        self.interruptible = False          # a stop interrupts only what run() marks (not a learner update)
        self.tokenizer = load_tokenizer(model_path)
        pad_id = self.tokenizer.pad_token_id
        g, G = spec.generator, spec.group_size
        self.max_prompt_tokens = g.max_model_len - g.max_new_tokens
        self.mixture = TaskMixture(spec.data)
        self.val_rejected: list[dict] = []
        self.data_notes: list[dict] = []     # recorded as events once the run starts
        val_items = validation_items(spec.data, spec.validation.num_prompts_per_task, self.val_rejected,
                                     extra=spec.validation.tasks, notes=self.data_notes)
        self.train_task_names = {t.name for t in spec.data.tasks}
        self.resets = make_reset_policy(spec)
        self.kl = make_kl_controller(spec)
        self.version = 0
        self.reference_version = 0
        self.next_group_id = 0       # of the validation prompts (the training prompts' are the producer's)
        self.num_item_rejects = 0    # training items whose generator raised, in the batches trained so far
        self.step = 0
        self.last_validation_step = -1
        self.complete = False
        self.history: list[dict] = []
        # where the stateful actors come from: a checkpoint, else the base model
        self.restore_from = Path(resume_from) if resume_from else None
        self.reference_weights_ref = None   # the weights of the reference's last reset (None: restore_from/base)
        self.rollbacks, self.resumes = 0, 0
        resume_state = read_state(resume_from) if resume_from else None
        pspec = spec.metrics.prometheus
        self.exporter = Exporter(spec.name, spec.num_steps, pspec, reset_reasons=spec.supervisor.resets.triggers,
                                 log=log) if pspec.enabled else None
        self.records = RunRecords(self.run_dir, exporter=self.exporter)
        if resume_state is not None:   # records of later steps go aside before anything is written
            rolled_back_lines = self.records.roll_back_to(resume_state["step"], resume_state["last_validation_step"])
        if self.exporter is not None:   # serving from here, on the records as they stand
            address = self.exporter.start(self._ray_metrics_targets())
            self.log(f"metrics: http://{address}/metrics (Prometheus targets in {pspec.targets_dir})")
        # the held-out prompts, tokenized once (rejections are recorded once, at run start)
        self.val_prompts = self._prompt_table(val_items, split="validation", record=resume_state is None)
        if self.val_prompts.num_rows == 0:
            raise ValueError("no usable validation prompt (see events.jsonl: item_rejected / prompt_rejected)")

        path = str(model_path)
        ft = spec.fault_tolerance
        common = dict(max_restarts=ft.max_actor_restarts, call_timeout_s=ft.call_timeout_s,
                      on_event=self._actor_event, should_stop=lambda: self.stop.requested and self.interruptible)
        t0 = time.time()
        ln = spec.learner
        self.placement = Placement(spec)   # the learner's bundles, and the roles colocated in them
        self.sync: WeightSync | None = None   # once the groups are up
        self.generators = ActorGroup(GeneratorActor, g.num_actors, num_cpus=g.num_cpus, num_gpus=g.num_gpus,
                                     env=GENERATOR_ENV, args=lambda rank: (path, spec.model.dtype, g, spec.seed + rank),
                                     name="generator", on_restart=lambda actor: self.sync.on_generator_restart(actor),
                                     placement=self.placement.options("generator"), **common)
        self.verifiers = ActorGroup(VerifierActor, spec.verifier.num_actors, num_cpus=spec.verifier.num_cpus,
                                    args=(spec.data, spec.verifier, spec.validation.tasks), name="verifier", **common)
        self.learner = LearnerGroup(LearnerActor, ln.num_actors, num_cpus=ln.num_cpus, num_gpus=ln.num_gpus,
                                    args=lambda rank: (self._policy_path(), ln, spec.algorithm, g.temperature,
                                                       G, g.max_new_tokens, pad_id, spec.seed),
                                    name="learner", on_restart=lambda actor: self._restore_learner(),
                                    placement=self.placement.options("learner"), **common)
        self.reference = ActorGroup(ReferenceActor, spec.reference.num_actors, num_cpus=spec.reference.num_cpus,
                                    num_gpus=spec.reference.num_gpus,
                                    args=lambda rank: (self._reference_path(), spec.model.dtype, spec.reference,
                                                       g.temperature * spec.reference.temperature_scale, pad_id),
                                    name="reference", stateless=False, on_restart=self._restore_reference,
                                    placement=self.placement.options("reference"), **common)
        self.groups = (self.generators, self.verifiers, self.learner, self.reference)
        for grp in self.groups:
            grp.ping(timeout_s=600)
        self.sync = WeightSync(spec.weight_sync, self.learner, self.generators,
                               workers_per_generator=g.vllm.tensor_parallel_size if g.engine == "vllm" else 1,
                               backend="nccl" if ln.num_gpus > 0 else "gloo", log=log, dtype=spec.model.dtype,
                               ahead=spec.supervisor.max_staleness > 0)
        self.log(f"actors up in {time.time() - t0:.1f}s: {len(self.generators)} generator ({g.engine}), "
                 f"{len(self.verifiers)} verifier, {len(self.learner)} learner ({ln.engine}"
                 + (f", ZeRO-{ln.deepspeed.zero_stage}" if ln.engine == "deepspeed" else "")
                 + f"), {len(self.reference)} reference; weights by {spec.weight_sync.method}")
        self.producer = RolloutProducer(spec, self.generators, self.verifiers, self.mixture, self.tokenizer, self.sync)
        self.producer.next_group_id = self.next_group_id
        # rollouts are made while the reference and the learner work (no broadcast is started while
        # the learner updates: it is the learner that sends it)
        self.reference.background = self.producer.pump
        self.learner.background = functools.partial(self.producer.pump, may_push=False)
        self._last_step_end = (time.monotonic(), 0.0, 0.0)   # (when, generator busy s, bound-held s then)
        self.initial_state = self.state_dict()   # what a rollback with no checkpoint yet returns to
        if resume_state is not None:
            self._resume(resume_state, rolled_back_lines)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The supervisor's part of a checkpoint (the actors save theirs): its own, and the rollout
        producer's (the sampler, and the batches made ahead, whose rows `checkpoint` saves)."""
        return {**self._own_state(), **self.producer.state_dict()}

    def _own_state(self) -> dict:
        return {"step": self.step, "policy_version": self.version, "reference_version": self.reference_version,
                "kl": self.kl.state_dict(), "resets": self.resets.state_dict(),
                "num_item_rejects": self.num_item_rejects, "last_validation_step": self.last_validation_step, "complete": self.complete,
                "rng": {"python": json.dumps(random.getstate()), "numpy": _np_rng_state(),
                        "torch": torch.get_rng_state().tolist()}}

    def load_state_dict(self, st: dict, ckpt: Path | None = None) -> None:
        """A checkpoint's state (its rollouts read from `ckpt`), or `_own_state` alone."""
        self.step, self.version, self.reference_version = st["step"], st["policy_version"], st["reference_version"]
        self.kl.load_state_dict(st["kl"])
        self.resets.load_state_dict(st["resets"])
        self.num_item_rejects = st["num_item_rejects"]
        if "data" in st:
            self.producer.load_state_dict(st, ckpt, step=self.step)
        self.last_validation_step, self.complete = st["last_validation_step"], st["complete"]
        version, internal, gauss = json.loads(st["rng"]["python"])
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, gauss = st["rng"]["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(torch.tensor(st["rng"]["torch"], dtype=torch.uint8))

    @staticmethod
    def _ray_metrics_targets() -> list[str]:
        """host:port of every live Ray node's own metrics."""
        return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()
                if n["Alive"] and n.get("MetricsExportPort")]

    def _policy_path(self) -> str:
        return str(self.restore_from or self.model_path)

    def _reference_path(self) -> str:
        return str(self.restore_from / REFERENCE_DIR if self.restore_from else self.model_path)

    def _restore_learner(self) -> None:
        """Learner ranks built from a checkpoint's weights get its optimizer, schedule and RNG; the
        weights must be the ones the checkpoint recorded."""
        if self.sync is not None:   # new learner processes: not in the weight-broadcast group
            self.sync.on_learner_restart()
        if self.restore_from is None:
            return
        digest = self.learner.call_one("load_state", str(self.restore_from), step=self.step)
        expected = read_state(self.restore_from)["weights_sha256"]
        if digest != expected:
            raise RuntimeError(f"{self.restore_from}: the learner's weights after loading differ from the "
                               f"ones saved ({digest[:12]} != {expected[:12]})")

    def _restore_reference(self, actor) -> None:
        if self.reference_weights_ref is not None:
            ray.get(actor.reset_to.remote(self.reference_weights_ref, self.reference_version))

    def _actor_event(self, kind: str, step: int | None = None, **fields) -> None:
        self.records.event(kind, self.step if step is None else step, **fields)
        self.log(f"step {self.step}: {kind.replace('_', ' ')}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))

    def _publish(self, resumed: bool = False) -> None:
        """This step is done and the learner's weights are version self.version: staged in the object
        store (object_store method) for the generators, which take them when the producer's schedule
        says. After a resume or rollback the producer starts over from here."""
        if self.spec.weight_sync.method == "object_store":
            self.sync.stage(self.version, step=self.step)
        if resumed:
            self.producer.set_published(self.step, self.version)
            return
        self.producer.publish(self.step, self.version)
        if self.spec.supervisor.max_staleness == 0 or self.step == self.spec.num_steps:
            self._generators_at_current()  # what the next batch (or the final validation) is sampled with
        else:
            self.producer.pump(0.0)        # a batch waiting for these weights may start now

    def _generators_at_current(self) -> None:
        """The generators on the learner's weights (for a validation): every batch sampled with
        older ones made first."""
        self.producer.drain_before(self.step)
        self.producer.push(self.version, step=self.step)

    def _reference_call(self, method: str, *args):
        """A reference call: logprobs spread over the reference actors, a reset or load to every
        one, anything else to actor 0. A dead reference is rebuilt (from a checkpoint's reference
        or the weights of its last reset) and the call repeated."""
        while True:
            try:
                if method == "logprobs":
                    return self.reference.map_table(method, *args, rows_per_unit=self.spec.group_size, step=self.step)
                if method in ("reset_to", "load"):
                    return self.reference.call_all(method, *args, step=self.step)[0]
                return self.reference.call_one(method, *args, step=self.step)
            except ActorLost as e:
                self.reference.replace(e.rank, e.cause, step=self.step)

    def _resume(self, st: dict, rolled_back_lines: int) -> None:
        """Continue the run from the checkpoint in restore_from: the learner already holds its
        weights (it was built from them); its optimizer and RNG, the supervisor's state, the
        generators' weights follow."""
        self.load_state_dict(st, self.restore_from)
        self.complete = self.complete and self.step >= self.spec.num_steps   # num_steps raised: go on
        self._restore_learner()
        self._publish(resumed=True)
        self.history = [m for m in read_jsonl(self.run_dir / "metrics.jsonl") if m["step"] <= self.step]
        events = read_jsonl(self.run_dir / "events.jsonl")
        for grp in self.groups:   # restarts count over the whole run, across resumes
            grp.restarts = sum(e["event"] == "actor_restarted" and e.get("role") == grp.role for e in events)
        self.rollbacks = sum(e["event"] == "rolled_back" for e in events)
        self.resumes = sum(e["event"] == "run_resumed" for e in events) + 1
        self.records.event("run_resumed", self.step, checkpoint=str(self.restore_from), policy_version=self.version,
                           kl_coef=self.kl.coef, weights_sha256=st["weights_sha256"], data=st["data"]["cursors"],
                           rolled_back_lines=rolled_back_lines)
        self.log(f"resumed from {self.restore_from} at step {self.step} (policy version {self.version}, "
                 f"KL coefficient {self.kl.coef:.4g}, {self.resets.num_resets} reference resets so far; "
                 f"{rolled_back_lines} record lines of later steps moved to rolled_back.jsonl)")

    def rollback(self, lost: ActorLost) -> None:
        """The learner died with its optimizer state: every stateful part goes back to the last
        checkpoint (or to the start), in-process, and the steps after it are done again."""
        ft = self.spec.fault_tolerance
        if self.rollbacks >= ft.max_rollbacks:
            raise RuntimeError(f"{lost}; {self.rollbacks} rollbacks already, the limit "
                               "(fault_tolerance.max_rollbacks)")
        self.rollbacks += 1
        self.interruptible = False        # a stop waits until every part is back at the checkpoint
        from_step = self.step
        ckpt = self.restore_from          # the newest checkpoint saved or resumed from (None: the start)
        state = read_state(ckpt) if ckpt else self.initial_state
        self.learner.replace(0, lost.cause, step=from_step)     # built from restore_from, then its state
        self.load_state_dict(state, ckpt)
        self.reference_weights_ref = None
        self._reference_call("load", self._reference_path(), self.reference_version)
        self._publish(resumed=True)
        moved = self.records.roll_back_to(self.step, self.last_validation_step)
        self.history = [m for m in self.history if m["step"] <= self.step]
        self.records.event("rolled_back", from_step, to_step=self.step, checkpoint=str(ckpt) if ckpt else None,
                           cause=str(lost), rolled_back_lines=moved)
        self.log(f"step {from_step}: {lost}; rolled back to {'step ' + str(self.step) if ckpt else 'the start'} "
                 f"and going on from there ({moved} record lines moved to rolled_back.jsonl)")

    # ------------------------------------------------------------------ prompts
    def _prompt_table(self, items: list[Item], split: str, record: bool = True) -> pa.Table:
        table, rejected = B.make_prompts(items, self.tokenizer, self.max_prompt_tokens, self.next_group_id)
        self.next_group_id += table.num_rows
        for it, why in rejected if record else ():
            self.records.event("prompt_rejected", self.step, split=split, task=it.task, item_index=it.index,
                               reason=why)
        return table

    def _rollouts(self, prompts: pa.Table, sp: SamplingSpec) -> pa.Table:
        """Generate and verify (a validation: the generators hold the current version)."""
        g = self.spec.generator
        fill = g.vllm.max_num_seqs if g.engine == "vllm" else g.hf_batch_size
        chunks = generation_chunks(prompts.num_rows, sp.n, g.num_actors, g.chunks_per_actor, fill)
        rollouts = self.generators.map_table("generate", prompts, sp, num_chunks=chunks, step=self.step)
        check_staleness(rollouts, self.version, 0, self.step)
        return self.verifiers.map_table("verify", rollouts, rows_per_unit=sp.n, step=self.step)

    def reference_needed(self) -> bool:
        """Whether the step needs the reference's log-probs: a KL penalty in the loss, or a
        controller or reset trigger that reads the KL (beta 0, fixed, no kl trigger: skipped)."""
        k = self.spec.supervisor.kl
        return not (k.mode == "fixed" and k.actuator == "kl_coef" and k.coef == 0
                    and "kl" not in self.spec.supervisor.resets.triggers)

    def train_step(self) -> dict:
        """One step of the recipe: its batch (made ahead by the producer, within the staleness
        bound) -> advantages -> reference log-probs -> update -> the new version published ->
        controllers and resets."""
        timer = PhaseTimer()
        t0 = time.perf_counter()
        with timer("wait"):
            fill = self.producer.take(self.step)
        try:
            return self._train_on(fill, timer, t0)
        except Preempted:
            self.producer.untake(fill)     # stopped before the update: the batch is trained on after the resume
            raise

    def _train_on(self, fill: Fill, timer: PhaseTimer, t0: float) -> dict:
        spec, G = self.spec, self.spec.group_size
        for kind, fields in fill.events:
            if kind == "item_rejected":
                self.num_item_rejects += 1
            self.records.event(kind, fill.step, **fields)
        batch = fill.batch(spec.supervisor.num_prompts_per_step, G)
        n_groups = batch.num_rows // G if batch is not None else 0
        if n_groups < spec.supervisor.num_prompts_per_step:
            self.records.event("batch_short", self.step, groups=n_groups,
                               wanted=spec.supervisor.num_prompts_per_step, rounds=fill.rounds)
        stats, stale = {}, None
        if batch is None:
            self.records.event("no_informative_groups", self.step, rounds=fill.rounds)
        else:
            stale = check_staleness(batch, self.version, spec.supervisor.max_staleness, self.step)   # (B,)
            batch, shaping = trainable_batch(batch, spec)
            ref_scale = self.ref_temperature_scale()
            if batch.num_rows and self.reference_needed():
                with timer("reference"):
                    batch = self._reference_call("logprobs", batch, spec.generator.temperature * ref_scale)
        if batch is not None and not batch.num_rows:   # every response truncated, under overlong mask
            self.records.event("no_trainable_rows", self.step, groups=n_groups)
            batch = None
        if batch is not None:
            self.interruptible = False      # from here the step is let finish: the learner's state moves
            with timer("learn"):
                kl_coef, entropy_coef = self.coefs()
                stats = self.learner.call_one("update", batch, kl_coef, entropy_coef, step=self.step)
            stats["kl_coef_used"], stats["entropy_coef_used"] = kl_coef, entropy_coef
            stats["ref_temperature_scale_used"] = ref_scale
            stats["entropy_signal"] = self.entropy_signal(stats)
            stats["kl_share"] = kl_share(stats.get("pg_loss", math.nan), stats.get("kl", math.nan), kl_coef)
            stats.update(shaping)
        if stats and stats["optimizer_steps"] == 0:  # every update was non-finite: weights unchanged
            self.records.event("update_skipped", self.step, skipped_updates=stats["skipped_updates"])
            self._publish()                 # the step is done, on the same version
        elif not stats:
            self._publish()
        else:
            with timer("sync"):
                self.version += 1
                self._publish()
            # the controller sets the coefficient of the next step from this step's entropy and KL
            self.kl.update(stats["entropy_signal"], stats.get("kl", math.nan))
            self.resets.observe_step(stats.get("kl", math.nan), stats["entropy_signal"])
            floor, ceiling = self.reset_entropy_limits()
            decision = self.resets.decide(self.step, pg_loss=stats.get("pg_loss", math.nan),
                                          kl=stats.get("kl", math.nan), kl_coef=stats["kl_coef_used"],
                                          entropy_floor=floor, entropy_ceiling=ceiling)
            if decision and decision[0] == "reset":
                self.reset_reference(decision[1], batch)
            elif decision and (decision[0] == "skip" or self.resets.waiting_since == self.step):
                event = "reference_reset_skipped" if decision[0] == "skip" else "reference_reset_waits"
                self.records.event(event, self.step, reason=decision[1], entropy_target=self.kl.target)
                self.log(f"step {self.step}: {event.replace('_', ' ')} ({decision[1]})")
        return self._step_metrics(fill, n_groups, stats, stale, timer, time.perf_counter() - t0)

    def _step_metrics(self, fill: Fill, n_kept: int, stats: dict, stale, timer: PhaseTimer, step_s: float) -> dict:
        G = self.spec.group_size
        if not fill.made:
            raise RuntimeError(f"step {self.step}: no usable prompt in {fill.rounds} rounds (see events.jsonl)")
        allr = B.concat(fill.made)
        valid = valid_rows(allr).numpy()                     # a failed verification is no reward at all
        rewards = allr[B.REWARD].to_numpy()
        resp_len = pc.list_value_length(allr[B.RESPONSE_IDS]).to_numpy()
        tasks = np.array(allr[B.TASK].to_pylist())
        beta_next, bonus_next = self.coefs()
        entropy_target = self.kl.mode == "entropy-target"
        trained_tokens = stats.get("trained_tokens", 0)
        now, (last_end, last_busy, last_bound) = time.monotonic(), self._last_step_end
        busy, bound = self.producer.gen.busy_s, self.producer.bound_seconds()
        window = max(now - last_end, 1e-9)      # since the last step ended (its validation, checkpoint included)
        self._last_step_end = (now, busy, bound)
        frac = lambda x: min(1.0, max(0.0, x))  # noqa: E731
        pushes = self.producer.take_pushes()
        mean_of = lambda x, keep: float(x[keep].mean()) if keep.any() else math.nan  # noqa: E731
        m = {
            "step": self.step, "time": time.time(), "policy_version": self.version,
            "reference_version": self.reference_version,
            "reward_mean": mean_of(rewards, valid), "accuracy": mean_of(rewards >= 1.0, valid),
            "entropy": stats.get("entropy", math.nan), "entropy_signal": stats.get("entropy_signal", math.nan),
            "kl": stats.get("kl", math.nan),
            "kl_coef": stats.get("kl_coef_used", beta_next), "kl_coef_next": beta_next,
            "entropy_coef": stats.get("entropy_coef_used", bonus_next),
            "ref_temperature_scale": stats.get("ref_temperature_scale_used", self.ref_temperature_scale()),
            "kl_share": stats.get("kl_share", math.nan),
            "entropy_target": self.kl.target if entropy_target and self.kl.target is not None else math.nan,
            "entropy_band": self.kl.band if entropy_target else math.nan,
            **{k: stats.get(k, math.nan) for k in (
                "pg_loss", "clip_frac_low", "clip_frac_high", "clip_frac", "dual_clip_frac", "approx_kl",
                "grad_norm", "lr", "optimizer_steps", "sampler_logp_gap", "kl_capped_frac", "pad_frac",
                "overlong_penalty", "unverified_rows", "is_weight_mean", "is_masked_frac", "logp_mismatch_k3", "logp_gap_max",
                "logp_gap_over_log2_frac")},
            "kept_groups_frac": fill.n_kept / (allr.num_rows // G), "trained_groups": n_kept, "gen_rounds": fill.rounds,
            "surplus_groups": fill.n_kept - n_kept, "keep_rate": fill.keep_rate,
            # how old the trained rows were (policy versions behind the learner's), how far ahead
            # generation runs, and who waited for whom
            "max_staleness": self.spec.supervisor.max_staleness,
            "staleness_mean": float(stale.mean()) if stale is not None else math.nan,
            "staleness_max": int(stale.max()) if stale is not None else math.nan,
            "buffered_batches": self.producer.buffered(),
            "generator_idle_frac": frac(1.0 - (busy - last_busy) / (len(self.generators) * window)),
            "generator_bound_wait_frac": frac((bound - last_bound) / window),
            "learner_idle_frac": frac(1.0 - (timer.s["learn"] + timer.s["sync"]) / window),
            "learner_wait_frac": frac(timer.s["wait"] / window),
            "response_len_mean": float(resp_len.mean()),
            "answer_format_frac": float(allr[B.FORMATTED].to_numpy(zero_copy_only=False).mean()),
            "truncated_frac": float(allr[B.TRUNCATED].to_numpy(zero_copy_only=False).mean()),
            "verify_errors": int(allr[B.VERIFY_ERROR].to_numpy(zero_copy_only=False).sum()),
            "verify_timeouts": int(allr[B.VERIFY_TIMEOUT].to_numpy(zero_copy_only=False).sum()),
            "skipped_updates": stats.get("skipped_updates", 0),
            "item_rejects": self.num_item_rejects,
            "reference_resets": self.resets.num_resets,
            "reference_reset_waiting": int(self.resets.waiting_since is not None),
            "reference_resets_skipped": len(self.resets.skipped),
            **{f"actor_restarts/{grp.role}": grp.restarts for grp in self.groups},
            "rollbacks": self.rollbacks, "resumes": self.resumes,
            "last_checkpoint_step": self.last_checkpoint_step(),
            "step_s": step_s,
            "gen_tokens": int(resp_len.sum()),
            "gen_tokens_per_s": float(resp_len.sum()) / max(fill.times["generate"], 1e-9),
            "trained_tokens": trained_tokens,
            "train_tokens_per_s": trained_tokens / timer.s["learn"] if trained_tokens else math.nan,
            # the weights pushed to the generators during the step (a version, when a batch starts on it)
            "sync_mb": pushes[-1]["sync_mb"] if pushes else math.nan,
            "sync_mb_per_s": sum(p["sync_mb"] for p in pushes) / max(sum(p["sync_s"] for p in pushes), 1e-9)
            if pushes else math.nan,
        }
        errors = allr[B.VERIFY_ERROR].to_numpy(zero_copy_only=False)
        timeouts = allr[B.VERIFY_TIMEOUT].to_numpy(zero_copy_only=False)
        for t in sorted(set(tasks)):
            m[f"reward/{t}"] = mean_of(rewards, valid & (tasks == t))
            m[f"accuracy/{t}"] = mean_of(rewards >= 1.0, valid & (tasks == t))
            m[f"verify_errors/{t}"] = int(errors[tasks == t].sum())
            m[f"verify_timeouts/{t}"] = int(timeouts[tasks == t].sum())
            m[f"entropy/{t}"] = stats.get(f"entropy/{t}", math.nan)    # trained tokens of the task
        timer.s["generate"], timer.s["verify"] = fill.times["generate"], fill.times["verify"]   # the batch's own
        for p in PHASES:
            m[f"time/{p}_s"] = timer.s[p]
        # what the step waited on: its batch (the generation the learner could not hide), then its own phases
        m["time/other_s"] = step_s - sum(timer.s[p] for p in ("wait", "reference", "learn", "sync"))
        return m

    def coefs(self) -> tuple[float, float]:
        """(beta, entropy bonus coefficient) for the next update: the controller moves one of them
        (or neither: the reference's temperature, ref_temperature_scale)."""
        k = self.spec.supervisor.kl
        if k.actuator == "entropy_coef":
            return k.coef, self.kl.coef
        if k.actuator == "reference_temperature":
            return k.coef, self.spec.algorithm.entropy_coef
        return self.kl.coef, self.spec.algorithm.entropy_coef

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
            return self.kl.coef
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

    def reset_reference(self, reason: str, batch: pa.Table | None = None) -> None:
        """Reference <- current policy; optimizer state re-initialised and the KL coefficient
        restored when the spec says so (or, moving the reference's temperature, the scale chosen
        so that the reference's entropy on this step's responses stays where it was); recorded
        with its reason."""
        rs, k = self.spec.supervisor.resets, self.spec.supervisor.kl
        match = k.actuator == "reference_temperature" and rs.match_reference_entropy and batch is not None
        if match:   # at most 128 rows spread over the batch: the entropy of both references on them
            rows = batch.take(np.linspace(0, batch.num_rows - 1, min(batch.num_rows, 128)).round().astype(np.int64))
            T, scale_before = self.spec.generator.temperature, self.ref_temperature_scale()
            ref_entropy = self._reference_call("entropy", rows, T * scale_before)
        self.reference_weights_ref, self.reference_version = self.sync.weights_ref(self.version), self.version
        self._reference_call("reset_to", self.reference_weights_ref, self.version)
        if rs.reset_optimizer:
            self.learner.call_one("reset_optimizer", step=self.step)
        if rs.restore_kl_coef:
            self.kl.restore_initial()
        extra = {}
        if match:
            self.kl.set_coef(scale_for_entropy(lambda sc: self._reference_call("entropy", rows, T * sc),
                                               ref_entropy, k.coef_min, k.coef_max))
            after = self.ref_temperature_scale()
            extra = {"ref_temperature_scale_before": scale_before, "ref_temperature_scale": after,
                     "ref_entropy_before": ref_entropy,
                     "ref_entropy": self._reference_call("entropy", rows, T * after)}
        self.resets.record(self.step, reason)
        self.records.event("reference_reset", self.step, reason=reason, policy_version=self.version,
                           optimizer_reset=rs.reset_optimizer, kl_coef=self.coefs()[0], **extra)
        self.log(f"step {self.step}: reference reset ({reason})")

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict:
        v, g = self.spec.validation, self.spec.generator
        sp = SamplingSpec(n=v.num_samples, temperature=v.temperature, top_p=v.top_p,
                          max_new_tokens=g.max_new_tokens, seed=self.spec.seed)
        self._generators_at_current()
        with self.producer.generators_held():
            rollouts = self._rollouts(self.val_prompts, sp)
        correct = (rollouts[B.REWARD].to_numpy() >= 1.0).reshape(-1, v.num_samples)  # (prompts, n)
        rewards = rollouts[B.REWARD].to_numpy().reshape(-1, v.num_samples)          # (prompts, n)
        tasks = np.array(rollouts[B.TASK].to_pylist()[::v.num_samples])               # (prompts,)
        formatted = rollouts[B.FORMATTED].to_numpy(zero_copy_only=False).reshape(-1, v.num_samples)
        train = np.isin(tasks, list(self.train_task_names))   # evaluation-only tasks are reported apart
        ok = formatted[train].reshape(-1)
        out = {"step": self.step, "accuracy": float(correct[train].mean()),
               # how much of the accuracy is following the answer format, how much is being right
               "answer_format_frac": float(ok.mean()),
               "accuracy_when_formatted": float(correct[train].reshape(-1)[ok].mean()) if ok.any() else 0.0,
               "verify_errors": int(rollouts[B.VERIFY_ERROR].to_numpy(zero_copy_only=False).sum()),
               "verify_timeouts": int(rollouts[B.VERIFY_TIMEOUT].to_numpy(zero_copy_only=False).sum())}
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
            self.records.event("run_start", 0, model=str(self.model_path), num_steps=spec.num_steps)
            for bad in self.val_rejected:
                self.records.event("item_rejected", 0, split="validation", **bad)
            for note in self.data_notes:
                self.records.event(note.pop("event"), 0, **note)
            for task, skipped in self.mixture.skipped_rows().items():
                self.records.event("rows_skipped", 0, task=task, count=len(skipped), first=skipped[:5])
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
                    self.records.event("run_end", self.step, policy_version=self.version)
                break
            except ActorLost as e:   # the learner (a reference is rebuilt where it is called)
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
        self.resets.observe_validation(val["accuracy"])
        self.last_validation_step = self.step
        self.log(f"step {self.step} validation: accuracy {val['accuracy']:.3f}")

    def _preempted(self) -> None:
        """SIGTERM: a checkpoint of the last complete step (unless nothing was trained yet)."""
        self.interruptible = False
        path = None
        if self.step > 0:   # the checkpoint of this step, unless a validation was done since it was saved
            saved = read_state(self.restore_from) if self.restore_from else None
            current = saved is not None and (saved["step"], saved["last_validation_step"]) == \
                (self.step, self.last_validation_step)
            path = self.restore_from if current else self.checkpoint()
        self.records.event("preempted", self.step, signal=self.stop.signal,
                           checkpoint=str(path) if path else None)
        self.log(f"stopped by {self.stop.signal} after step {self.step}: "
                 + (f"checkpoint {path}; the same command resumes from it" if path else "nothing trained yet"))

    def last_checkpoint_step(self) -> int:
        """The step of the checkpoint the run would restart from (saved or resumed from; 0: none)."""
        return read_state(self.restore_from)["step"] if self.restore_from else 0

    def checkpoint(self) -> Path:
        """The whole state at the end of this step: the learner's policy and optimizer, the
        reference, the supervisor's state (controllers, sampler, RNG, counters)."""
        t0 = time.perf_counter()
        self.interruptible = False        # a save in progress is finished, not abandoned
        self.producer.drain_before(self.step)   # batches of older weights are saved made, not in progress
        path = save_checkpoint(self.run_dir / "checkpoints", self.step,
                               lambda d: self.learner.call_one("save", d, step=self.step),
                               lambda d: self._reference_call("save", d), self.state_dict(),
                               self.spec.checkpoint.keep_last, tokenizer_from=self.model_path,
                               save_extra=self.producer.save)
        self.records.event("checkpoint", self.step, path=str(path), seconds=round(time.perf_counter() - t0, 3),
                           complete=self.complete)
        # from now on a rebuilt reference (or a rollback) starts from here: it holds the
        # reference as it is, so the weights of its last reset need not be kept any more
        self.restore_from, self.reference_weights_ref = path, None
        return path

    def shutdown(self) -> None:
        # stop the verifiers' helper processes (sandbox workers, math-verify) before the kill; not
        # through the group's calls, which would take a verifier that died before as a new death
        try:
            closing = [a.close.remote() for a in self.verifiers.actors]
            ray.wait(closing, num_returns=len(closing), timeout=60)
        except Exception as e:  # noqa: BLE001 - the kill below still has to happen
            self.log(f"closing verifiers: {type(e).__name__}: {e}")
        for grp in self.groups:
            grp.kill()
        self.placement.remove()
        if self.exporter is not None:
            # a finished run lets its end be scraped; a stopped one goes at once; a crashed one
            # leaves its target files, so Prometheus sees it down
            self.exporter.close(linger_s=self.spec.metrics.prometheus.linger_s if self.complete else 0.0,
                                forget=self.complete or self.stop.requested)


def _np_rng_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, gauss]


def make_kl_controller(spec: RunSpec) -> KLController:
    """The controller of the coefficient that supervisor.kl.actuator names."""
    k = spec.supervisor.kl
    target = k.entropy_target if k.mode == "entropy-target" else k.kl_target
    start = {"kl_coef": k.coef, "entropy_coef": spec.algorithm.entropy_coef,
             "reference_temperature": spec.reference.temperature_scale}[k.actuator]
    if k.actuator != "kl_coef":
        start = min(max(start, k.coef_min), k.coef_max)
    return KLController(mode=k.mode, coef=start, target=target, target_relative=k.entropy_target_relative,
                        band=k.band, rate=k.rate, kp=k.kp, coef_min=k.coef_min, coef_max=k.coef_max,
                        smoothing=k.smoothing, horizon=k.horizon)


def make_reset_policy(spec: RunSpec) -> ResetPolicy:
    r = spec.supervisor.resets
    inf = math.inf
    return ResetPolicy(triggers=tuple(r.triggers), every_steps=r.every_steps, patience=r.patience,
                       min_delta=r.min_delta, max_drop=r.max_drop or inf, max_kl_share=r.max_kl_share or inf,
                       kl_ceiling=r.kl_ceiling or inf, kl_steps=r.kl_steps, min_gap=r.min_gap,
                       max_wait_steps=r.max_wait_steps, entropy_window=r.entropy_window)


def trainable_batch(batch: pa.Table, spec: RunSpec) -> tuple[pa.Table, dict]:
    """The kept groups -> (what the reference and the learner get, its figures): ADV added
    (group-relative, on the rewards of the rows whose verification succeeded, with DAPO's soft
    overlong penalty when asked, whose mean over the rows is the figure `overlong_penalty`);
    the rows whose verification failed leave here (`unverified_rows`), and under overlong mode
    "mask" the truncated responses (after their group's advantages, which they count in), so
    that neither the reference nor the learner spends a pass on them."""
    G, ol = spec.group_size, spec.algorithm.overlong
    rewards = torch.tensor(batch[B.REWARD].to_numpy(), dtype=torch.float32)               # (B,)
    figures = {}
    if ol.mode == "soft_punish":   # DAPO: a length penalty shapes the advantages, not the filter
        lengths = torch.tensor(pc.list_value_length(batch[B.RESPONSE_IDS]).to_numpy())
        penalty = overlong_penalty(lengths, spec.generator.max_new_tokens, ol.buffer_tokens)  # (B,) in [-1, 0]
        rewards = rewards + penalty
        figures["overlong_penalty"] = float(penalty.mean())
    valid = valid_rows(batch)                                                              # (B,)
    adv = get_adv_estimator(spec.algorithm.adv_estimator)(rewards, G, valid=valid)         # (B,)
    batch = B.with_column(batch, B.ADV, adv.numpy())
    keep = valid.numpy()                  # a failed verification has no reward: no gradient either
    if ol.mode == "mask":   # truncated responses get no gradient
        keep = keep & ~batch[B.TRUNCATED].to_numpy(zero_copy_only=False)
    if not keep.all():
        batch = B.select_rows(batch, keep)
    figures["unverified_rows"] = int((~valid).sum())
    return batch, figures


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
