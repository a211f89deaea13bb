"""Pulling the final answer out of a model's response: pure string functions, no I/O.

Every extractor returns None when the response commits to no answer (that scores 0), and each
reads the *last* committed answer: reasoning often tries several values before settling.
"""
from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_IS = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:)\s*(.+)", re.IGNORECASE)


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The contents of the balanced {...} group opening at text[start], and the index after it."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            continue   # an escaped brace (\{ \}) is part of the content
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None   # unbalanced: the response was cut off inside the box


def last_boxed(text: str) -> str | None:
    """The content of the last complete \\boxed{...} (nested braces allowed), or of a bare
    `\\boxed 5`."""
    found = None
    for m in _BOXED.finditer(text):
        group = _braced(text, m.end())
        if group is not None:
            found = group[0]
        else:
            bare = re.match(r"([^\s$]+)", text[m.end():])
            if bare and not text[m.end():].startswith("{"):
                found = bare.group(1)
    return found.strip() if found is not None else None


def tagged_answer(text: str) -> str | None:
    """The text inside the last <answer>...</answer>, stripped (logic's answer format)."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def _strip_math(answer: str) -> str:
    """Without surrounding $...$, \\(...\\), \\[...\\] and a final period."""
    answer = answer.strip().rstrip(".").strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(a) and answer.endswith(b) and len(answer) >= len(a) + len(b):
            answer = answer[len(a):len(answer) - len(b)].strip()
    return answer.rstrip(".").strip()


def final_answer(text: str) -> str | None:
    """The last \\boxed{...}; else the last <answer>...</answer>; else the last "answer is ..."
    line (up to the end of its line, $...$ and a final period removed)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return _strip_math(tags[-1])
    lines = [m.group(1) for line in text.splitlines() if (m := _ANSWER_IS.search(line))]
    if lines:
        answer = _strip_math(lines[-1])
        return answer or None
    return None


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------
def choice_letters(num_options: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:num_options]


def extract_choice(text: str, options: list[str]) -> str | None:
    """The option letter a response commits to, or None. In order of trust, the last of:
    1. \\boxed{C} or <answer>C</answer> (a letter, "(C)", or exactly one option's text);
    2. an explicit statement: "answer: C", "the answer is (C)", "correct option is C";
    3. a closing line that is only the letter: "C", "(C)", "C.", "**C**";
    4. "the answer is <the text of exactly one option>".
    A letter that merely appears in the reasoning ("option A is wrong", "I think") is never a
    choice."""
    letters = choice_letters(len(options))

    def as_letter(s: str) -> str | None:
        s = re.sub(r"^\\text\{(.*)\}$", r"\1", _strip_math(s)).strip().strip("*").strip()
        m = re.fullmatch(rf"\(?([{letters}])\)?[.:)]?", s.upper() if len(s) <= 4 else s)
        if m:
            return m.group(1)
        same = [letters[i] for i, o in enumerate(options) if _norm(o) and _norm(o) == _norm(s)]
        return same[0] if len(same) == 1 else None

    boxed = last_boxed(text)
    if boxed is not None:
        return as_letter(boxed)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return as_letter(tags[-1])
    # The keywords in any case, the letter in capitals ("the answer is a ..." is an article).
    stated = re.findall(rf"(?i:answer|correct\s+(?:option|choice))\s*(?i:is\s*:?|:|=)\s*(?i:option\s*)?"
                        rf"[*(\[]*\s*([{letters}])\s*[*)\]]*(?![A-Za-z0-9])", text)
    if stated:
        return stated[-1]
    tail = text.strip().splitlines()[-2:] if text.strip() else []
    closing = [m.group(1) for line in tail if (m := re.fullmatch(rf"\s*\**\(?([{letters}])\)?[.)]?\**\s*", line))]
    if closing:
        return closing[-1]
    said = _norm(text)
    quoted = [letters[i] for i, o in enumerate(options)
              if _norm(o) and re.search(rf"answer\s*(?:is|:)\s*[\"']?{re.escape(_norm(o))}[\"']?\s*(?:[.!]|$)", said)]
    return quoted[0] if len(quoted) == 1 else None


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower()).rstrip(".")


# ---------------------------------------------------------------------------------------------
# Code
# ---------------------------------------------------------------------------------------------
def code_blocks(text: str) -> list[tuple[str, str]]:
    """Every complete fenced block as (language, body), in order."""
    blocks, lang, body = [], None, []
    for line in text.splitlines(keepends=True):
        fence = re.fullmatch(r"\s*```\s*([\w+-]*)\s*", line.rstrip("\n"))
        if lang is None:
            if fence:
                lang, body = fence.group(1).lower(), []
        elif fence and not fence.group(1):
            blocks.append((lang, "".join(body)))
            lang = None
        else:
            body.append(line)
    return blocks


def last_python_block(text: str) -> str | None:
    """The last fenced block marked python (or py / python3); if none is marked, the last
    unmarked one. A block cut off before its closing fence does not count."""
    blocks = code_blocks(text)
    marked = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    pool = marked or [body for lang, body in blocks if not lang]
    return pool[-1] if pool else None
