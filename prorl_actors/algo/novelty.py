"""Novelty of correct solutions: a cheap, local stand-in for ProRL's Creativity Index.

The paper measures how much of a response can be stitched together from text of the
pre-training corpus; without that corpus we ask a narrower question: does the trained model
solve a prompt *in words the base model never used for it*?

Algorithmic choices:
- Text is split into words and single symbols (`\\w+|[^\\w\\s]`), so `\\boxed{12}` is
  `\\ boxed { 12 }`: formats and numbers count, whitespace does not.
- Each response contributes its *distinct* n-grams (a repeated phrase is one n-gram).
- An n-gram of a correct response is novel when it appears in none of the base model's n
  responses to the same prompt (right or wrong: anything the base model said).
- The figure is pooled, novel / total over all the n-grams of all correct responses of a
  task, so long responses weigh more than short ones; responses shorter than n words have
  no n-grams and do not count.
"""
from __future__ import annotations

import re

WORDS = re.compile(r"\w+|[^\w\s]")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The distinct n-grams of words and symbols in `text` (empty when it has fewer than n)."""
    words = WORDS.findall(text)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def novel_ngrams(responses: list[str], base_responses: list[str], n: int) -> tuple[int, int]:
    """responses: the model's correct responses to one prompt; base_responses: the base
    model's responses to the same prompt -> (novel n-grams, n-grams), summed over responses."""
    seen = set().union(*(ngrams(r, n) for r in base_responses)) if base_responses else set()
    novel = total = 0
    for r in responses:
        grams = ngrams(r, n)
        total += len(grams)
        novel += len(grams - seen)
    return novel, total
