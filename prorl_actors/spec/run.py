"""`RunSpec`: the whole run, one field per section, and the rules that span fields (those about
the tasks, which need their generators and files, are in tasks/checks.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prorl_actors.spec.algorithm import AlgorithmSpec, SupervisorSpec
from prorl_actors.spec.data import DataSpec, EvaluationSpec, ValidationSpec
from prorl_actors.spec.fields import opt
from prorl_actors.spec.roles import (CheckpointSpec, FaultToleranceSpec, GeneratorSpec, LearnerSpec, MetricsSpec,
                                     ModelSpec, PlacementSpec, RaySpec, ReferenceSpec, VerifierSpec, WeightSyncSpec)


@dataclass
class RunSpec:
    name: str = opt("run")
    output_dir: str = opt("runs")
    seed: int = opt(0, ge=0)
    num_steps: int = opt(100, ge=1)
    model: ModelSpec = opt(ModelSpec())
    generator: GeneratorSpec = opt(GeneratorSpec())
    verifier: VerifierSpec = opt(VerifierSpec())
    learner: LearnerSpec = opt(LearnerSpec())
    reference: ReferenceSpec = opt(ReferenceSpec())
    algorithm: AlgorithmSpec = opt(AlgorithmSpec())
    supervisor: SupervisorSpec = opt(SupervisorSpec())
    data: DataSpec = opt(DataSpec())
    validation: ValidationSpec = opt(ValidationSpec())
    evaluation: EvaluationSpec = opt(EvaluationSpec())
    checkpoint: CheckpointSpec = opt(CheckpointSpec())
    resume: str = opt("auto", help="auto: continue from the newest complete checkpoint of this run's directory "
                                   "if there is one; never: start afresh (an earlier run's directory is moved "
                                   "aside); or the path of a checkpoint directory (step_NNNNNN) to start from")
    fault_tolerance: FaultToleranceSpec = opt(FaultToleranceSpec())
    weight_sync: WeightSyncSpec = opt(WeightSyncSpec())
    placement: PlacementSpec = opt(PlacementSpec())
    metrics: MetricsSpec = opt(MetricsSpec())
    ray: RaySpec = opt(RaySpec())

    @property
    def group_size(self) -> int:
        """G: samples per prompt (ProRL: n = 16)."""
        return self.generator.num_samples_per_prompt

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def cross_checks(self) -> list[tuple[str, Any, str]]:
        """Rules that span fields: (key path, value, what is allowed)."""
        errs = []
        n, mb = self.supervisor.num_prompts_per_step, self.learner.num_prompts_per_mini_batch
        if mb > n:
            errs.append(("learner.num_prompts_per_mini_batch", mb,
                         f"at most supervisor.num_prompts_per_step ({n})"))
        for i, k in enumerate(self.validation.ks):
            if not 1 <= k <= self.validation.num_samples:
                errs.append((f"validation.ks[{i}]", k,
                             f"1..validation.num_samples ({self.validation.num_samples})"))
        ev = self.evaluation
        for i, k in enumerate(ev.ks):
            if not 1 <= k <= ev.num_samples:
                errs.append((f"evaluation.ks[{i}]", k, f"1..evaluation.num_samples ({ev.num_samples})"))
        names = [t.name for t in self.data.tasks] + [t.name for t in self.validation.tasks]
        for i, name in enumerate(ev.tasks):
            if name not in names:
                errs.append((f"evaluation.tasks[{i}]", name, f"one of {', '.join(names)} (data.tasks and "
                                                             "validation.tasks)"))
        if self.supervisor.dynamic_sampling.enabled and self.generator.num_samples_per_prompt < 2:
            errs.append(("generator.num_samples_per_prompt", self.generator.num_samples_per_prompt,
                         "at least 2 with supervisor.dynamic_sampling.enabled (a group of one is never informative)"))
        if self.generator.max_new_tokens >= self.generator.max_model_len:
            errs.append(("generator.max_new_tokens", self.generator.max_new_tokens,
                         f"less than generator.max_model_len ({self.generator.max_model_len})"))
        if self.generator.in_flight_updates and self.supervisor.max_staleness == 0:
            errs.append(("generator.in_flight_updates", True, "false with supervisor.max_staleness 0 (no newer "
                                                              "weights exist while a batch is sampled)"))
        trackers = self.metrics.trackers
        if len(set(trackers)) < len(trackers):
            errs.append(("metrics.trackers", trackers, "each tracker once"))
        kl, rs = self.supervisor.kl, self.supervisor.resets
        if kl.mode == "entropy-target" and (kl.entropy_target is None) == (kl.entropy_target_relative is None):
            errs.append(("supervisor.kl.entropy_target", kl.entropy_target,
                         "exactly one of entropy_target and entropy_target_relative with mode entropy-target"))
        if kl.actuator != "kl_coef" and kl.mode != "entropy-target":
            errs.append(("supervisor.kl.actuator", kl.actuator, f"{kl.actuator} only with mode entropy-target"))
        if kl.actuator == "reference_temperature":
            if kl.coef == 0:
                errs.append(("supervisor.kl.coef", kl.coef, "> 0 with actuator reference_temperature (the "
                                                            "penalty is what moves entropy)"))
            if kl.coef_min < 0.5 or kl.coef_max > 2:
                errs.append(("supervisor.kl.coef_min", [kl.coef_min, kl.coef_max],
                             "coef_min >= 0.5 and coef_max <= 2 with actuator reference_temperature (the "
                             "scale of the reference's temperature)"))
        if kl.mode == "kl-target" and kl.kl_target is None:
            errs.append(("supervisor.kl.kl_target", None, "a number with mode kl-target"))
        if kl.actuator == "reference_temperature" and rs.match_reference_entropy and rs.restore_kl_coef:
            errs.append(("supervisor.resets.restore_kl_coef", True, "false with match_reference_entropy and "
                                                                    "kl.actuator reference_temperature (both set "
                                                                    "the scale at a reset)"))
        if kl.coef_min >= kl.coef_max:
            errs.append(("supervisor.kl.coef_min", kl.coef_min, f"less than coef_max ({kl.coef_max})"))
        if "validation" in rs.triggers and self.validation.every_steps == 0:
            errs.append(("supervisor.resets.triggers", rs.triggers,
                         "validation only with validation.every_steps > 0 (it needs evaluations during the run)"))
        if "kl" in rs.triggers and rs.max_kl_share is None and rs.kl_ceiling is None:
            errs.append(("supervisor.resets.triggers", rs.triggers, "kl only with max_kl_share or kl_ceiling set"))
        if len(set(rs.triggers)) != len(rs.triggers):
            errs.append(("supervisor.resets.triggers", rs.triggers, "each trigger once"))
        if self.algorithm.overlong.buffer_tokens > self.generator.max_new_tokens and \
                self.algorithm.overlong.mode == "soft_punish":
            errs.append(("algorithm.overlong.buffer_tokens", self.algorithm.overlong.buffer_tokens,
                         f"at most generator.max_new_tokens ({self.generator.max_new_tokens})"))
        lp = self.algorithm.reward_shaping.length_penalty
        if lp.mode == "cosine" and lp.free_tokens >= self.generator.max_new_tokens:
            errs.append(("algorithm.reward_shaping.length_penalty.free_tokens", lp.free_tokens,
                         f"less than generator.max_new_tokens ({self.generator.max_new_tokens})"))
        if lp.period_steps is not None and lp.on_steps > lp.period_steps:
            errs.append(("algorithm.reward_shaping.length_penalty.on_steps", lp.on_steps,
                         f"at most period_steps ({lp.period_steps})"))
        if not self.data.tasks:
            errs.append(("data.tasks", [], "at least one task"))
        if abs(self.data.train_seed - self.data.validation_seed) < 1_000_000:
            errs.append(("data.validation_seed", self.data.validation_seed,
                         "at least 1,000,000 away from data.train_seed (items of nearby seeds overlap)"))
        if len(self.learner.betas) != 2 or not all(0 <= b < 1 for b in self.learner.betas):
            errs.append(("learner.betas", self.learner.betas, "two numbers in [0, 1)"))
        if self.resume not in ("auto", "never") and not (Path(self.resume) / "supervisor_state.json").is_file():
            errs.append(("resume", self.resume, "auto, never, or a checkpoint directory (one holding "
                                                "supervisor_state.json)"))
        errs += self._scale_checks()
        if self.model.tiny.hidden_size % self.model.tiny.num_heads:
            errs.append(("model.tiny.num_heads", self.model.tiny.num_heads, "a divisor of model.tiny.hidden_size"))
        if self.model.tiny.num_heads % self.model.tiny.num_kv_heads:
            errs.append(("model.tiny.num_kv_heads", self.model.tiny.num_kv_heads, "a divisor of model.tiny.num_heads"))
        return errs

    def _scale_checks(self) -> list[tuple[str, Any, str]]:
        """Engines, ranks, placement and weight sync."""
        errs, ln, ds, g = [], self.learner, self.learner.deepspeed, self.generator
        if ln.num_actors > 1 and ln.engine != "deepspeed":
            errs.append(("learner.num_actors", ln.num_actors, "1 with learner.engine torch (data parallel ranks "
                                                              "need engine deepspeed)"))
        if ln.share_prompts and ln.gradient_checkpointing:
            errs.append(("learner.share_prompts", True, "false with learner.gradient_checkpointing (transformers "
                                                        "drops the key/value cache of checkpointed layers)"))
        if ln.engine == "deepspeed":
            if ln.autocast_bf16:
                errs.append(("learner.autocast_bf16", True, "false with engine deepspeed (learner.deepspeed.bf16)"))
            if ds.offload_params and ds.zero_stage != 3:
                errs.append(("learner.deepspeed.offload_params", True, "only with zero_stage 3"))
        tp = g.vllm.tensor_parallel_size
        if tp > 1 and (g.engine != "vllm" or g.num_gpus != tp):
            errs.append(("generator.vllm.tensor_parallel_size", tp, f"1, or engine vllm with generator.num_gpus = "
                                                                    f"{tp} (one GPU per tensor-parallel worker)"))
        roles = {"learner": ln, "generator": g, "reference": self.reference}
        for role, r in roles.items():
            if r.num_gpus > 1 and r.num_gpus != int(r.num_gpus):
                errs.append((f"{role}.num_gpus", r.num_gpus, "a fraction below 1 or a whole number (Ray's rule)"))
        pl = self.placement
        if len(set(pl.colocate)) != len(pl.colocate):
            errs.append(("placement.colocate", pl.colocate, "each role once"))
        for role in pl.colocate:
            if roles[role].num_actors > ln.num_actors:
                errs.append((f"{role}.num_actors", roles[role].num_actors,
                             f"at most learner.num_actors ({ln.num_actors}) with {role} in placement.colocate"))
        gpus = ln.num_gpus + sum(roles[r].num_gpus for r in pl.colocate)
        if gpus > 1 and gpus != int(gpus):
            errs.append(("placement.colocate", pl.colocate, f"roles whose num_gpus with the learner's sum to at most "
                                                            f"1 or to a whole number (got {gpus:g} per bundle)"))
        if ln.num_gpus > 1:
            errs.append(("learner.num_gpus", ln.num_gpus, "at most 1 per rank (a rank uses one GPU; more ranks for more)"))
        if ln.num_actors > 1 and 0 < gpus != int(gpus):
            errs.append(("learner.num_gpus", ln.num_gpus, f"with {ln.num_actors} ranks, GPUs per bundle (the learner's "
                                                          f"and its colocated roles', {gpus:g}) that make a whole GPU: "
                                                          "two NCCL ranks cannot share one"))
        if self.weight_sync.method == "broadcast" and g.num_gpus > 0 and g.num_gpus != int(g.num_gpus):
            errs.append(("generator.num_gpus", g.num_gpus, "whole GPUs with weight_sync.method broadcast (each member "
                                                           "of an NCCL group needs a GPU of its own)"))
        if g.engine == "vllm" and "generator" in pl.colocate and _share_a_gpu(ln.num_gpus, g.num_gpus):
            errs.append(("placement.colocate", pl.colocate, "without generator when a vLLM generator and the learner "
                                                            "would share a GPU (fractional num_gpus): vLLM keeps its "
                                                            "gpu_memory_utilization through the learner's phases "
                                                            "unless put to sleep, and vLLM sleep mode is not "
                                                            "implemented. Colocate the reference only, or give the "
                                                            "generators whole GPUs"))
        if self.weight_sync.method == "broadcast" and "generator" in pl.colocate and 0 < ln.num_gpus + g.num_gpus <= 1:
            errs.append(("weight_sync.method", "broadcast", "object_store with the generators colocated on the "
                                                            "learner's GPU (NCCL cannot broadcast between two "
                                                            "processes on one GPU)"))
        if self.weight_sync.method == "broadcast" and (ln.num_gpus > 0) != (g.num_gpus > 0):
            errs.append(("weight_sync.method", "broadcast", "object_store when only one of learner and generator "
                                                            "has GPUs (one broadcast runs on NCCL or on gloo)"))
        return errs

def _share_a_gpu(a: float, b: float) -> bool:
    """Two actors in one bundle each asking for a fraction of a GPU: Ray may put both on one GPU
    (a whole-GPU request is never shared)."""
    return a > 0 and b > 0 and a != int(a) and b != int(b)
