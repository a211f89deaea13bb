"""Tasks: sources, templates, the mixture sampler, and the spec rules for task entries."""
import json

import pytest

from prorl_actors.config import build_spec
from prorl_actors.spec import SpecError
from prorl_actors.tasks import (OOD_EVAL_DATASETS, RG_CHUNK, RG_MATH_DATASETS, Scorer, TaskMixture, make_task,
                                validation_items)
from prorl_actors.tasks.builtin import GENERATORS
from prorl_actors.tasks.checks import generator_names

MIX = [
    {"name": "sums", "family": "math", "dataset": "arithmetic", "config": {"max_terms": 2}},
    {"name": "gcd", "family": "logic", "dataset": "gcd", "weight": 3.0},
    {"name": "elements", "family": "stem", "dataset": "element_symbols"},
]


def _data(tasks=MIX, **kw):
    return build_spec({"data": {"tasks": tasks, **kw}}).data


@pytest.fixture(scope="module")
def scorer():
    every = [{"name": f"{fam}-{gen}", "family": fam, "dataset": gen}
             for fam, gens in GENERATORS.items() for gen in gens]
    every += [{"name": f"rg-math-{d}", "family": "math", "dataset": d} for d in RG_MATH_DATASETS]
    data = _data(every)
    s = Scorer(data)
    yield data, s
    s.close()


def test_every_builtin_and_reasoning_gym_math_item_is_solved_by_its_reference_and_not_off_format(scorer):
    data, s = scorer
    items = validation_items(data, 4)
    assert {it.task for it in items} == {t.name for t in data.tasks}
    for it in items:
        good, off = s.completion(it, True), s.completion(it, False)
        assert s.score(it.task, good, it.reference) == 1.0, (it, good)
        assert s.formatted(it.task, good)
        if off is not None:   # the right content outside the format the verifier reads
            assert s.score(it.task, off, it.reference) == 0.0, (it, off)


def test_templates_render_per_family_and_per_task():
    data = _data(MIX + [{"name": "own", "family": "math", "dataset": "arithmetic",
                         "prompt": {"system": "", "user": "Q: {question}\nA:"}}],
                 prompts={"stem": {"system": "Pick one.", "user": "{question}"}})
    by_task = {it.task: it for it in validation_items(data, 1)}
    assert by_task["elements"].messages == [{"role": "system", "content": "Pick one."},
                                            {"role": "user", "content": by_task["elements"].question}]
    assert "\\boxed{}" in by_task["sums"].messages[0]["content"]          # the math family's default
    assert by_task["own"].messages == [{"role": "user", "content": f"Q: {by_task['own'].question}\nA:"}]
    with pytest.raises(SpecError, match=r"data.prompts.math.user.*\{question\} exactly once"):
        _data(MIX, prompts={"math": {"user": "no placeholder"}})


def test_items_deterministic_and_splits_disjoint():
    data = _data()
    a, b = validation_items(data, 20), validation_items(data, 20)
    assert a == b and [x.messages for x in a] == [x.messages for x in b]
    train = TaskMixture(data).sample(400)
    val_q = {(it.task, it.question) for it in a}
    train_q = {(it.task, it.question) for it in train}
    # small generators can repeat a question by chance, but the streams must not coincide
    assert len(val_q & train_q) < 0.3 * len(val_q)
    assert [it.index for it in a if it.task == "sums"] == list(range(20))


def test_reasoning_gym_items_are_one_stream_across_chunks():
    spec = _data([{"name": "aiw", "family": "logic", "dataset": "aiw"}]).tasks[0]
    task = make_task(spec, 7, _data())
    import reasoning_gym
    whole = reasoning_gym.create_dataset("aiw", size=2 * RG_CHUNK, seed=7)
    for i in (0, 5, RG_CHUNK - 1, RG_CHUNK, RG_CHUNK + 3):
        assert task.item(i).question == whole[i]["question"]


def test_mixture_weights_and_state_round_trip():
    data = _data()
    m = TaskMixture(data)
    items = m.sample(500)
    share = sum(it.task == "gcd" for it in items) / 500
    assert 0.52 < share < 0.68  # weight 3:1:1
    state = json.loads(json.dumps(m.state_dict()))
    after = m.sample(10)
    m2 = TaskMixture(data)
    m2.load_state_dict(state)
    assert m2.sample(10) == after


