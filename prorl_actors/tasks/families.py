"""The five verifier families: how a reference is checked when data is loaded, how a response
is scored, whether it followed the answer format at all, and what a demonstration looks like.

A reference is a JSON object; per family:
  math   {"answer": "\\frac{1}{2}"}                          reward 1/0 (math-verify)
  code   {"tests": [sandbox TestCase dicts]}                 reward = fraction of tests passed
  stem   {"choices": ["..", ..], "answer": "C"}              reward 1/0 (multiple choice)
         {"answer": "9.8"}                                   reward 1/0 (short answer)
  logic  a reasoning-gym entry {"question", "answer", "metadata": {"source_dataset", ...}}
                                                             reward = the dataset's score_answer
  ifeval {"instructions": [{"kind": ..., ...}, ...]}          reward = fraction followed

Families that need a helper process (math-verify's child, the code sandbox) start it on the
first score, so building items (the supervisor, the tiny model's warm start) never starts one.

Each family is a `Family` registered under its name (`@register_family`); the names are the
spec's `FAMILIES`, and importing this module fails if one has no class. `make_families`
builds one of each from the spec's `verifier` section.
"""
from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from typing import Callable, ClassVar

from prorl_actors.spec import FAMILIES, VerifierSpec
from prorl_actors.tasks import ifeval
from prorl_actors.tasks.answers import (choice_letters, extract_choice, final_answer, last_boxed, last_python_block,
                                        tagged_answer)
from prorl_actors.tasks.codecheck import CodeChecker
from prorl_actors.tasks.mathcheck import MathChecker
from sandbox import Limits, TestCase


class Family(ABC):
    """A task family: how its references are checked when data is loaded, how a response is
    scored (a reward in [0, 1]), whether it gave an answer in the family's format at all, and
    what a demonstration of an answer looks like (the tiny model's warm start)."""
    name: ClassVar[str]

    @classmethod
    def from_spec(cls, v: VerifierSpec, built: dict[str, Family]) -> Family:
        """One instance for a run's verifier settings (`built`: the families made before it)."""
        return cls()

    @abstractmethod
    def check_reference(self, ref: dict) -> None:
        """ValueError (or TypeError) saying what is wrong with a reference."""

    @abstractmethod
    def score(self, response: str, ref: dict) -> float: ...

    @abstractmethod
    def formatted(self, response: str) -> bool: ...

    @abstractmethod
    def completion(self, answer: str, ref: dict, formatted: bool) -> str | None:
        """The answer as a response in the family's format (formatted=False: one its verifier
        rejects), None when there is none."""

    def close(self) -> None:
        """Stop the family's helper processes, if it has any."""


FAMILY_TYPES: dict[str, type[Family]] = {}


def register_family(cls: type[Family]) -> type[Family]:
    if cls.name not in FAMILIES:
        raise ValueError(f"family {cls.name!r} is not one of spec FAMILIES {FAMILIES}")
    FAMILY_TYPES[cls.name] = cls
    return cls

def _need_str(ref: dict, key: str) -> str:
    v = ref.get(key)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"reference.{key} must be a non-empty string")
    return v


class _LazyChecker:
    """Builds its checker (which owns helper processes) on first use, once, from any thread."""

    def __init__(self, build: Callable):
        self._build, self._checker, self._lock = build, None, threading.Lock()

    @property
    def checker(self):
        with self._lock:
            if self._checker is None:
                self._checker = self._build()
            return self._checker

    def close(self) -> None:
        if self._checker is not None:
            self._checker.close()


@register_family
class MathFamily(_LazyChecker, Family):
    name = "math"

    def __init__(self, timeout_s: float = 5.0):
        super().__init__(lambda: MathChecker(timeout_s))

    @classmethod
    def from_spec(cls, v: VerifierSpec, built: dict[str, Family]) -> Family:
        return cls(v.math_timeout_s)

    def check_reference(self, ref: dict) -> None:
        _need_str(ref, "answer")
        if "solution" in ref:
            _need_str(ref, "solution")

    def score(self, response: str, ref: dict) -> float:
        answer = final_answer(ifeval.strip_thinking(response))
        if answer is None:
            return 0.0
        return float(self.checker.equivalent(answer, ref["answer"]))  # CheckTimeout/ValueError: counted

    def formatted(self, response: str) -> bool:
        return final_answer(ifeval.strip_thinking(response)) is not None

    def completion(self, answer: str, ref: dict, formatted: bool) -> str | None:
        """The answer, after the worked solution when the reference has one (`solution`)."""
        work = f"{ref['solution']} " if ref.get("solution") else ""
        return work + (f"\\boxed{{{answer}}}" if formatted else answer)


@register_family
class CodeFamily(_LazyChecker, Family):
    name = "code"

    def __init__(self, limits=None, workers: int | None = None, allow_weaker: bool = False):
        super().__init__(lambda: CodeChecker(limits, workers, allow_weaker))

    @classmethod
    def from_spec(cls, v: VerifierSpec, built: dict[str, Family]) -> Family:
        c = v.code
        return cls(Limits(wall_s=c.wall_s, program_wall_s=c.program_wall_s, memory_mib=c.memory_mib), c.workers,
                   c.allow_weaker)

    def check_reference(self, ref: dict) -> None:
        tests = ref.get("tests")
        if not isinstance(tests, list) or not tests:
            raise ValueError("reference.tests must be a non-empty list of tests")
        for i, t in enumerate(tests):
            TestCase.from_dict(t, f"reference.tests[{i}]")

    def score(self, response: str, ref: dict) -> float:
        return self.checker.score(ifeval.strip_thinking(response), ref["tests"])

    def formatted(self, response: str) -> bool:
        return last_python_block(ifeval.strip_thinking(response)) is not None

    def completion(self, answer: str, ref: dict, formatted: bool) -> str | None:
        body = answer if answer.endswith("\n") else answer + "\n"
        return f"```python\n{body}```" if formatted else body


