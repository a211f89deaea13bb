"""Tasks: where prompts come from, how they are presented, and how responses are scored.

A task (one entry of the spec's `data.tasks`) has a family, which decides its verifier (see
families.py), and a source: a procedural generator (reasoning-gym, or the built-ins of
builtin.py) or a file in the one on-disk format (files.py). Items are deterministic: item `i`
of a task under a seed is always the same prompt, so a data cursor is all the state a sampler
needs.

`TaskMixture` draws training prompts by task weight; `validation_items` is the fixed held-out
set (generators: a seed millions away from the training seed; files: the held-out rows).
`Scorer` scores responses of every task of a run, for the verifier actors. What a spec's
tasks must be is checked in checks.py, when the spec is loaded.

Inside the package: answers.py, ifeval.py (text helpers) <- families.py (the verifier of
each family, registered by name) <- files.py (the on-disk format), builtin.py (generators)
<- this module <- checks.py, convert.py. Nothing here imports upwards.
"""
from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from prorl_actors.events import Event
from prorl_actors.spec import DataSpec, PromptSpec, TaskSpec
from prorl_actors.tasks.builtin import GENERATORS
from prorl_actors.tasks.families import LogicFamily, make_families
from prorl_actors.tasks.files import DataError, load_rows

# ProRL's out-of-distribution evaluation tasks: never in a default training mix.
OOD_EVAL_DATASETS = ("acre", "boxnet", "game_of_life_halting")
# reasoning-gym datasets whose answers math-verify reads, for the math family
RG_MATH_DATASETS = ("basic_arithmetic", "chain_sum", "decimal_arithmetic", "decimal_chain_sum",
                    "fraction_simplification", "gcd", "lcm", "power_function", "products", "simple_equations")
RG_CHUNK = 10_000            # reasoning-gym datasets are built per chunk of items (some precompute)
HOLDOUT_SEED = 20_250_531    # fixes which file rows are held out, whatever the run's seeds


@dataclass(frozen=True)
class Item:
    """One prompt: the question and a JSON reference that only the verifier reads."""
    task: str        # the task's name in the run (metrics are keyed by it)
    family: str      # whose verifier scores it
    index: int       # position in the task's item stream for its seed
    question: str    # the prompt before the template
    answer: str      # the reference answer as text (for people and the tiny model's warm start)
    reference: str   # JSON: everything the family's verifier needs
    messages: list = field(default_factory=list, compare=False)  # the chat the model sees


def chat_messages(system_prompt: str, question: str) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": question}]


def render(template: PromptSpec, question: str) -> list[dict]:
    return chat_messages(template.system, template.user.replace("{question}", question))


# ------------------------------------------------------------------------------------ sources
class _ReasoningGymSource:
    def __init__(self, dataset: str, config: dict, seed: int, as_math: bool):
        import reasoning_gym
        self.dataset, self.config, self.seed, self.as_math = dataset, config, seed, as_math
        self._chunk: tuple[int, object] | None = None
        self._create = reasoning_gym.create_dataset
        self._get(0)   # bad settings fail now, not at the first sample

    def _get(self, index: int):
        c = index // RG_CHUNK
        if self._chunk is None or self._chunk[0] != c:
            # item j of chunk c comes from seed + c*RG_CHUNK + j: one stream whatever the chunking
            self._chunk = (c, self._create(self.dataset, size=RG_CHUNK, seed=self.seed + c * RG_CHUNK, **self.config))
        return self._chunk[1]

    def __call__(self, index: int) -> tuple[str, str, dict]:
        entry = json.loads(json.dumps(self._get(index)[index % RG_CHUNK], default=str))
        answer = str(entry["answer"])
        return entry["question"], answer, ({"answer": answer} if self.as_math else entry)


class _GeneratorSource:
    def __init__(self, fn, config: dict, seed: int):
        self.fn, self.config, self.seed = fn, config, seed
        self(0)   # bad settings fail now

    def __call__(self, index: int) -> tuple[str, str, dict]:
        return self.fn(random.Random(f"{self.seed}:{index}"), **self.config)


