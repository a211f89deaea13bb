"""The typed run spec: one dataclass per section, loaded from YAML plus dotted overrides.

Loading goes YAML -> OmegaConf (file, `key=value` overrides, `${...}` interpolation) ->
a plain dict -> `check()`, which walks the dataclass types and reports EVERY problem at
once (unknown key, wrong type, value out of range, cross-field rule), each with its key
path, the value given and what is allowed. Nothing is fixed up silently: a spec either
builds exactly as written or does not build. Defaults live here and only here.

Each role reads only its own section (`GeneratorSpec`, `LearnerSpec`, ...).

Where things live: fields.py (`opt()`, a field with bounds and help text); roles.py (model,
generator, verifier, learner, reference, checkpoint, fault tolerance, weight sync, placement,
metrics, ray); algorithm.py (the loss, off-policy correction, overlong handling, reward shaping, dynamic
sampling, KL control, resets, supervisor); data.py (families, prompts, tasks, validation,
evaluation); run.py (`RunSpec` and its cross-field rules); load.py (`SpecError`, `read_spec`,
the typed builder `typed_spec`, `to_yaml`). Import from here: `from prorl_actors.spec import ...`.

This package imports nothing else of prorl_actors but `errors`: the checks that need a task's
generator or file live with the tasks (tasks/checks.py), and `prorl_actors.config.load_spec`
runs both.
"""
from __future__ import annotations

from prorl_actors.spec.algorithm import (AlgorithmSpec, DynamicSamplingSpec, KLControlSpec, LengthPenaltySpec,
                                         OffPolicySpec, OverlongSpec, ResetSpec, RewardShapingSpec, SupervisorSpec)
from prorl_actors.spec.data import (FAMILIES, DataSpec, EvaluationSpec, Family, PromptSpec, PromptsSpec, TaskSpec,
                                    ValidationSpec)
from prorl_actors.spec.fields import opt
from prorl_actors.spec.load import SpecError, read_spec, to_yaml, typed_spec
from prorl_actors.spec.roles import (CheckpointSpec, CodeVerifierSpec, DeepSpeedSpec, FaultToleranceSpec, GeneratorSpec,
                                     LearnerSpec, MetricsSpec, ModelSpec, PlacementSpec, PrometheusSpec, RaySpec,
                                     ReferenceSpec, TinyModelSpec, VerifierSpec, VLLMSpec, WeightSyncSpec)
from prorl_actors.spec.run import RunSpec

__all__ = [
    "FAMILIES",
    "Family",
    "AlgorithmSpec",
    "CheckpointSpec",
    "CodeVerifierSpec",
    "DataSpec",
    "DeepSpeedSpec",
    "DynamicSamplingSpec",
    "EvaluationSpec",
    "FaultToleranceSpec",
    "GeneratorSpec",
    "KLControlSpec",
    "LearnerSpec",
    "MetricsSpec",
    "ModelSpec",
    "LengthPenaltySpec",
    "OffPolicySpec",
    "OverlongSpec",
    "RewardShapingSpec",
    "PlacementSpec",
    "PrometheusSpec",
    "PromptSpec",
    "PromptsSpec",
    "RaySpec",
    "ReferenceSpec",
    "ResetSpec",
    "RunSpec",
    "SpecError",
    "SupervisorSpec",
    "TaskSpec",
    "TinyModelSpec",
    "VLLMSpec",
    "ValidationSpec",
    "VerifierSpec",
    "WeightSyncSpec",
    "opt",
    "read_spec",
    "to_yaml",
    "typed_spec",
]
