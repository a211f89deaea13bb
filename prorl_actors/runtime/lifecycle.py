"""The life of a run, apart from its steps: the actors brought up (and rebuilt when they die),
the state a checkpoint holds, a resume, a rollback after the learner died, a stop (SIGTERM,
preemption) and the checkpoints.

Surviving (each role's restart strategy is declared in roles.RESTART and carried out by its
group, group.py):
- a checkpoint every `checkpoint.every_steps`, at the end and on SIGTERM holds the whole
  state; a run started on a directory with one continues from it (`resume`);
- a dead generator or verifier is replaced and its work sent again, inside the step (REPLACE);
- a dead reference is rebuilt from what it was last set to (the checkpoint's reference or
  the weights of its last reset: `Consumer.restore_reference`), and its call repeated (REBUILD);
- a dead learner takes its optimizer state with it: the run rolls back to the last
  checkpoint, in-process, and does those steps again (their records move aside) (ROLL_BACK:
  `rollback`, called by the supervisor's loop);
- SIGTERM (`ray job stop`, preemption) interrupts generation or validation at once, or lets
  a learner update finish, then checkpoints the last complete step and returns.

`RunLifecycle` is the supervisor's base: the supervisor adds the recipe (the step, the
validation, the loop) on top of what is built and kept here.
"""
from __future__ import annotations

import functools
import json
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from prorl_actors import batch as rb
from prorl_actors.actors.generator import GENERATOR_ENV, GeneratorActor
from prorl_actors.actors.learner import LearnerActor
from prorl_actors.actors.reference import ReferenceActor
from prorl_actors.actors.verifier import VerifierActor
from prorl_actors.checkpoint import REFERENCE_DIR, read_state, save_checkpoint
from prorl_actors.events import Event
from prorl_actors.exporter import Exporter
from prorl_actors.group import ActorGroup, ActorLost, LearnerGroup
from prorl_actors.metrics import RunRecords, read_jsonl
from prorl_actors.placement import Placement
from prorl_actors.roles import RESTART, Learner, Reference, Restart, Role
from prorl_actors.runtime.consumer import Consumer
from prorl_actors.runtime.producer import RolloutProducer
from prorl_actors.spec import RunSpec
from prorl_actors.sync import WeightSync
from prorl_actors.tasks import Item, TaskMixture, validation_items
from prorl_actors.tinymodel import load_tokenizer
from prorl_actors.trackers import Trackers


class StopFlag:
    """Set by the SIGTERM/SIGINT handler; the supervisor stops at the next safe point."""

    def __init__(self):
        self.requested, self.signal = False, None


