"""Verifiable instructions in the style of IFEval: each is a small pure check on the response.

An instruction is a JSON object {"kind": ..., <parameters>}. The reward of a response is the
fraction of its instructions it satisfies. A leading <think>...</think> block is not part of
the response. `validate` checks instructions when data is loaded, so a malformed one is a
data error (with its file and row), never a crash in the middle of a run.

Kinds (parameters):
  word_count, sentence_count, paragraph_count (relation, num); keywords_include (keywords);
  keywords_exclude (keywords); keyword_frequency (keyword, relation, num); letter_frequency
  (letter, relation, num); capital_word_frequency (relation, num); json_format; bullet_count
  (num); highlighted_sections (num); title; quotation; start_phrase (phrase); end_phrase
  (phrase); lowercase; uppercase; no_commas; placeholders (num); numbered_sections (marker,
  num); postscript (marker); nth_paragraph_first_word (num, nth, first_word);
  constrained_response ("My answer is yes./no./maybe."); two_responses (split by ******).
relation is "at least", "at most", "exactly" or "less than".
"""
from __future__ import annotations

import json
import re
from typing import Callable

RELATIONS = {"at least": lambda a, b: a >= b, "at most": lambda a, b: a <= b, "exactly": lambda a, b: a == b,
             "less than": lambda a, b: a < b}
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
_WORD = re.compile(r"\b[\w'-]+\b", re.UNICODE)


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return [p for p in parts if _words(p)]


def _paragraphs(text: str) -> list[str]:
    parts = re.split(r"\n\s*\n|\*\*\*", text.strip())
    return [p for p in parts if p.strip()]


def _json_body(text: str) -> str:
    fenced = re.fullmatch(r"\s*```(?:json)?\s*\n(.*?)\n?```\s*", text, re.DOTALL | re.IGNORECASE)
    return fenced.group(1) if fenced else text


def _is_json(text: str) -> bool:
    try:
        json.loads(_json_body(text))
        return True
    except ValueError:
        return False


def _count(relation: str, value: int, num: int) -> bool:
    return RELATIONS[relation](value, num)


CHECKS: dict[str, tuple[tuple[str, ...], Callable[..., bool]]] = {
    # kind: (required parameters, check(response, **parameters))
    "word_count": (("relation", "num"), lambda r, relation, num: _count(relation, len(_words(r)), num)),
    "sentence_count": (("relation", "num"), lambda r, relation, num: _count(relation, len(_sentences(r)), num)),
    "paragraph_count": (("relation", "num"), lambda r, relation, num: _count(relation, len(_paragraphs(r)), num)),
    "keywords_include": (("keywords",), lambda r, keywords: all(
        re.search(rf"\b{re.escape(k)}\b", r, re.IGNORECASE) for k in keywords)),
    "keywords_exclude": (("keywords",), lambda r, keywords: not any(
        re.search(rf"\b{re.escape(k)}\b", r, re.IGNORECASE) for k in keywords)),
    "keyword_frequency": (("keyword", "relation", "num"), lambda r, keyword, relation, num: _count(
        relation, len(re.findall(rf"\b{re.escape(keyword)}\b", r, re.IGNORECASE)), num)),
    "letter_frequency": (("letter", "relation", "num"), lambda r, letter, relation, num: _count(
        relation, r.lower().count(letter.lower()), num)),
    "capital_word_frequency": (("relation", "num"), lambda r, relation, num: _count(
        relation, sum(1 for w in _words(r) if len(w) > 1 and w.isupper()), num)),
    "json_format": ((), lambda r: _is_json(r)),
    "bullet_count": (("num",), lambda r, num: len(re.findall(r"(?m)^\s*[*-]\s+\S", r)) == num),
    "highlighted_sections": (("num",), lambda r, num: len(re.findall(r"(?<!\*)\*[^\n*]+\*(?!\*)", r)) >= num),
    "title": ((), lambda r: re.search(r"<<[^\n<>]+>>", r) is not None),
    "quotation": ((), lambda r: len(r.strip()) >= 2 and r.strip()[0] == '"' and r.strip()[-1] == '"'),
    "start_phrase": (("phrase",), lambda r, phrase: r.strip().lower().startswith(phrase.strip().lower())),
    "end_phrase": (("phrase",), lambda r, phrase: r.strip().lower().endswith(phrase.strip().lower())),
    "lowercase": ((), lambda r: r == r.lower() and any(c.isalpha() for c in r)),
    "uppercase": ((), lambda r: r == r.upper() and any(c.isalpha() for c in r)),
    "no_commas": ((), lambda r: "," not in r),
    "placeholders": (("num",), lambda r, num: len(re.findall(r"\[[^\[\]\n]+\]", r)) >= num),
    "numbered_sections": (("marker", "num"), lambda r, marker, num: len(re.findall(
        rf"(?mi)^\s*{re.escape(marker)}\s+\d+", r)) == num),
    "postscript": (("marker",), lambda r, marker: re.search(   # any case, as IFEval's checker
        rf"(?mi)^\s*{re.escape(marker)}", r) is not None),
    "nth_paragraph_first_word": (("num", "nth", "first_word"), lambda r, num, nth, first_word: _nth_first_word(
        r, num, nth, first_word)),
    "constrained_response": ((), lambda r: any(c in r for c in CONSTRAINED_RESPONSES)),
    "two_responses": ((), lambda r: _two_responses(r)),
}


