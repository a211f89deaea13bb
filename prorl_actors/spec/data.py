"""The sections of the data: task families, prompt templates, tasks, validation and `prorl eval`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from prorl_actors.spec.fields import opt

# the task families, written once: each has a verifier (tasks/families.py registers one class
# per name) and a prompt template (a field of PromptsSpec below)
Family = Literal["math", "code", "stem", "logic", "ifeval"]
FAMILIES: tuple[str, ...] = get_args(Family)


@dataclass
class PromptSpec:
    """How a family's item becomes chat messages; the family's verifier reads the answer format asked for."""
    system: str = opt("", help="the system message; empty = none")
    user: str = opt("{question}", help="the user message; {question} is replaced by the item's prompt")


@dataclass
class PromptsSpec:
    """One prompt template per task family (a field per name of FAMILIES)."""
    math: PromptSpec = opt(PromptSpec(system="Solve the problem. Put the final answer in \\boxed{}."))
    code: PromptSpec = opt(PromptSpec(system="Write a Python 3 program that solves the problem. Give the "
                                             "whole program in one ```python code block."))
    stem: PromptSpec = opt(PromptSpec(system="Answer the question. Put the final answer in \\boxed{}: the "
                                             "letter of the option for a multiple-choice question."))
    logic: PromptSpec = opt(PromptSpec(system="Put the final answer in <answer></answer>."))
    ifeval: PromptSpec = opt(PromptSpec())


@dataclass
class TaskSpec:
    name: str = opt("chain_sum", help="task name in the run: metrics are reported under it")
    family: Family = opt(
        "logic", help="which verifier scores it: math (math-verify), code (sandboxed tests), stem (multiple "
                      "choice or short answer), logic (reasoning-gym's score_answer), ifeval (instructions)")
    source: Literal["generator", "file"] = opt("generator", help="items from a procedural generator or from a file")
    dataset: str | None = opt(None, help="source generator: a reasoning-gym dataset name (logic; math "
                                                "takes its arithmetic ones) or a built-in generator of the family")
    path: str | None = opt(None, help="source file: Parquet or JSONL rows {task, prompt, reference, metadata}")
    bad_rows: Literal["error", "skip"] = opt("error", help="source file: a malformed row stops loading with its "
                                                           "file and row, or is skipped and counted")
    holdout_rows: int = opt(0, ge=0, help="source file: rows kept out of training for validation; 0 = "
                                          "validation draws from the training rows (recorded as an event)")
    weight: float = opt(1.0, gt=0)
    config: dict[str, Any] = opt({}, help="keyword arguments of the generator (difficulty settings)")
    prompt: PromptSpec | None = opt(None, help="this task's template instead of its family's in data.prompts")


@dataclass
class DataSpec:
    train_seed: int = opt(1, ge=0)
    validation_seed: int = opt(900_000_000, ge=0, help="keep millions apart from train_seed (reasoning-gym items overlap)")
    prompts: PromptsSpec = opt(PromptsSpec())
    tasks: list[TaskSpec] = opt([TaskSpec(dataset="chain_sum")])


@dataclass
class ValidationSpec:
    every_steps: int = opt(10, ge=0, help="0 = only at step 0 and at the end")
    num_prompts_per_task: int = opt(64, ge=1)
    num_samples: int = opt(8, ge=1)
    temperature: float = opt(0.6, gt=0)
    top_p: float = opt(0.95, gt=0, le=1)
    ks: list[int] = opt([1, 4, 8])
    tasks: list[TaskSpec] = opt([], help="tasks evaluated but never trained on (e.g. ProRL's out-of-distribution "
                                         "reasoning-gym tasks acre, boxnet, game_of_life_halting)")


@dataclass
class EvaluationSpec:
    """`prorl eval`: pass@k of a model, and of a base model beside it, on the held-out prompts
    of data.tasks and validation.tasks (the same prompts as validation, each sampled many more
    times), at validation.temperature and validation.top_p."""
    num_samples: int = opt(64, ge=1, help="n: responses per prompt; pass@k is estimated for k up to n "
                                          "(unbiased: Chen et al. 2021), so n well above the largest k of interest")
    ks: list[int] = opt([], help="the k reported besides 1 and num_samples (always reported; the verdict on the "
                                 "boundary is read at num_samples); [] = 1, 2, 4, ... and num_samples")
    num_prompts_per_task: int | None = opt(None, ge=1, help="null: validation.num_prompts_per_task")
    tasks: list[str] = opt([], help="names from data.tasks and validation.tasks; [] = all of them")
    novelty_ngram: int = opt(4, ge=1, help="n-gram length of the novelty figure: the share of the n-grams "
                                           "(words and symbols) of the model's correct responses that appear in "
                                           "none of the base model's responses to the same prompt")
    margin: float = opt(0.02, ge=0, le=1, help="a pass@k difference within this is reported as no change")
    z: float = opt(2.0, ge=0, help="a pass@k difference within this many paired standard errors (over prompts) "
                                   "is reported as no change: with few prompts, a handful solved by one model "
                                   "alone is noise; 0 = the margin alone")

    @property
    def reported_ks(self) -> list[int]:
        """The k of the reports: 1, `ks` (or the powers of two below num_samples) and num_samples."""
        if self.ks:
            return sorted(set(self.ks) | {1, self.num_samples})
        return sorted({2 ** i for i in range(self.num_samples.bit_length()) if 2 ** i <= self.num_samples}
                      | {self.num_samples})
