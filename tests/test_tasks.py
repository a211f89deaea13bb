import json

from prorl_actors.spec import build_spec
from prorl_actors.tasks import Scorer, TaskMixture, validation_items
from prorl_actors.tasks.reasoning_gym import extract_answer


def _data(**kw):
    return build_spec({"data": {"tasks": [
        {"name": "sums", "dataset": "chain_sum", "config": {"min_terms": 2, "max_terms": 2}},
        {"name": "gcd", "dataset": "gcd", "weight": 3.0}], **kw}}).data


def test_extract_answer_takes_last_tag():
    assert extract_answer("x <answer>3</answer> y <answer> 4 </answer>") == "4"
    assert extract_answer("no tag 4") is None
    assert extract_answer("<answer>multi\nline</answer>") == "multi\nline"


def test_scoring():
    data = _data()
    scorer = Scorer(data)
    item = validation_items(data, 1)[0]
    assert scorer.score(item.task, f"<answer>{item.answer}</answer>", item.reference) == 1.0
    assert scorer.score(item.task, f"<answer>{int(item.answer) + 1}</answer>", item.reference) == 0.0
    assert scorer.score(item.task, item.answer, item.reference) == 0.0  # no tag, no credit


def test_items_deterministic_and_splits_disjoint():
    data = _data()
    a, b = validation_items(data, 20), validation_items(data, 20)
    assert a == b
    train = TaskMixture(data).sample(400)
    val_q = {(it.task, it.question) for it in a}
    train_q = {(it.task, it.question) for it in train}
    # small generators can repeat a question by chance, but the streams must not coincide
    assert len(val_q & train_q) < 0.2 * len(val_q)
    assert [it.index for it in a if it.task == "sums"] == list(range(20))


def test_mixture_weights_and_state_round_trip():
    data = _data()
    m = TaskMixture(data)
    items = m.sample(400)
    share = sum(it.task == "gcd" for it in items) / 400
    assert 0.68 < share < 0.82  # weight 3:1
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
    from prorl_actors.tasks import validation_items as vi
    monkeypatch.setattr("prorl_actors.tasks.make_task", lambda spec, seed: task)
    assert len(vi(data, 3, rejected)) == 2 * 2 and len(rejected) == 2
