"""Small procedural generators for the math, code, stem and ifeval families, so that the CPU
default needs no files (logic, and more arithmetic, come from reasoning-gym).

A generator is `fn(rng, **config) -> (prompt, answer, reference)`: `answer` is the reference
answer as text (a letter, a number, a program, a compliant response) and `reference` is the
JSON object the family's verifier reads. Items are pure functions of (seed, index).
"""
from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Callable

from prorl_actors.tasks import ifeval

Generated = tuple[str, str, dict]
GENERATORS: dict[str, dict[str, Callable[..., Generated]]] = {"math": {}, "code": {}, "stem": {}, "ifeval": {}}


def generator(family: str, name: str):
    def deco(fn):
        GENERATORS[family][name] = fn
        return fn
    return deco


def _latex(q: Fraction) -> str:
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


# ------------------------------------------------------------------------------------ math
@generator("math", "arithmetic")
def arithmetic(rng: random.Random, min_terms: int = 2, max_terms: int = 3, max_value: int = 9,
               ops: str = "+-*") -> Generated:
    """An integer expression with operator precedence: "Compute 7 - 2 * 3." -> 1."""
    n = rng.randint(min_terms, max_terms)
    expr = str(rng.randint(0, max_value))
    for _ in range(n - 1):
        expr += f" {rng.choice(ops)} {rng.randint(0, max_value)}"
    value = eval(expr, {"__builtins__": {}})  # our own digits and + - *: nothing else can be in it
    return f"Compute {expr}.", str(value), {"answer": str(value)}


@generator("math", "step_sum")
def step_sum(rng: random.Random, min_terms: int = 3, max_terms: int = 3, max_value: int = 9,
             max_first: int | None = None, max_running: int | None = None) -> Generated:
    """A sum of one-digit terms worked one addition at a time on a scratchpad: "Compute 7 + 5 + 8."
    -> "7+5=12. 12+8=20." then 20. The reference holds the worked solution (`solution`) that a
    warm start imitates; the verifier reads only `answer`. `max_first` allows a larger first
    term (a single addition of a digit to a number); `max_running` keeps every running total at
    or under it (sums that never leave one digit)."""
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
    first_hi = max_value if max_first is None else max_first
    if max_running is not None and max_running < 0:
        raise ValueError(f"max_running must be >= 0, got {max_running}")
    n = rng.randint(min_terms, max_terms)
    while True:   # with max_running: redraw until every running total stays under it (0s always do)
        terms = [rng.randint(0, first_hi)] + [rng.randint(0, max_value) for _ in range(n - 1)]
        totals = [sum(terms[:i + 1]) for i in range(1, n)]
        if max_running is None or totals[-1] <= max_running:   # the last total is the largest
            break
    steps = [f"{total - t}+{t}={total}." for t, total in zip(terms[1:], totals)]
    answer = str(totals[-1])
    return (f"Compute {' + '.join(map(str, terms))}.", answer,
            {"answer": answer, "solution": " ".join(steps)})


# Digit-string functions that `compose` chains: each a fixed, local operation on a string of
# digits 1-9 (no 0, so no answer loses a leading zero when the verifier reads it as a number).
STRING_FUNCTIONS: dict[str, Callable[[str], str]] = {
    "rev": lambda s: s[::-1],                                   # reverse: 3821 -> 1283
    "rol": lambda s: s[1:] + s[:1],                             # rotate left: 3821 -> 8213
    "ror": lambda s: s[-1:] + s[:-1],                           # rotate right: 3821 -> 1382
    "swp": lambda s: s[1:2] + s[:1] + s[2:],                    # swap the first two: 3821 -> 8321
    "inc": lambda s: "".join(str(int(d) % 9 + 1) for d in s),   # each digit up one, 9 -> 1: 3821 -> 4932
    "up": lambda s: str(int(s[0]) % 9 + 1) + s[1:],             # the first digit up one: 3821 -> 4821
}
# inc commutes with every reordering (rev, rol, ror, swp): a chain of both has the same answer in
# either order, so a model that applies them out of order is still rewarded. up does not commute.