class RunLifecycle:
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
        self.next_group_id = 0       # of the validation prompts (the training prompts' are the producer's)
        self.num_item_rejects = 0    # training items whose generator raised, in the batches trained so far
        self.step = 0
        self.last_validation_step = -1
        self.complete = False
        self.history: list[dict] = []
        # where the stateful actors come from: a checkpoint, else the base model
        self.restore_from = Path(resume_from) if resume_from else None
        self.rollbacks, self.resumes = 0, 0
        resume_state = read_state(resume_from) if resume_from else None
        pspec = spec.metrics.prometheus
        self.exporter = Exporter(spec.name, spec.num_steps, pspec, reset_reasons=spec.supervisor.resets.triggers,
                                 log=log) if pspec.enabled else None
        self.trackers = Trackers.from_spec(spec, log=log)   # TensorBoard, W&B: fed as the exporter is
        self.records = RunRecords(self.run_dir, sinks=(self.exporter, self.trackers))
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
        # each role's restart strategy is roles.RESTART's; on_restart is what a replacement is given
        self.generators = ActorGroup.for_role(Role.GENERATOR, GeneratorActor, g.num_actors, num_cpus=g.num_cpus,
                                              num_gpus=g.num_gpus, env=GENERATOR_ENV,
                                              args=lambda rank: (path, spec.model.dtype, g, spec.seed + rank),
                                              on_restart=self._generator_replaced,
                                              placement=self.placement.options("generator"), **common)
        self.verifiers = ActorGroup.for_role(Role.VERIFIER, VerifierActor, spec.verifier.num_actors,
                                             num_cpus=spec.verifier.num_cpus,
                                             args=(spec.data, spec.verifier, spec.validation.tasks), **common)
        self.learner = LearnerGroup.for_role(Role.LEARNER, LearnerActor, ln.num_actors, num_cpus=ln.num_cpus,
                                             num_gpus=ln.num_gpus,
                                             args=lambda rank: (self._policy_path(), ln, spec.algorithm, g.temperature,
                                                                G, g.max_new_tokens, pad_id, spec.seed),
                                             on_restart=self._learner_rebuilt,
                                             placement=self.placement.options("learner"), **common)
        self.reference = ActorGroup.for_role(Role.REFERENCE, ReferenceActor, spec.reference.num_actors,
                                             num_cpus=spec.reference.num_cpus, num_gpus=spec.reference.num_gpus,
                                             args=lambda rank: (self._reference_path(), spec.model.dtype,
                                                                spec.reference,
                                                                g.temperature * spec.reference.temperature_scale,
                                                                pad_id),
                                             on_restart=self._reference_rebuilt,
                                             placement=self.placement.options("reference"), **common)
        self.groups = (self.generators, self.verifiers, self.learner, self.reference)
        self.consumer = Consumer(spec, self.learner, self.reference, self.records, log)
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
        self.consumer.sync = self.sync
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
        return {"step": self.step, **self.consumer.state_dict(),
                "num_item_rejects": self.num_item_rejects, "last_validation_step": self.last_validation_step, "complete": self.complete,
                "rng": {"python": json.dumps(random.getstate()), "numpy": _np_rng_state(),
                        "torch": torch.get_rng_state().tolist()}}

    def load_state_dict(self, st: dict, ckpt: Path | None = None) -> None:
        """A checkpoint's state (its rollouts read from `ckpt`), or `_own_state` alone."""
        self.step = st["step"]
        self.consumer.load_state_dict(st)
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

    # ------------------------------------------------------------------ what a replacement is given
    # (on_restart of each group; what the group does on a death is roles.RESTART's)
    def _generator_replaced(self, actor) -> None:
        """REPLACE: a new generator gets the generators' current weights (its work is re-sent)."""
        self.sync.on_generator_restart(actor)

    def _reference_rebuilt(self, actor) -> None:
        """REBUILD: a new reference gets the weights of the last reset, if there was one since the
        checkpoint it was built from (the call is made again)."""
        self.consumer.restore_reference(actor)

    def _learner_rebuilt(self, actor) -> None:
        """ROLL_BACK: new learner ranks (built from restore_from) get its optimizer, schedule and RNG."""
        self._restore_learner()

    def _restore_learner(self) -> None:
        """Learner ranks built from a checkpoint's weights get its optimizer, schedule and RNG; the
        weights must be the ones the checkpoint recorded."""
        if self.sync is not None:   # new learner processes: not in the weight-broadcast group
            self.sync.on_learner_restart()
        if self.restore_from is None:
            return
        digest = self.learner.call_one(Learner.load_state, str(self.restore_from), step=self.step)
        expected = read_state(self.restore_from)["weights_sha256"]
        if digest != expected:
            raise RuntimeError(f"{self.restore_from}: the learner's weights after loading differ from the "
                               f"ones saved ({digest[:12]} != {expected[:12]})")

    def _actor_event(self, kind: str, step: int | None = None, **fields) -> None:
        self.records.event(kind, self.step if step is None else step, **fields)
        self.log(f"step {self.step}: {kind.replace('_', ' ')}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))

    def _publish(self, resumed: bool = False) -> None:
        """This step is done and the learner's weights are the consumer's version: staged in the object
        store (object_store method) for the generators, which take them when the producer's schedule
        says. After a resume or rollback the producer starts over from here."""
        if self.spec.weight_sync.method == "object_store":
            self.sync.stage(self.consumer.version, step=self.step)
        if resumed:
            self.producer.set_published(self.step, self.consumer.version)
            return
        self.producer.publish(self.step, self.consumer.version)
        if self.spec.supervisor.max_staleness == 0 or self.step == self.spec.num_steps:
            self._generators_at_current()  # what the next batch (or the final validation) is sampled with
        else:
            self.producer.pump(0.0)        # a batch waiting for these weights may start now

    def _generators_at_current(self) -> None:
        """The generators on the learner's weights (for a validation): every batch sampled with
        older ones made first."""
        self.producer.drain_before(self.step)
        self.producer.push(self.consumer.version, step=self.step)

    def _resume(self, st: dict, rolled_back_lines: int) -> None:
        """Continue the run from the checkpoint in restore_from: the learner already holds its
        weights (it was built from them); its optimizer and RNG, the supervisor's state, the
        generators' weights follow."""
        self.load_state_dict(st, self.restore_from)
        self.complete = self.complete and self.step >= self.spec.num_steps   # num_steps raised: go on
        self._restore_learner()
        self._publish(resumed=True)
        self.history = [m for m in read_jsonl(self.run_dir / "metrics.jsonl") if m["step"] <= self.step]
        for grp in self.groups:   # restarts count over the whole run, across resumes (the records count them)
            grp.restarts = self.records.life_count(Event.ACTOR_RESTARTED, role=grp.role)
        self.rollbacks = self.records.life_count(Event.ROLLED_BACK)
        self.resumes = self.records.life_count(Event.RUN_RESUMED) + 1
        self.records.event(Event.RUN_RESUMED, self.step, checkpoint=str(self.restore_from), policy_version=self.consumer.version,
                           kl_coef=self.consumer.kl.value, weights_sha256=st["weights_sha256"], data=st["data"]["cursors"],
                           rolled_back_lines=rolled_back_lines)
        self.log(f"resumed from {self.restore_from} at step {self.step} (policy version {self.consumer.version}, "
                 f"KL coefficient {self.consumer.kl.value:.4g}, {self.consumer.resets.num_resets} reference resets so far; "
                 f"{rolled_back_lines} record lines of later steps moved to rolled_back.jsonl)")

    def rollback(self, lost: ActorLost) -> None:
        """The learner died with its optimizer state: every stateful part goes back to the last
        checkpoint (or to the start), in-process, and the steps after it are done again."""
        if RESTART.get(lost.role) is not Restart.ROLL_BACK:   # a group heals its other roles itself
            raise RuntimeError(f"{lost}: {lost.role} is not rolled back (roles.RESTART)") from lost
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
        self.consumer.reference_weights_ref = None
        self.reference.call_all(Reference.load, self._reference_path(), self.consumer.reference_version, step=self.step)
        self._publish(resumed=True)
        moved = self.records.roll_back_to(self.step, self.last_validation_step)
        self.history = [m for m in self.history if m["step"] <= self.step]
        self.records.event(Event.ROLLED_BACK, from_step, to_step=self.step, checkpoint=str(ckpt) if ckpt else None,
                           cause=str(lost), rolled_back_lines=moved)
        self.log(f"step {from_step}: {lost}; rolled back to {'step ' + str(self.step) if ckpt else 'the start'} "
                 f"and going on from there ({moved} record lines moved to rolled_back.jsonl)")


    # ------------------------------------------------------------------ prompts
    def _prompt_table(self, items: list[Item], split: str, record: bool = True) -> pa.Table:
        table, rejected = rb.make_prompts(items, self.tokenizer, self.max_prompt_tokens, self.next_group_id)
        self.next_group_id += table.num_rows
        for it, why in rejected if record else ():
            self.records.event(Event.PROMPT_REJECTED, self.step, split=split, task=it.task, item_index=it.index,
                               reason=why)
        return table

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
                               lambda d: self.learner.call_one(Learner.save, d, step=self.step),
                               lambda d: self.reference.call_one(Reference.save, d, step=self.step), self.state_dict(),
                               self.spec.checkpoint.keep_last, tokenizer_from=self.model_path,
                               save_extra=self.producer.save)
        self.records.event(Event.CHECKPOINT, self.step, path=str(path), seconds=round(time.perf_counter() - t0, 3),
                           complete=self.complete)
        # from now on a rebuilt reference (or a rollback) starts from here: it holds the
        # reference as it is, so the weights of its last reset need not be kept any more
        self.restore_from, self.consumer.reference_weights_ref = path, None
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
        if self.trackers is not None:
            self.trackers.close()
        if self.exporter is not None:
            # a finished run lets its end be scraped; a stopped one goes at once; a crashed one
            # leaves its target files, so Prometheus sees it down
            self.exporter.close(linger_s=self.spec.metrics.prometheus.linger_s if self.complete else 0.0,
                                forget=self.complete or self.stop.requested)


    def _preempted(self) -> None:
        """SIGTERM: a checkpoint of the last complete step (unless nothing was trained yet)."""
        self.interruptible = False
        path = None
        if self.step > 0:   # the checkpoint of this step, unless a validation was done since it was saved
            saved = read_state(self.restore_from) if self.restore_from else None
            current = saved is not None and (saved["step"], saved["last_validation_step"]) == \
                (self.step, self.last_validation_step)
            path = self.restore_from if current else self.checkpoint()
        self.records.event(Event.PREEMPTED, self.step, signal=self.stop.signal,
                           checkpoint=str(path) if path else None)
        self.log(f"stopped by {self.stop.signal} after step {self.step}: "
                 + (f"checkpoint {path}; the same command resumes from it" if path else "nothing trained yet"))


def _np_rng_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, gauss]