class _FileSource:
    """Rows of a file, reshuffled every epoch; `holdout_rows` of them (the same ones for every
    seed) are kept for validation."""

    def __init__(self, spec: TaskSpec, seed: int, split: str):
        loaded = _file_rows(spec)
        self.skipped = loaded.skipped
        order = list(range(len(loaded.rows)))
        random.Random(HOLDOUT_SEED).shuffle(order)
        held, train = order[:spec.holdout_rows], order[spec.holdout_rows:]
        self.rows, self.seed = loaded.rows, seed
        self.overlaps_training = split == "validation" and not held
        self.pool = held if (split == "validation" and held) else train
        self.shuffled = split == "train" or not held
        self._epoch: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.pool)

    def __call__(self, index: int) -> tuple[str, str, dict]:
        epoch, j = divmod(index, len(self.pool))
        if not self.shuffled:
            row = self.rows[self.pool[j]]
        else:
            if self._epoch is None or self._epoch[0] != epoch:
                perm = list(self.pool)
                random.Random(f"{self.seed}:{epoch}").shuffle(perm)
                self._epoch = (epoch, perm)
            row = self.rows[self._epoch[1][j]]
        ref = json.loads(row.reference)
        return row.prompt, str(ref.get("answer", "")), ref


def _load_file(path: str, family: str, bad_rows: str):
    """Rows of a file, read and checked once per process while the file is unchanged (the
    training mixture, the validation set and the tiny model's warm start all read it)."""
    st = Path(path).stat() if Path(path).exists() else None
    return _load_file_cached(str(Path(path).resolve()), st and (st.st_mtime_ns, st.st_size), family, bad_rows)


def _file_rows(spec: TaskSpec):
    """A file task's rows, checked as a run needs them (DataError naming the file and row)."""
    loaded = _load_file(spec.path, spec.family, spec.bad_rows)
    if spec.holdout_rows >= len(loaded.rows):
        raise DataError(f"{spec.path}: holdout_rows {spec.holdout_rows} leaves no training row "
                        f"({len(loaded.rows)} usable rows)")
    return loaded


def check_sources(tasks: list[TaskSpec]) -> list[str]:
    """Every task's source opened and checked as a run does at start-up (each row of each file)
    -> a line per task saying what it holds; DataError naming the file and row otherwise."""
    lines = []
    for t in tasks:
        if t.source != "file":
            lines.append(f"{t.name} ({t.family}): generator {t.dataset}, endless")
            continue
        loaded = _file_rows(t)
        lines.append(f"{t.name} ({t.family}): {len(loaded.rows)} rows from {t.path}"
                     + (f", {len(loaded.skipped)} bad rows skipped" if loaded.skipped else "")
                     + (f", {t.holdout_rows} held out for validation" if t.holdout_rows else ""))
    return lines


@functools.lru_cache(maxsize=16)
def _load_file_cached(path: str, version, family: str, bad_rows: str):
    return load_rows(path, family, bad_rows)


class Task:
    """One task of a run: items from its source, presented with its family's template."""

    def __init__(self, spec: TaskSpec, seed: int, template: PromptSpec, split: str = "train"):
        self.name, self.family, self.spec = spec.name, spec.family, spec
        self.template = spec.prompt or template
        self.source = make_source(spec, seed, split)

    @property
    def size(self) -> int | None:
        """Distinct items (file rows); None for an endless generator."""
        return len(self.source) if isinstance(self.source, _FileSource) else None

    def item(self, index: int) -> Item:
        question, answer, ref = self.source(index)
        return Item(task=self.name, family=self.family, index=index, question=question, answer=answer,
                    reference=json.dumps(ref, ensure_ascii=False), messages=render(self.template, question))


def make_source(spec: TaskSpec, seed: int, split: str):
    if spec.source == "file":
        return _FileSource(spec, seed, split)
    own = GENERATORS.get(spec.family, {})
    if spec.dataset in own:
        return _GeneratorSource(own[spec.dataset], spec.config, seed)
    return _ReasoningGymSource(spec.dataset, spec.config, seed, as_math=spec.family == "math")


def make_task(spec: TaskSpec, seed: int, data: DataSpec, split: str = "train") -> Task:
    return Task(spec, seed, getattr(data.prompts, spec.family), split)