@generator("math", "compose")
def compose(rng: random.Random, min_fns: int = 1, max_fns: int = 1, digits: int = 4,
            functions: list[str] | None = None, last: list[str] | None = None,
            chains: list[list[str]] | None = None) -> Generated:
    """A chain of named digit-string functions (`STRING_FUNCTIONS`, no name twice), applied in
    order, one a line on a scratchpad: "Apply rol, then inc, to 3821." -> "rol(3821)=8213.
    inc(8213)=9324." then 9324. Skills taught one at a time (min_fns = max_fns = 1) compose into
    chains whose every step the model can already do; `last` (default: any) draws the chain's
    last function from these, so that a warm start can compose some functions in a place where
    RL alone meets others. `chains` instead names the chains to draw from (e.g. the pairs a warm
    start composes, and other pairs for RL); the other settings then keep their defaults. The
    reference holds the worked solution."""
    if not 2 <= digits <= 9:
        raise ValueError(f"digits must be 2..9 (distinct digits 1-9), got {digits}")
    if chains is not None:
        if (min_fns, max_fns, functions, last) != (1, 1, None, None):
            raise ValueError("chains names the chains: leave min_fns, max_fns, functions and last unset")
        bad = [c for c in chains if not c or len(set(c)) < len(c) or not set(c) <= set(STRING_FUNCTIONS)]
        if not chains or bad:
            raise ValueError(f"chains must be non-empty lists of distinct names from {sorted(STRING_FUNCTIONS)}, "
                             f"got {bad or chains}")
        chain = list(rng.choice(chains))
    else:
        names = sorted(set(STRING_FUNCTIONS if functions is None else functions))
        unknown = sorted(set(names) - set(STRING_FUNCTIONS))
        if unknown:
            raise ValueError(f"unknown functions {unknown}; known: {sorted(STRING_FUNCTIONS)}")
        if not 1 <= min_fns <= max_fns <= len(names):
            raise ValueError(f"need 1 <= min_fns <= max_fns <= {len(names)} (distinct functions), "
                             f"got {min_fns}, {max_fns}")
        ends = sorted(set(names) if last is None else set(last))
        if not ends or not set(ends) <= set(names):
            raise ValueError(f"last must be a non-empty subset of the functions {names}, got {last}")
        n = rng.randint(min_fns, max_fns)
        end = rng.choice(ends)
        chain = rng.sample(sorted(set(names) - {end}), n - 1) + [end]
    value = "".join(map(str, rng.sample(range(1, 10), digits)))   # distinct: no function is the identity on it
    prompt = f"Apply {', then '.join(chain)}, to {value}."
    steps = []
    for name in chain:
        out = STRING_FUNCTIONS[name](value)
        steps.append(f"{name}({value})={out}.")
        value = out
    return prompt, value, {"answer": value, "solution": " ".join(steps)}


@generator("math", "linear_equation")
def linear_equation(rng: random.Random, max_coef: int = 9) -> Generated:
    """a*x + b = c with a rational solution, answered as a reduced fraction."""
    a = rng.choice([k for k in range(-max_coef, max_coef + 1) if k])
    b, c = rng.randint(-max_coef, max_coef), rng.randint(-max_coef * 3, max_coef * 3)
    x = Fraction(c - b, a)
    ax = {1: "x", -1: "-x"}.get(a, f"{a}x")
    lhs = ax if b == 0 else f"{ax} {'+' if b > 0 else '-'} {abs(b)}"
    return f"Solve for x: {lhs} = {c}.", _latex(x), {"answer": _latex(x)}


