"""What a run spec's tasks must be, checked when the spec is loaded (`prorl_actors.config`):
each generator exists and accepts its settings, each file exists, names are unique, a
validation task is not a training task, every template asks the question once.

These live with the tasks because they need the tasks' generators and files; the spec
(prorl_actors/spec/) checks the rest and imports nothing of the tasks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prorl_actors.spec import FAMILIES, RunSpec, TaskSpec
from prorl_actors.tasks import OOD_EVAL_DATASETS, RG_MATH_DATASETS, make_source
from prorl_actors.tasks.builtin import GENERATORS


def task_errors(spec: RunSpec) -> list[tuple[str, Any, str]]:
    """Every problem of the spec's tasks (training, validation, the tiny model's warm start) and
    their templates: (key path, value, what is allowed)."""
    errs = []
    for i, t in enumerate(spec.data.tasks):
        if t.family == "logic" and t.dataset in OOD_EVAL_DATASETS:
            errs.append((f"data.tasks[{i}].dataset", t.dataset,
                         f"a training task: {', '.join(OOD_EVAL_DATASETS)} are ProRL's held-out evaluation "
                         "tasks (list them under validation.tasks)"))
    listed = [(f"data.tasks[{i}]", t) for i, t in enumerate(spec.data.tasks)]
    listed += [(f"validation.tasks[{i}]", t) for i, t in enumerate(spec.validation.tasks)]
    names = [t.name for _, t in listed]
    for path, t in listed:
        if names.count(t.name) > 1:
            errs.append((f"{path}.name", t.name, "task names unique across data.tasks and validation.tasks"))
        errs += [(f"{path}.{key}", value, allowed) for key, value, allowed in task_spec_errors(t)]
    sft = [(f"model.tiny.sft_tasks[{i}]", t) for i, t in enumerate(spec.model.tiny.sft_tasks)]
    for path, t in sft:
        if [u.name for _, u in sft].count(t.name) > 1:
            errs.append((f"{path}.name", t.name, "task names unique within model.tiny.sft_tasks"))
        errs += [(f"{path}.{key}", value, allowed) for key, value, allowed in task_spec_errors(t)]
    listed += sft   # their templates are checked below
    for name, tmpl in [(f, getattr(spec.data.prompts, f)) for f in FAMILIES] + \
            [(f"{p}.prompt", t.prompt) for p, t in listed if t.prompt is not None]:
        where = name if name.endswith(".prompt") else f"data.prompts.{name}"
        if tmpl.user.count("{question}") != 1:
            errs.append((f"{where}.user", tmpl.user, "a template with {question} exactly once"))
    trained = {_source_key(t): i for i, t in enumerate(spec.data.tasks)}
    for i, t in enumerate(spec.validation.tasks):
        if _source_key(t) in trained:
            errs.append((f"validation.tasks[{i}]", t.name, f"a task not trained on (data.tasks"
                                                         f"[{trained[_source_key(t)]}] has the same source)"))
    return errs


def _source_key(t: TaskSpec) -> tuple:
    return (t.family, t.source, t.dataset, t.path, repr(sorted(t.config.items())))


def generator_names(family: str) -> list[str]:
    """The generators a family's tasks can name as `dataset`."""
    import reasoning_gym  # a few seconds: only where a generator is looked up
    rg = {"logic": sorted(set(reasoning_gym.factory.DATASETS) - {"composite"}),
          "math": list(RG_MATH_DATASETS)}.get(family, [])
    return sorted(GENERATORS.get(family, {})) + rg


def task_spec_errors(t: TaskSpec) -> list[tuple[str, object, str]]:
    """What is wrong with one task entry: (key under the task, value, what is allowed)."""
    if t.source == "file":
        errs = [] if t.dataset is None else [("dataset", t.dataset, "absent for source file (the file is the data)")]
        if t.path is None:
            errs.append(("path", None, "a .jsonl or .parquet file for source file"))
        elif Path(t.path).suffix not in (".jsonl", ".json", ".parquet"):
            errs.append(("path", t.path, "a .jsonl or .parquet file"))
        elif not Path(t.path).exists():
            errs.append(("path", t.path, "an existing file"))
        if t.config:
            errs.append(("config", t.config, "empty for source file"))
        return errs
    if t.path is not None or t.holdout_rows:
        return [("path" if t.path is not None else "holdout_rows", t.path or t.holdout_rows,
                 "only for source file")]
    names = generator_names(t.family)
    if t.dataset not in names:
        return [("dataset", t.dataset, f"a generator of family {t.family}: {', '.join(names)}")]
    try:
        make_source(t, 0, "train")
    except Exception as e:  # noqa: BLE001 - bad difficulty settings, in the generator's words
        return [("config", t.config, f"settings {t.dataset} accepts ({type(e).__name__}: {e})")]
    return []