@register_family
class StemFamily(Family):
    """Multiple choice when the reference has choices, else a short answer compared with
    math-verify (numbers, expressions, units stripped by it) or, for words, as text."""
    name = "stem"

    def __init__(self, math: MathFamily):
        self.math = math

    @classmethod
    def from_spec(cls, v: VerifierSpec, built: dict[str, Family]) -> Family:
        return cls(built["math"])   # math-verify's checker, shared

    def check_reference(self, ref: dict) -> None:
        answer = _need_str(ref, "answer")
        if "choices" in ref:
            choices = ref["choices"]
            if not (isinstance(choices, list) and 2 <= len(choices) <= 26
                    and all(isinstance(c, str) and c.strip() for c in choices)):
                raise ValueError("reference.choices must be a list of 2 to 26 non-empty strings")
            if answer not in choice_letters(len(choices)):
                raise ValueError(f"reference.answer must be one of the letters {choice_letters(len(choices))}")
        if set(ref) - {"answer", "choices"}:
            raise ValueError(f"reference has unknown keys {sorted(set(ref) - {'answer', 'choices'})}")

    def score(self, response: str, ref: dict) -> float:
        text = ifeval.strip_thinking(response)
        if "choices" in ref:
            return float(extract_choice(text, ref["choices"]) == ref["answer"])
        answer = final_answer(text)
        if answer is None:
            return 0.0
        if _as_words(answer) and _as_words(answer) == _as_words(ref["answer"]):
            return 1.0
        try:
            return float(self.math.checker.equivalent(answer, ref["answer"]))
        except ValueError:   # math-verify could not read it: words that differ
            return 0.0

    def formatted(self, response: str) -> bool:
        return last_boxed(ifeval.strip_thinking(response)) is not None

    def completion(self, answer: str, ref: dict, formatted: bool) -> str | None:
        if formatted:
            return f"\\boxed{{{answer}}}"
        if "choices" in ref:   # the option's text, not its letter: the verifier wants the letter
            return ref["choices"][choice_letters(len(ref["choices"])).index(answer)]
        return answer


def _as_words(s: str) -> str:
    """Lowercased words of a textual answer ("" when it has digits or maths: math-verify's job)."""
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s).strip().lower().rstrip(".")
    return "" if re.search(r"[\d\\^_=+*/]", s) else re.sub(r"\s+", " ", s)


@register_family
class LogicFamily(Family):
    """reasoning-gym: the answer in <answer></answer>, scored by the dataset's own score_answer
    (partial credit exists, so accuracy counts reward 1 only)."""
    name = "logic"

    def __init__(self, dataset: str | None = None, config: dict | None = None):
        """`dataset` and `config`: the generator settings of the task (some datasets' scoring
        reads them, e.g. a precision); entries of other datasets score with their defaults."""
        self.dataset, self.config = dataset, config or {}
        self._score_fns: dict = {}
        self._lock = threading.Lock()

    def _score_fn(self, dataset: str):
        with self._lock:
            if dataset not in self._score_fns:
                import reasoning_gym
                if dataset == self.dataset and self.config:
                    self._score_fns[dataset] = reasoning_gym.create_dataset(
                        dataset, size=10, seed=0, **self.config).score_answer
                else:
                    self._score_fns[dataset] = reasoning_gym.get_score_answer_fn(dataset)
            return self._score_fns[dataset]

    def check_reference(self, ref: dict) -> None:
        import reasoning_gym
        meta = ref.get("metadata")
        if not isinstance(meta, dict) or meta.get("source_dataset") not in reasoning_gym.factory.DATASETS:
            raise ValueError("reference must be a reasoning-gym entry whose metadata.source_dataset is a "
                             "reasoning-gym dataset")
        if "answer" not in ref:
            raise ValueError("reference.answer is missing")

    def score(self, response: str, ref: dict) -> float:
        answer = tagged_answer(ifeval.strip_thinking(response))
        if answer is None:
            return 0.0
        return float(self._score_fn(ref["metadata"]["source_dataset"])(answer, ref))

    def formatted(self, response: str) -> bool:
        return tagged_answer(ifeval.strip_thinking(response)) is not None

    def completion(self, answer: str, ref: dict, formatted: bool) -> str | None:
        return f"<answer>{answer}</answer>" if formatted else f"The answer is {answer}."


@register_family
class IfevalFamily(Family):
    name = "ifeval"

    def check_reference(self, ref: dict) -> None:
        ifeval.validate(ref.get("instructions"))

    def score(self, response: str, ref: dict) -> float:
        return ifeval.score(response, ref["instructions"])

    def formatted(self, response: str) -> bool:
        return bool(ifeval.strip_thinking(response).strip())

    def completion(self, answer: str, ref: dict, formatted: bool) -> str | None:
        return answer if formatted else None


def make_families(verifier: VerifierSpec | None = None) -> dict[str, Family]:
    """One instance of each family; `verifier` is the spec's VerifierSpec (None: its defaults)."""
    v, built = verifier or VerifierSpec(), {}
    for name in FAMILIES:   # in the spec's order: math before stem, which shares its checker
        built[name] = FAMILY_TYPES[name].from_spec(v, built)
    return built


if set(FAMILY_TYPES) != set(FAMILIES):
    raise ImportError(f"registered families {sorted(FAMILY_TYPES)} differ from spec FAMILIES {list(FAMILIES)}")
