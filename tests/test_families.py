"""Family verifiers through their public scoring interface: table-driven cases for logic
(reasoning-gym) and stem short answers (math, code, stem multiple choice and ifeval have
their tables in test_answers, test_codecheck and test_ifeval), and the VerifierActor's
error and timeout accounting."""
import json
import time

import pyarrow as pa
import pytest
import reasoning_gym

from prorl_actors import batch as rb
from prorl_actors.actors.verifier import VerifierActor
from prorl_actors.config import build_spec
from prorl_actors.tasks.families import LogicFamily, MathFamily, StemFamily


def _entry(dataset, index=0, **config):
    e = reasoning_gym.create_dataset(dataset, size=index + 1, seed=3, **config)[index]
    return json.loads(json.dumps(e, default=str))


AIW = _entry("aiw")
CHAIN = _entry("chain_sum", min_terms=2, max_terms=2)
GCD = _entry("gcd")
SPELL = _entry("spell_backward")
SORT = _entry("word_sorting", 1)
KK = _entry("knights_knaves")


def tag(x):
    return f"<answer>{x}</answer>"


LOGIC_PASS = [   # (entry, response): reward 1
    (AIW, tag(AIW["answer"])),
    (AIW, f"Count the sisters.\n{tag(AIW['answer'])}"),
    (AIW, f"<answer> {AIW['answer']} </answer>"),
    (AIW, f"<think>maybe {int(AIW['answer']) + 1}</think>{tag(AIW['answer'])}"),
    (AIW, f"{tag(int(AIW['answer']) + 1)} no wait {tag(AIW['answer'])}"),          # the last tag counts
    (AIW, f"<answer>\n{AIW['answer']}\n</answer>"),
    (CHAIN, tag(CHAIN["answer"])),
    (CHAIN, f"Adding: {CHAIN['question'][:20]}...\n{tag(CHAIN['answer'])}"),
    (CHAIN, f"<answer>{CHAIN['answer']}</answer> and that is final."),
    (CHAIN, f"<think>{tag(0)}</think>\n{tag(CHAIN['answer'])}"),
    (GCD, tag(GCD["answer"])),
    (GCD, f"Euclid's algorithm gives {tag(GCD['answer'])}"),
    (GCD, f"<answer>{GCD['answer']}</answer>\n"),
    (SPELL, tag(SPELL["answer"])),
    (SPELL, f"Reversed letter by letter: {tag(SPELL['answer'])}"),
    (SORT, tag(SORT["answer"])),
    (SORT, f"<answer>{SORT['answer']}</answer>"),
    (KK, tag(KK["answer"])),
    (KK, f"Suppose the first is a knight...\n{tag(KK['answer'])}"),
    (AIW, f"**Answer**\n{tag(AIW['answer'])}"),
    (GCD, f"<think>\n</think>\n{tag(GCD['answer'])}"),
]

LOGIC_FAIL = [   # (entry, response): reward below 1
    (AIW, AIW["answer"]),                                   # no tags: no answer
    (AIW, f"The answer is {AIW['answer']}."),
    (AIW, tag(int(AIW["answer"]) + 1)),
    (AIW, f"{tag(AIW['answer'])} no wait {tag(int(AIW['answer']) + 2)}"),  # the last tag counts
    (AIW, f"<answer>{AIW['answer']}"),                      # never closed
    (AIW, f"<think>{tag(AIW['answer'])}"),                  # still thinking when it stopped
    (AIW, f"<think>{tag(AIW['answer'])}</think> I give up."),  # the answer was only in the thinking
    (AIW, "<answer></answer>"),
    (CHAIN, tag(int(CHAIN["answer"]) + 1)),
    (CHAIN, tag(f"{CHAIN['answer']}.5")),
    (CHAIN, "<answer>seven</answer>"),
    (CHAIN, ""),
    (GCD, tag(int(GCD["answer"]) * 2 + 1)),
    (GCD, f"<ANSWER>{GCD['answer']}</ANSWER>"),             # tags are case-sensitive
    (GCD, f"[answer]{GCD['answer']}[/answer]"),
    (SPELL, tag(SPELL["answer"][::-1] + "x")),
    (SPELL, tag("")),
    (SORT, tag(SORT["answer"][::-1] + "zz")),
    (KK, tag("Everyone is a knight and everyone is a knave")),
    (KK, "I cannot tell."),
    (GCD, f"answer: {GCD['answer']}"),
]