class TaskMixture:
    """Training prompts, drawn by task weight. State = RNG state + one cursor per task."""

    def __init__(self, data: DataSpec):
        self.tasks = [make_task(t, data.train_seed, data) for t in data.tasks]
        self.weights = [t.weight for t in data.tasks]
        self.rng = random.Random(data.train_seed)
        self.cursors = {t.name: 0 for t in self.tasks}
        self.rejected: list[dict] = []  # items whose generator raised; the supervisor reports them

    def sample(self, num: int) -> list[Item]:
        out = []
        for task in self.rng.choices(self.tasks, weights=self.weights, k=num):
            item = _safe_item(task, self.cursors[task.name], self.rejected)
            self.cursors[task.name] += 1
            if item is not None:
                out.append(item)
        return out

    def skipped_rows(self) -> dict[str, list[str]]:
        """Per file task, the rows left out while loading (bad_rows: skip), each with its reason."""
        return {t.name: t.source.skipped for t in self.tasks if getattr(t.source, "skipped", None)}

    def take_rejected(self) -> list[dict]:
        out, self.rejected = self.rejected, []
        return out

    def state_dict(self) -> dict:
        return {"rng": json.dumps(self.rng.getstate()), "cursors": dict(self.cursors)}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = json.loads(state["rng"])
        self.rng.setstate((version, tuple(internal), gauss))
        self.cursors = dict(state["cursors"])


def _safe_item(task: Task, index: int, rejected: list[dict]) -> Item | None:
    """A bad item (its generator raised) is skipped and recorded, never fatal."""
    try:
        return task.item(index)
    except Exception as e:  # noqa: BLE001 - any generator bug is an item we cannot use
        rejected.append({"task": task.name, "item_index": index, "error": f"{type(e).__name__}: {e}"})
        return None


def validation_items(data: DataSpec, num_per_task: int, rejected: list[dict] | None = None,
                     extra: list[TaskSpec] = (), notes: list[dict] | None = None) -> list[Item]:
    """The held-out prompts of every training task and of the evaluation-only tasks `extra`.
    A file task gives at most its held-out rows; `notes` receives what a run should record
    (validation drawn from training rows, rows skipped while loading)."""
    rejected = [] if rejected is None else rejected
    notes = [] if notes is None else notes
    items = []
    for spec in list(data.tasks) + list(extra):
        task = make_task(spec, data.validation_seed, data, split="validation")
        n = num_per_task if task.size is None else min(num_per_task, task.size)
        if spec in data.tasks and getattr(task.source, "overlaps_training", False):
            notes.append({"event": Event.VALIDATION_OVERLAPS_TRAINING, "task": spec.name,
                          "reason": "a file task without holdout_rows: validation draws from its training rows"})
        items.extend(it for i in range(n) if (it := _safe_item(task, i, rejected)) is not None)
    return items


class Scorer:
    """Scores responses of every task of a run (training and evaluation-only) by task name."""

    def __init__(self, data: DataSpec, verifier=None, extra: list[TaskSpec] = ()):
        self.families = make_families(verifier)
        self.by_task = {}
        for t in list(data.tasks) + list(extra):
            # a generated logic task scores with its own generator settings; the rest share a family
            own = t.family == "logic" and t.source == "generator" and t.config
            self.by_task[t.name] = LogicFamily(t.dataset, t.config) if own else self.families[t.family]

    def score(self, task: str, response: str, reference: str) -> float:
        return self.by_task[task].score(response, json.loads(reference))

    def formatted(self, task: str, response: str) -> bool:
        """Whether the response gives an answer in its family's format at all (right or wrong)."""
        return self.by_task[task].formatted(response)

    def completion(self, item: Item, formatted: bool = True) -> str | None:
        """A demonstration for the item: its reference answer in the family's format (or, with
        formatted=False, in a form the verifier rejects), None when there is none."""
        if not item.answer:
            return None
        return self.families[item.family].completion(item.answer, json.loads(item.reference), formatted)

    def close(self) -> None:
        for fam in self.families.values():
            if hasattr(fam, "close"):
                fam.close()
