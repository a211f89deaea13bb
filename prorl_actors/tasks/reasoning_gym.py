"""Procedural tasks from the `reasoning-gym` package, scored by its own `score_answer`.

The answer is the text inside the last <answer>...</answer> of the response; a response
without one scores 0. reasoning-gym gives partial credit (e.g. 0.67 for a wrong answer
that contains the right one), so accuracy is counted at reward >= 1.
"""
from __future__ import annotations

import json
import re

import reasoning_gym

from prorl_actors.spec import TaskSpec
from prorl_actors.tasks import ANSWER_TAG, Item, register_family

_ANSWER_RE = re.compile(rf"<{ANSWER_TAG}>(.*?)</{ANSWER_TAG}>", re.DOTALL)
_STREAM_SIZE = 2**31 - 1  # items are built lazily from Random(seed + index)


def extract_answer(response: str) -> str | None:
    found = _ANSWER_RE.findall(response)
    return found[-1].strip() if found else None


@register_family("reasoning_gym")
class ReasoningGymTask:
    def __init__(self, spec: TaskSpec, seed: int):
        self.name = spec.name
        if spec.dataset not in reasoning_gym.factory.DATASETS:
            raise ValueError(f"task {spec.name}: unknown reasoning-gym dataset {spec.dataset!r}")
        self.dataset = reasoning_gym.create_dataset(spec.dataset, size=_STREAM_SIZE, seed=seed,
                                                    **spec.config)

    def item(self, index: int) -> Item:
        entry = self.dataset[index]
        return Item(task=self.name, index=index, question=entry["question"],
                    answer=str(entry["answer"]), reference=json.dumps(entry, default=str))

    def score(self, response: str, reference: str) -> float:
        answer = extract_answer(response)
        if answer is None:
            return 0.0
        return float(self.dataset.score_answer(answer, json.loads(reference)))