@pytest.fixture(scope="module")
def logic():
    return LogicFamily()


@pytest.mark.parametrize("entry,response", LOGIC_PASS)
def test_logic_full_reward(logic, entry, response):
    logic.check_reference(entry)
    assert logic.score(response, entry) == 1.0


@pytest.mark.parametrize("entry,response", LOGIC_FAIL)
def test_logic_not_full_reward(logic, entry, response):
    assert logic.score(response, entry) < 1.0


def test_logic_reference_must_name_a_dataset(logic):
    for bad in ({"answer": "3"}, {"answer": "3", "metadata": {"source_dataset": "nope"}}):
        with pytest.raises(ValueError, match="reasoning-gym"):
            logic.check_reference(bad)


# ---------------------------------------------------------------------------- stem
STEM_PASS = [   # (reference answer, response)
    ("9.8", "g is about \\boxed{9.8}"), ("9.8", "\\boxed{9.80}"), ("0.5", "\\boxed{\\frac{1}{2}}"),
    ("\\frac{1}{2}", "So the answer is 0.5."), ("6", "The atomic number is 6. Final answer: 6"),
    ("2\\pi", "\\boxed{2\\pi}"), ("x^2", "\\boxed{x^{2}}"), ("Carbon", "\\boxed{carbon}"),
    ("Carbon", "The answer is Carbon."), ("oxygen", "\\boxed{\\text{Oxygen}}"),
    ("3 \\times 10^8", "\\boxed{3\\times10^{8}}"), ("12", "<answer>12</answer>"),
    ("-4", "\\boxed{-4}"), ("\\sqrt{2}", "\\boxed{\\sqrt 2}"), ("100", "\\boxed{100}"),
    ("noble gas", "\\boxed{Noble gas}"), ("1/3", "\\boxed{\\frac13}"), ("25", "\\boxed{25}\n"),
    ("0.25", "\\boxed{1/4}"), ("4", "<think>maybe 5</think>\\boxed{4}"),
]
STEM_FAIL = [
    ("9.8", "\\boxed{9.7}"), ("9.8", "9.8"), ("0.5", "\\boxed{\\frac{1}{3}}"), ("6", "\\boxed{}"),
    ("Carbon", "\\boxed{Nitrogen}"), ("Carbon", "carbon"), ("2\\pi", "\\boxed{2}"), ("x^2", "\\boxed{x^3}"),
    ("12", "<answer>13</answer>"), ("-4", "\\boxed{4}"), ("\\sqrt{2}", "\\boxed{2}"), ("100", "\\boxed{1000}"),
    ("noble gas", "\\boxed{gas}"), ("25", "I am not sure"), ("0.25", "\\boxed{0.2}"),
    ("4", "<think>\\boxed{4}"), ("4", "\\boxed{4} ... no, \\boxed{5}"), ("oxygen", "\\boxed{O}"),
    ("1/3", "\\boxed{0.33}"), ("3 \\times 10^8", "\\boxed{3\\times10^{9}}"),
]


@pytest.fixture(scope="module")
def stem():
    fam = StemFamily(MathFamily())
    yield fam
    fam.math.close()


@pytest.mark.parametrize("answer,response", STEM_PASS)
def test_stem_short_answer_right(stem, answer, response):
    stem.check_reference({"answer": answer})
    assert stem.score(response, {"answer": answer}) == 1.0


@pytest.mark.parametrize("answer,response", STEM_FAIL)
def test_stem_short_answer_wrong(stem, answer, response):
    assert stem.score(response, {"answer": answer}) == 0.0


def test_stem_multiple_choice_reference_checks(stem):
    ref = {"choices": ["Iron", "Gold", "Tin"], "answer": "B"}
    stem.check_reference(ref)
    assert stem.score("Option A is out. \\boxed{B}", ref) == 1.0
    assert stem.score("The answer is Gold.", ref) == 1.0
    assert stem.score("\\boxed{A}", ref) == 0.0
    for bad, msg in (({"choices": ["Iron"], "answer": "A"}, "2 to 26"),
                     ({"choices": ["Iron", "Gold"], "answer": "C"}, "one of the letters AB"),
                     ({"answer": "B", "key": 1}, "unknown keys")):
        with pytest.raises(ValueError, match=msg):
            stem.check_reference(bad)


