"""Answer extraction and checking, table-driven: each table has cases that must pass and
cases that must fail, the tricky ones included."""
import pytest

from prorl_actors.tasks.answers import extract_choice, final_answer, last_boxed, last_python_block
from prorl_actors.tasks.mathcheck import CheckTimeout, MathChecker


@pytest.fixture(scope="module")
def checker():
    c = MathChecker(timeout_s=10.0)
    yield c
    c.close()


def math_reward(checker, response: str, reference: str) -> int:
    """1 or 0 as judged: no committed answer, or math-verify's verdict. A checker that breaks
    (CheckTimeout, ValueError) raises here, so that the negative table cannot pass on a failure."""
    answer = final_answer(response)
    if answer is None:
        return 0
    return int(checker.equivalent(answer, reference))


MATH_PASS = [
    ("So the answer is \\boxed{\\frac12}.", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75"),
    ("First \\boxed{3}, no wait: \\boxed{4}", "4"),                          # the last box counts
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{(1,2]}", "(1, 2]"),
    ("\\boxed{\\{1,2,3\\}}", "\\{3,2,1\\}"),
    ("\\boxed{x=3}", "3"),
    ("\\boxed{3.0}", "3"),
    ("\\boxed{10^{3}}", "1000"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{50\\%}", "\\frac12"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("The final answer is $\\frac{7}{2}$.", "3.5"),
    ("Thus the answer is 12", "12"),
    ("<answer>42</answer>", "42"),
    ("\\boxed{2\\pi}", "2\\pi"),
    ("\\boxed{\\frac{a}{b}} where ... \\boxed{-\\frac{1}{3}}", "-1/3"),
    ("\\boxed 7", "7"),
    ("\\boxed{\\left(2, 3\\right)}", "(2,3)"),
    ("\\boxed{\\frac{6}{4}}", "1.5"),
]

MATH_FAIL = [
    ("\\boxed{\\frac12}", "0.51"),
    ("\\boxed{4} then I reconsider: \\boxed{3}", "4"),                       # the last box counts
    ("\\boxed{[1,2]}", "(1,2]"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}"),
    ("\\boxed{-1}", "1"),
    ("\\boxed{\\pi}", "3.14159"),
    ("I think it is 5.", "5"),                                              # no committed answer
    ("", "5"),
    ("\\boxed{}", "5"),
    ("\\boxed{5", "5"),                                                     # cut off inside the box
    ("\\boxed{x^2+1}", "(x+1)^2"),
    ("The answer is 2", "3"),
    ("<answer>41</answer>", "42"),
    ("\\boxed{\\sqrt{3}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{12} people", "13"),
    ("\\boxed{(2,3)}", "(3,2)"),
    ("\\boxed{0.333}", "\\frac{1}{3}"),
    ("\\boxed{1/2}", "2"),
    ("\\boxed{\\text{no solution}}", "0"),
    ("The answer is probably between 3 and 5", "4"),
    ("\\boxed{2\\pi}", "\\pi"),
]


@pytest.mark.parametrize("response,reference", MATH_PASS)
def test_math_equivalent(checker, response, reference):
    assert math_reward(checker, response, reference) == 1


@pytest.mark.parametrize("response,reference", MATH_FAIL)
def test_math_not_equivalent(checker, response, reference):
    assert math_reward(checker, response, reference) == 0


def test_last_boxed_handles_nesting_and_escapes():
    assert last_boxed("\\boxed{\\frac{\\sqrt{3}}{2}}") == "\\frac{\\sqrt{3}}{2}"
    assert last_boxed("a \\boxed{1} b \\fbox{2}") == "2"
    assert last_boxed("\\boxed{\\{1, \\{2\\}\\}}") == "\\{1, \\{2\\}\\}"
    assert last_boxed("\\boxed{unbalanced") is None and last_boxed("nothing") is None


def test_a_check_that_runs_too_long_is_a_timeout_and_the_next_one_works():
    c = MathChecker(timeout_s=0.5)
    try:
        with pytest.raises(CheckTimeout):
            c.equivalent("(" * 5000 + "1" + ")" * 5000 + "^" + "9" * 2000, "9" * 2000)
        assert c.equivalent("\\frac12", "0.5") and c.stats["timeouts"] == 1
    finally:
        c.close()


def test_checks_from_threads(checker):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: checker.equivalent(f"\\frac{{{i}}}{{4}}", str(i / 4)), range(20)))
    assert all(got)


OPTIONS = ["Paris", "London", "Rome", "Berlin"]

CHOICE_PASS = [   # (response, the letter it commits to)
    ("The answer is (C).", "C"),
    ("Answer: D", "D"),
    ("Option A is wrong because it is in England. I think B is close. Answer: D", "D"),
    ("\\boxed{B}", "B"),
    ("\\boxed{(B)}", "B"),
    ("\\boxed{\\text{C}}", "C"),
    ("Let me think.\n\n(C)", "C"),
    ("Reasoning...\nC", "C"),
    ("Reasoning...\n**A**", "A"),
    ("so the answer is Rome.", "C"),
    ("<answer>b</answer>", "B"),
    ("<answer>Berlin</answer>", "D"),
    ("Answer: **C**", "C"),
    ("The correct option is B, not A.", "B"),
    ("A and B look plausible, but the final answer is D.", "D"),
    ("First I said answer: A. On reflection the answer is C", "C"),
    ("\\boxed{A} ... wait, \\boxed{B}", "B"),
    ("The answer is: [B]", "B"),
    ("I believe the correct choice is (A)", "A"),
    ("Final answer: D.", "D"),
    ("ANSWER: C", "C"),
]



@pytest.mark.parametrize("response,letter", CHOICE_PASS)
def test_choice_extracted(response, letter):
    assert extract_choice(response, OPTIONS) == letter


NO_CHOICE = [
    "I am not sure.", "A is tempting. B too.", "Option A is wrong because of the dates.",
    "I think the capital is nice.", "", "\\boxed{E}", "Answer: E", "<answer>Madrid</answer>",
    "The answer is Madrid.", "It could be A or B.", "Between A and D, hmm.", "a lot of reasoning",
    "I", "Answer: I don't know", "The answer is unclear", "\\boxed{}", "(E)",
    "As I said, Berlin and Rome are both capitals.", "I'd pick one of A, B.",
    "The answer is Berlin or Rome.", "Answer: AB", "the answer is a", "The answer is a capital city.",
]


@pytest.mark.parametrize("response", NO_CHOICE)
def test_no_choice(response):
    assert extract_choice(response, OPTIONS) is None


WRONG_CHOICE = [   # commits to a letter that is not the key (key: C)
    ("The answer is (A).", "A"), ("\\boxed{B}", "B"), ("Answer: D", "D"),
    ("C is tempting but the answer is B", "B"), ("<answer>Paris</answer>", "A"),
]


@pytest.mark.parametrize("response,letter", WRONG_CHOICE)
def test_wrong_choice_is_not_the_key(response, letter):
    assert extract_choice(response, OPTIONS) == letter != "C"


def test_last_python_block():
    text = "Here:\n```python\nprint(1)\n```\nand better:\n```py\nprint(2)\n```\n"
    assert last_python_block(text) == "print(2)\n"
    assert last_python_block("```\nx = 1\n```") == "x = 1\n"
    assert last_python_block("```bash\nls\n```\n```python\nok()\n```\n```text\nout\n```") == "ok()\n"
    assert last_python_block("no code") is None and last_python_block("```python\nunterminated") is None