@generator("math", "fraction_sum")
def fraction_sum(rng: random.Random, max_den: int = 9) -> Generated:
    """p/q + r/s in lowest terms (math-verify accepts 0.5 for \\frac{1}{2})."""
    f1 = Fraction(rng.randint(1, max_den), rng.randint(2, max_den))
    f2 = Fraction(rng.randint(1, max_den), rng.randint(2, max_den))
    total = f1 + f2
    return (f"Add the fractions {f1.numerator}/{f1.denominator} + {f2.numerator}/{f2.denominator}. "
            "Give the result in lowest terms.", _latex(total), {"answer": _latex(total)})


# ------------------------------------------------------------------------------------ stem
ELEMENTS = [("H", "Hydrogen", 1), ("He", "Helium", 2), ("Li", "Lithium", 3), ("Be", "Beryllium", 4),
            ("B", "Boron", 5), ("C", "Carbon", 6), ("N", "Nitrogen", 7), ("O", "Oxygen", 8),
            ("F", "Fluorine", 9), ("Ne", "Neon", 10), ("Na", "Sodium", 11), ("Mg", "Magnesium", 12),
            ("Al", "Aluminium", 13), ("Si", "Silicon", 14), ("P", "Phosphorus", 15), ("S", "Sulfur", 16),
            ("Cl", "Chlorine", 17), ("Ar", "Argon", 18), ("K", "Potassium", 19), ("Ca", "Calcium", 20),
            ("Fe", "Iron", 26), ("Cu", "Copper", 29), ("Zn", "Zinc", 30), ("Ag", "Silver", 47),
            ("Sn", "Tin", 50), ("I", "Iodine", 53), ("Au", "Gold", 79), ("Hg", "Mercury", 80),
            ("Pb", "Lead", 82), ("U", "Uranium", 92)]


def _multiple_choice(rng: random.Random, question: str, right: str, wrong: list[str],
                     num_choices: int) -> Generated:
    choices = [right] + rng.sample(wrong, num_choices - 1)
    rng.shuffle(choices)
    letter = "ABCDEFGHIJ"[choices.index(right)]
    body = "\n".join(f"{'ABCDEFGHIJ'[i]}) {c}" for i, c in enumerate(choices))
    return f"{question}\n{body}", letter, {"choices": choices, "answer": letter}


@generator("stem", "element_symbols")
def element_symbols(rng: random.Random, num_choices: int = 4) -> Generated:
    """Multiple choice: which element has the symbol Fe?"""
    sym, name, _ = rng.choice(ELEMENTS)
    return _multiple_choice(rng, f"Which element has the chemical symbol {sym}?", name,
                            [n for _, n, _ in ELEMENTS if n != name], num_choices)