# ---------------------------------------------------------------------------- the actor
def _rollouts(rows):
    n = len(rows)
    return pa.table({
        rb.PROMPT_IDS: pa.array([[1]] * n, pa.list_(pa.int32())), rb.RESPONSE_IDS: pa.array([[2]] * n, pa.list_(pa.int32())),
        rb.SAMPLE_LOGP: pa.array([[0.0]] * n, pa.list_(pa.float32())),
        rb.RESPONSE_TEXT: [r[1] for r in rows], rb.TASK: [r[0] for r in rows],
        rb.ITEM_INDEX: pa.array(range(n), pa.int64()), rb.REFERENCE: [r[2] for r in rows],
        rb.GROUP_ID: pa.array(range(n), pa.int64()), rb.TRUNCATED: [False] * n,
        rb.POLICY_VERSION: pa.array([0] * n, pa.int64())})


def test_verifier_actor_counts_errors_and_timeouts_per_task_and_keeps_going():
    spec = build_spec({"data": {"tasks": [{"name": "sums", "family": "math", "dataset": "arithmetic"},
                                          {"name": "aiw", "family": "logic", "dataset": "aiw"}]},
                       "verifier": {"timeout_s": 1.0, "num_threads": 2}})
    actor = VerifierActor(spec.data, spec.verifier)
    aiw_ref = json.dumps(AIW)
    # warm, outside the 1 s limit: math-verify's child starts on the first check (0.5-0.9 s idle, over 1 s
    # on a loaded CI machine) and reasoning-gym is imported on the first logic check
    real = actor.scorer.score
    assert real("sums", "\\boxed{7}", json.dumps({"answer": "7"})) == 1.0
    assert real("aiw", tag(AIW["answer"]), aiw_ref) == 1.0

    def score(task, response, reference):
        if response == "hang":
            time.sleep(3)
        if response == "boom":
            raise RuntimeError("verifier bug")
        return real(task, response, reference)

    actor.scorer.score = score
    rows = [("sums", "\\boxed{7}", json.dumps({"answer": "7"})), ("sums", "boom", json.dumps({"answer": "7"})),
            ("aiw", "hang", aiw_ref), ("aiw", tag(AIW["answer"]), aiw_ref), ("aiw", "no tags", aiw_ref),
            ("sums", "\\boxed{8}", json.dumps({"answer": "7"}))]
    out = actor.verify(_rollouts(rows))        # the hung check is abandoned at its limit: stuck_threads below
    rb.check_batch(out, needs=(rb.REWARD, rb.VERIFY_ERROR, rb.VERIFY_TIMEOUT, rb.FORMATTED))
    assert out[rb.REWARD].to_pylist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert out[rb.VERIFY_ERROR].to_pylist() == [False, True, False, False, False, False]
    assert out[rb.VERIFY_TIMEOUT].to_pylist() == [False, False, True, False, False, False]
    assert out[rb.FORMATTED].to_pylist() == [True, False, False, True, False, True]
    stats = actor.stats()
    assert stats["errors"] == {"sums": 1} and stats["timeouts"] == {"aiw": 1}
    assert stats["scored"] == {"sums": 3, "aiw": 3} and stats["stuck_threads"] == 1   # the warm-up is not the actor's
    assert "verifier bug" in stats["last_errors"][0]
    again = actor.verify(_rollouts(rows[:1] + rows[3:4]))   # a fresh pool: the next batch scores normally
    assert again[rb.REWARD].to_pylist() == [1.0, 1.0]
    actor.close()


def test_a_generated_logic_task_scores_with_its_own_settings():
    """decimal_arithmetic's tolerance is one unit in the last decimal place of *its config*."""
    from prorl_actors.tasks import Scorer, validation_items
    tasks = [{"name": "coarse", "family": "logic", "dataset": "decimal_arithmetic",
              "config": {"min_num_decimal_places": 1, "max_num_decimal_places": 1}},
             {"name": "default", "family": "logic", "dataset": "decimal_arithmetic"}]
    data = build_spec({"data": {"tasks": tasks}}).data
    scorer = Scorer(data)
    item = validation_items(data, 1)[0]
    assert item.task == "coarse"
    from decimal import Decimal
    off = str(Decimal(item.answer) + Decimal("0.05"))
    assert scorer.score("coarse", tag(off), item.reference) == 1.0    # within 10^-1
    assert scorer.score("default", tag(off), item.reference) < 1.0    # the default's tolerance is finer