def test_item_whose_generator_raises_is_skipped_and_recorded(monkeypatch):
    data = _data()
    m = TaskMixture(data)
    task = m.tasks[0]
    real = task.item
    monkeypatch.setattr(task, "item", lambda i: (_ for _ in ()).throw(ValueError("broken")) if i == 1 else real(i))
    items = m.sample(60)
    assert all(not (it.task == task.name and it.index == 1) for it in items)
    assert m.take_rejected() == [{"task": task.name, "item_index": 1, "error": "ValueError: broken"}]
    assert m.take_rejected() == []
    rejected = []
    monkeypatch.setattr("prorl_actors.tasks.make_task", lambda spec, seed, data, split: task)
    assert len(validation_items(data, 3, rejected)) == 3 * 2 and len(rejected) == 3


@pytest.mark.parametrize("task,key,message", [
    ({"family": "math", "dataset": "aiw"}, "dataset", "a generator of family math"),
    ({"family": "logic", "dataset": "no_such_thing"}, "dataset", "a generator of family logic"),
    ({"family": "code", "dataset": "stdio", "config": {"num_tests": 2, "colour": 1}}, "config", "colour"),
    ({"family": "logic", "dataset": "chain_sum", "config": {"min_terms": "two"}}, "config", "settings chain_sum"),
    ({"family": "math", "source": "file", "dataset": None}, "path", "a .jsonl or .parquet file"),
    ({"family": "math", "source": "file", "path": "nope.jsonl"}, "path", "an existing file"),
    ({"family": "math", "source": "file", "dataset": "arithmetic", "path": "x.jsonl"}, "dataset",
     "absent for source file"),
    ({"family": "math", "source": "file", "path": "specs/tiny-cpu.yaml"}, "path", "a .jsonl or .parquet file"),
    ({"family": "stem"}, "dataset", "a generator of family stem: element_symbols, kinematics"),
    ({"family": "math", "dataset": "arithmetic", "holdout_rows": 5}, "holdout_rows", "only for source file"),
])
def test_bad_task_entries_fail_at_load_with_their_key(task, key, message):
    with pytest.raises(SpecError) as e:
        _data([{"name": "t", **task}])
    assert any(p == f"data.tasks[0].{key}" and message in allowed for p, _, allowed in e.value.errors), e.value


def test_held_out_reasoning_gym_tasks_evaluate_but_never_train():
    for name in OOD_EVAL_DATASETS:
        assert name in generator_names("logic")
        with pytest.raises(SpecError, match="held-out evaluation"):
            _data([{"name": name, "family": "logic", "dataset": name}])
    spec = build_spec({"data": {"tasks": MIX},
                       "validation": {"tasks": [{"name": "acre", "family": "logic", "dataset": "acre"}]}})
    items = validation_items(spec.data, 2, extra=spec.validation.tasks)
    assert [it.task for it in items].count("acre") == 2
    with pytest.raises(SpecError, match="a task not trained on"):
        build_spec({"data": {"tasks": MIX}, "validation": {"tasks": [{**MIX[1], "name": "gcd2"}]}})
    with pytest.raises(SpecError, match="unique across"):
        build_spec({"data": {"tasks": MIX}, "validation": {"tasks": [{**MIX[0], "dataset": "fraction_sum"}]}})


@pytest.mark.parametrize("family,name", [(f, g) for f, gens in GENERATORS.items() for g in gens])
def test_builtin_generators_never_fail_on_their_defaults(family, name):
    """A generator that raises loses the item (it is skipped and counted): none may, for 500 seeds."""
    import random
    for i in range(500):
        prompt, answer, ref = GENERATORS[family][name](random.Random(i))
        assert prompt and answer and isinstance(ref, dict)


def test_step_sum_works_each_addition_on_its_scratchpad():
    """The worked solution adds one term a line; max_running and max_first bound what it may meet;
    the demonstration is the solution, then the boxed answer, and the verifier reads only the answer."""
    import random

    from prorl_actors.tasks.builtin import step_sum
    prompt, answer, ref = step_sum(random.Random(5), min_terms=5, max_terms=5)
    terms = [int(x) for x in prompt[len("Compute "):-1].split(" + ")]
    assert len(terms) == 5 and answer == ref["answer"] == str(sum(terms))
    lines = ref["solution"].split(" ")
    assert len(lines) == 4
    running = terms[0]
    for line, t in zip(lines, terms[1:]):          # "12+8=20." : running + term = new running
        assert line == f"{running}+{t}={running + t}."
        running += t
    for i in range(300):
        p, a, r = step_sum(random.Random(i), min_terms=2, max_terms=4, max_running=9)
        assert int(a) <= 9 and 2 <= len(p.split(" + ")) <= 4
        p, a, r = step_sum(random.Random(i), min_terms=2, max_terms=2, max_first=45)
        first, second = map(int, p[len("Compute "):-1].split(" + "))
        assert first <= 45 and second <= 9 and r["solution"] == f"{first}+{second}={a}."
    data = _data([{"name": "s", "family": "math", "dataset": "step_sum", "config": {"max_terms": 4}}])
    s = Scorer(data)
    try:
        it = validation_items(data, 1)[0]
        ref = json.loads(it.reference)
        assert s.completion(it) == f"{ref['solution']} \\boxed{{{it.answer}}}"
        assert s.score("s", f"\\boxed{{{it.answer}}}", it.reference) == 1.0      # the work is not scored
        assert s.score("s", f"{ref['solution']} {it.answer}", it.reference) == 0.0   # nor an unboxed answer
    finally:
        s.close()
    with pytest.raises(SpecError) as e:
        _data([{"name": "s", "family": "math", "dataset": "step_sum", "config": {"min_terms": 1}}])
    assert any(p == "data.tasks[0].config" and "min_terms" in allowed for p, _, allowed in e.value.errors)