@generator("stem", "unit_conversion")
def unit_conversion(rng: random.Random, num_choices: int = 4) -> Generated:
    """Multiple choice: 3 kilograms in grams, with distractors off by powers of ten."""
    units = [("kilograms", "grams", 1000), ("meters", "centimeters", 100), ("liters", "milliliters", 1000),
             ("hours", "minutes", 60), ("minutes", "seconds", 60), ("kilometers", "meters", 1000)]
    big, small, factor = rng.choice(units)
    k = rng.randint(2, 9)
    right = k * factor
    wrong = sorted({k * factor // 10, k * factor * 10, k + factor, (k + 1) * factor, k * factor // 100 or 1} - {right})
    return _multiple_choice(rng, f"How many {small} are in {k} {big}?", str(right), [str(w) for w in wrong],
                            min(num_choices, len(wrong) + 1))


@generator("stem", "kinematics")
def kinematics(rng: random.Random) -> Generated:
    """Short answer: uniform motion, Newton's second law or density, numbers chosen to divide."""
    kind = rng.choice(["speed", "force", "density"])
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if kind == "speed":
        q, ans = f"A cart moves {a * b} m in {b} s at constant speed. What is its speed in m/s?", a
    elif kind == "force":
        q, ans = f"A net force accelerates a {a} kg mass at {b} m/s^2. What is the force in newtons?", a * b
    else:
        q, ans = f"A block of mass {a * b} g has a volume of {b} cm^3. What is its density in g/cm^3?", a
    return q, str(ans), {"answer": str(ans)}


# ------------------------------------------------------------------------------------ code
_STDIO_PROBLEMS = [
    # (statement, solution, input maker, output function)
    ("Read two integers a and b from one line of standard input and print a + b.",
     "a, b = map(int, input().split())\nprint(a + b)\n",
     lambda r: f"{r.randint(-99, 99)} {r.randint(-99, 99)}", lambda s: str(sum(map(int, s.split())))),
    ("Read a line of text and print it reversed.",
     "print(input()[::-1])\n",
     lambda r: "".join(r.choice("abcdefgh xyz") for _ in range(r.randint(1, 12))).strip() or "a",
     lambda s: s[::-1]),
    ("Read an integer n (0 <= n <= 12) and print n factorial.",
     "import math\nprint(math.factorial(int(input())))\n",
     lambda r: str(r.randint(0, 12)), lambda s: str(math.factorial(int(s)))),
    ("The first line holds n, the second n integers. Print the largest of them.",
     "input()\nprint(max(map(int, input().split())))\n",
     lambda r: (lambda xs: f"{len(xs)}\n{' '.join(map(str, xs))}")([r.randint(-50, 50) for _ in range(r.randint(1, 8))]),
     lambda s: str(max(map(int, s.splitlines()[1].split())))),
    ("Read a word and print how many vowels (a, e, i, o, u) it has.",
     "print(sum(c in 'aeiou' for c in input()))\n",
     lambda r: "".join(r.choice("abcdeiouxyz") for _ in range(r.randint(1, 10))),
     lambda s: str(sum(c in "aeiou" for c in s))),
]

_CALL_PROBLEMS = [
    ("Write a function `second_largest(xs)` that returns the second largest distinct value of a list "
     "of integers with at least two distinct values.",
     "def second_largest(xs):\n    return sorted(set(xs))[-2]\n", "second_largest",
     lambda r: [sorted({r.randint(0, 30) for _ in range(6)} | {31, 32}, key=lambda _: r.random())],
     lambda xs: sorted(set(xs))[-2]),
    ("Write a function `is_palindrome(s)` that returns True when the string s reads the same backwards.",
     "def is_palindrome(s):\n    return s == s[::-1]\n", "is_palindrome",
     lambda r: [r.choice(["abba", "abc", "racecar", "x", "xy", "noon", "level", "lever"])],
     lambda s: s == s[::-1]),
    ("Write a function `gcd(a, b)` returning the greatest common divisor of two positive integers.",
     "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n", "gcd",
     lambda r: [r.randint(1, 200), r.randint(1, 200)], math.gcd),
    ("Write a function `sum_of_squares(n)` returning 1*1 + 2*2 + ... + n*n.",
     "def sum_of_squares(n):\n    return sum(i * i for i in range(1, n + 1))\n", "sum_of_squares",
     lambda r: [r.randint(0, 50)], lambda n: sum(i * i for i in range(1, n + 1))),
]


@generator("code", "stdio")
def stdio_problem(rng: random.Random, num_tests: int = 4) -> Generated:
    statement, solution, make_input, output = rng.choice(_STDIO_PROBLEMS)
    inputs = [make_input(rng) for _ in range(num_tests)]
    tests = [{"kind": "stdio", "stdin": s + "\n", "stdout": output(s)} for s in inputs]
    example = f"\n\nExample input:\n{inputs[0]}\nExample output:\n{output(inputs[0])}"
    return statement + example, solution, {"tests": tests}


@generator("code", "function")
def function_problem(rng: random.Random, num_tests: int = 4) -> Generated:
    statement, solution, fn, make_args, result = rng.choice(_CALL_PROBLEMS)
    tests = []
    for _ in range(num_tests):
        args = make_args(rng)
        tests.append({"kind": "call", "fn": fn, "args": args, "expected": result(*args)})
    return statement, solution, {"tests": tests}


# ------------------------------------------------------------------------------------ ifeval
_TOPICS = {
    "the sea": ["the sea is wide and blue", "waves roll onto the sand", "boats sail far out"],
    "cats": ["cats sleep most of the day", "a cat likes a warm spot", "cats chase small toys"],
    "rain": ["rain falls on the roof", "the streets shine after rain", "plants drink the rain"],
    "bread": ["bread needs flour and water", "fresh bread smells good", "we bake bread at dawn"],
    "music": ["music fills the room", "a drum keeps the beat", "songs can lift a mood"],
    "trees": ["trees give us shade", "old trees grow tall", "leaves turn gold in autumn"],
}
_KEYWORDS = ["today", "gentle", "always", "bright", "quiet", "simple"]


_FIXED_PARAMS = {"end_phrase": {"phrase": "Is there anything else?"}, "postscript": {"marker": "P.S."}}


def _ifeval_candidate(rng: random.Random, topic: str, kinds: list[str], sentences: int) -> tuple[list[dict], str]:
    """Instructions of the chosen kinds and a response built to follow them all."""
    text = ". ".join(rng.sample(_TOPICS[topic], sentences)) + "."
    text = text[0].upper() + text[1:]
    ins: list[dict] = []
    for kind in sorted(kinds, key=lambda k: k == "keywords_exclude"):   # excluded: a word not yet used
        if kind == "keywords_include":
            kw = rng.choice(_KEYWORDS)
            ins.append({"kind": kind, "keywords": [kw]})
            text = f"{text} It is {kw}."
        elif kind == "keywords_exclude":
            ins.append({"kind": kind, "keywords": [rng.choice([w for w in _KEYWORDS if w not in text.lower()])]})
        else:
            ins.append({"kind": kind, **_FIXED_PARAMS.get(kind, {})})
    # apply in an order that keeps every earlier instruction true
    if "title" in kinds:
        text = f"<<{topic.title()}>>\n{text}"
    if "postscript" in kinds:
        text += "\nP.S. thanks for reading."
    if "end_phrase" in kinds:
        text += " Is there anything else?"
    if "no_commas" in kinds:
        text = text.replace(",", "")
    if "lowercase" in kinds:
        text = text.lower()
    for i in ins:   # counted on the finished response
        if i["kind"] == "word_count":
            i.update(relation="at most", num=len(ifeval._words(text)) + rng.randint(0, 3))
    return ins, text


_IFEVAL_TEXT = {
    "keywords_include": lambda i: f"Include the word \"{i['keywords'][0]}\".",
    "keywords_exclude": lambda i: f"Do not use the word \"{i['keywords'][0]}\".",
    "word_count": lambda i: f"Use at most {i['num']} words.",
    "lowercase": lambda i: "Write everything in lowercase letters.",
    "no_commas": lambda i: "Do not use any commas.",
    "title": lambda i: "Give it a title in double angular brackets, like <<title>>.",
    "end_phrase": lambda i: f"End your reply with the exact phrase \"{i['phrase']}\".",
    "postscript": lambda i: f"Add a postscript starting with {i['marker']}",
}


@generator("ifeval", "short_writing")
def short_writing(rng: random.Random, min_instructions: int = 1, max_instructions: int = 3,
                  sentences: int = 2) -> Generated:
    """A short text about a topic under 1-3 verifiable instructions, with a compliant reference
    response (checked by the verifier itself before the item is returned)."""
    topic = rng.choice(sorted(_TOPICS))
    kinds = rng.sample(sorted(_IFEVAL_TEXT), rng.randint(min_instructions, max_instructions))
    ins, text = _ifeval_candidate(rng, topic, kinds, sentences)
    if ifeval.score(text, ins) != 1.0:
        raise AssertionError(f"short_writing built a reference that fails its own instructions: {ins}")
    noun = "sentence" if sentences == 1 else f"{sentences} sentences"
    prompt = f"Write {noun} about {topic}. " + " ".join(_IFEVAL_TEXT[i["kind"]](i) for i in ins)
    return prompt, text, {"instructions": ins}
