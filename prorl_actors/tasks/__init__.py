"""Task families: where prompts come from and how responses are scored.

A `Task` is deterministic: item `i` of a task under a seed is always the same prompt, so
a data cursor is all the state a sampler needs. Each family registers itself in
`FAMILIES`; a spec's `data.tasks[*].family` is a key of it.

`TaskMixture` draws training prompts by task weight; `validation_items` is the fixed
held-out set (a seed millions away from the training seed).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Protocol

from prorl_actors.spec import DataSpec, TaskSpec

ANSWER_TAG = "answer"


@dataclass(frozen=True)
class Item:
    """One prompt: the question and a JSON reference that only the verifier reads."""
    task: str        # the task's name in the run (metrics are keyed by it)
    index: int       # position in the task's item stream for its seed
    question: str
    answer: str      # the reference answer as text (for people and SFT)
    reference: str   # JSON: everything the task's verifier needs


class Task(Protocol):
    name: str

    def item(self, index: int) -> Item: ...

    def score(self, response: str, reference: str) -> float:
        """Reward in [0, 1] for one response; never raises on bad model output."""
        ...


FAMILIES: dict[str, type] = {}


def register_family(name: str):
    def deco(cls):
        FAMILIES[name] = cls
        return cls
    return deco


def make_task(spec: TaskSpec, seed: int) -> Task:
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown task family {spec.family!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[spec.family](spec, seed)


def chat_messages(system_prompt: str, question: str) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": question}]


def has_answer_tag(response: str) -> bool:
    """Whether a response follows the answer format at all (right or wrong)."""
    return f"<{ANSWER_TAG}>" in response and f"</{ANSWER_TAG}>" in response


def sft_completion(answer: str) -> str:
    """The answer format every task asks for (the tiny model is warm-started on it)."""
    return f"<{ANSWER_TAG}>{answer}</{ANSWER_TAG}>"


class TaskMixture:
    """Training prompts, drawn by task weight. State = RNG state + one cursor per task."""

    def __init__(self, data: DataSpec):
        self.tasks = [make_task(t, data.train_seed) for t in data.tasks]
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


def validation_items(data: DataSpec, num_per_task: int, rejected: list[dict] | None = None) -> list[Item]:
    rejected = [] if rejected is None else rejected
    items = []
    for spec in data.tasks:
        task = make_task(spec, data.validation_seed)
        items.extend(it for i in range(num_per_task) if (it := _safe_item(task, i, rejected)) is not None)
    return items


class Scorer:
    """All tasks of a run by name, for verifiers."""

    def __init__(self, data: DataSpec):
        self.tasks = {t.name: make_task(t, data.train_seed) for t in data.tasks}

    def score(self, task: str, response: str, reference: str) -> float:
        return self.tasks[task].score(response, reference)


from prorl_actors.tasks import reasoning_gym as _rg  # noqa: E402,F401  (registers the family)