def _nth_first_word(r: str, num: int, nth: int, first_word: str) -> bool:
    """Exactly `num` paragraphs separated by blank lines; the nth (from 1) starts with `first_word`."""
    paragraphs = [p for p in re.split(r"\n\s*\n", r.strip()) if p.strip()]
    if len(paragraphs) != num or not 1 <= nth <= num:
        return False
    words = _words(paragraphs[nth - 1])
    return bool(words) and words[0].lower().strip("'") == first_word.lower()


def _two_responses(r: str) -> bool:
    """Two different responses separated by six asterisks."""
    parts = r.split("******")
    return len(parts) == 2 and all(p.strip() for p in parts) and parts[0].strip() != parts[1].strip()


def validate(instructions) -> None:
    """Raise ValueError naming what is wrong with a list of instructions."""
    if not isinstance(instructions, list) or not instructions:
        raise ValueError("instructions must be a non-empty list")
    for i, ins in enumerate(instructions):
        if not isinstance(ins, dict) or ins.get("kind") not in CHECKS:
            raise ValueError(f"instructions[{i}]: kind must be one of {', '.join(sorted(CHECKS))}")
        required, _ = CHECKS[ins["kind"]]
        given = set(ins) - {"kind"}
        if given != set(required):
            raise ValueError(f"instructions[{i}] ({ins['kind']}): parameters {sorted(given)}, "
                             f"expected {sorted(required)}")
        if "relation" in ins and ins["relation"] not in RELATIONS:
            raise ValueError(f"instructions[{i}]: relation must be one of {sorted(RELATIONS)}")
        for key in ("num", "nth"):
            if key in ins and (not isinstance(ins[key], int) or isinstance(ins[key], bool) or ins[key] < 0):
                raise ValueError(f"instructions[{i}]: {key} must be an integer >= 0")
        for key in ("phrase", "marker", "keyword", "letter", "first_word"):
            if key in ins and (not isinstance(ins[key], str) or not ins[key].strip()):
                raise ValueError(f"instructions[{i}]: {key} must be a non-empty string")
        if "keywords" in ins and (not isinstance(ins["keywords"], list) or not ins["keywords"]
                                  or not all(isinstance(k, str) and k.strip() for k in ins["keywords"])):
            raise ValueError(f"instructions[{i}]: keywords must be a non-empty list of non-empty strings")
        if ins["kind"] == "letter_frequency" and len(ins["letter"]) != 1:
            raise ValueError(f"instructions[{i}]: letter must be one character")


def strip_thinking(response: str) -> str:
    """The response after its reasoning: the text after the last </think>; nothing when it
    opened a <think> block it never closed (it stopped while still thinking)."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1].lstrip()
    if response.lstrip().startswith("<think>"):
        return ""
    return response


def follows(response: str, instruction: dict) -> bool:
    _, check = CHECKS[instruction["kind"]]
    return bool(check(response, **{k: v for k, v in instruction.items() if k != "kind"}))


def score(response: str, instructions: list[dict]) -> float:
    """The fraction of the instructions the response follows."""
    text = strip_thinking(response)
    return sum(follows(text, ins) for ins in instructions) / len(instructions)