def test_compose_applies_named_functions_one_a_line():
    """Each function by hand on 3821; a chain is worked one function a line, each on the last
    line's result, in the prompt's order; the value has distinct digits (no function is the
    identity on it); bad configs fail."""
    import random

    from prorl_actors.tasks.builtin import STRING_FUNCTIONS as F
    from prorl_actors.tasks.builtin import compose
    assert {k: f("3821") for k, f in F.items()} == {"rev": "1283", "rol": "8213", "ror": "1382",
                                                   "swp": "8321", "inc": "4932", "up": "4821"}
    assert F["inc"]("19") == "21" and F["up"]("93") == "13"           # 9 wraps to 1, never 0
    assert F["swp"](F["inc"]("3821")) == F["inc"](F["swp"]("3821")) == "9432"   # inc commutes with a reordering,
    assert F["swp"](F["up"]("3821")) == "8421" != F["up"](F["swp"]("3821"))     # up does not
    prompt, answer, ref = compose(random.Random(3), min_fns=3, max_fns=3, functions=["rol", "inc", "swp"])
    names = prompt[len("Apply "):].split(", to ")[0].split(", then ")
    value = prompt.split(", to ")[1].rstrip(".")
    assert sorted(names) == ["inc", "rol", "swp"] and len(set(value)) == 4 and "0" not in value
    lines = ref["solution"].split(" ")
    for line, name in zip(lines, names, strict=True):                 # "rol(3821)=8213."
        assert line == f"{name}({value})={F[name](value)}."
        value = F[name](value)
    assert answer == ref["answer"] == value
    assert compose(random.Random(1))[0].count(", then ") == 0         # default: one function
    ends = {compose(random.Random(i), 2, 3, last=["swp", "inc"])[2]["solution"].split(" ")[-1][:3]
            for i in range(200)}
    assert ends == {"swp", "inc"}                                      # `last` picks the last function
    pairs = [["rol", "up"], ["up", "swp"]]                             # `chains` names them
    assert {compose(random.Random(i), chains=pairs)[0].split(", to ")[0] for i in range(50)} == {
        "Apply rol, then up", "Apply up, then swp"}
    for bad in ({"functions": ["rev", "mul"]}, {"min_fns": 3, "max_fns": 2}, {"max_fns": 7},
                {"functions": ["rev"], "max_fns": 2}, {"digits": 10}, {"last": []},
                {"functions": ["rev", "rol"], "last": ["inc"]}, {"chains": []}, {"chains": [["rev", "rev"]]},
                {"chains": [["rev", "mul"]]}, {"chains": [[]]}, {"chains": pairs, "max_fns": 2}):
        with pytest.raises(ValueError):
            compose(random.Random(0), **bad)
    with pytest.raises(SpecError) as e:                                # at load time, with its key path
        _data([{"name": "c", "family": "math", "dataset": "compose", "config": {"last": ["mul"]}}])
    assert any(p == "data.tasks[0].config" and "last" in allowed for p, _, allowed in e.value.errors)


def test_warm_start_tasks_are_checked_with_their_key_paths():
    ok = {"name": "add", "family": "math", "dataset": "step_sum", "config": {"min_terms": 2, "max_terms": 2}}
    spec = build_spec({"data": {"tasks": MIX}, "model": {"tiny": {"sft_tasks": [ok]}}})
    assert spec.model.tiny.sft_tasks[0].dataset == "step_sum" and spec.data.tasks[0].name == "sums"
    with pytest.raises(SpecError) as e:
        build_spec({"data": {"tasks": MIX}, "model": {"tiny": {"sft_tasks": [
            ok, {**ok, "dataset": "nope"}, {**ok, "prompt": {"user": "no placeholder"}}]}}})
    paths = {p for p, _, _ in e.value.errors}
    assert {"model.tiny.sft_tasks[1].dataset", "model.tiny.sft_tasks[1].name",
            "model.tiny.sft_tasks[2].prompt.user"} <= paths, e.value.errors
