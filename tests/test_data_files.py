"""The on-disk task format, its loader, file tasks in a spec, and the converters from the
paper's dataset layouts (fixture files in tests/fixtures/datasets, written in those layouts)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prorl_actors.config import build_spec
from prorl_actors.tasks import Scorer, TaskMixture, validation_items
from prorl_actors.tasks.convert import convert, convert_file
from prorl_actors.tasks.files import DataError, load_rows, write_rows

FIX = Path(__file__).parent / "fixtures" / "datasets"


def _math_rows(n):
    return [{"task": "math", "prompt": f"What is {i} + {i}?", "reference": {"answer": str(2 * i)},
             "metadata": {"i": i}} for i in range(n)]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip(tmp_path, suffix):
    path = write_rows(tmp_path / f"rows{suffix}", _math_rows(5))
    loaded = load_rows(path, "math")
    assert [r.prompt for r in loaded.rows] == [f"What is {i} + {i}?" for i in range(5)]
    assert json.loads(loaded.rows[3].reference) == {"answer": "6"} and loaded.rows[3].metadata == {"i": 3}


BAD_ROWS = [   # (the row's JSONL line, what the error says)
    ('{"task": "math", "prompt": "q", "reference": "{\\"answer\\": \\"1\\"}", "extra": 1}', "unknown keys ['extra']"),
    ('{"task": "poetry", "prompt": "q", "reference": "{}"}', "task 'poetry' is not a family"),
    ('{"task": "code", "prompt": "q", "reference": "{}"}', "in a file loaded for family 'math'"),
    ('{"task": "math", "prompt": "", "reference": "{\\"answer\\": \\"1\\"}"}', "prompt must be a non-empty string"),
    ('{"task": "math", "prompt": "q", "reference": {"answer": "1"}}', "reference must be a JSON string"),
    ('{"task": "math", "prompt": "q", "reference": "{answer: 1}"}', "reference is not JSON"),
    ('{"task": "math", "prompt": "q", "reference": "[1]"}', "reference must be a JSON object"),
    ('{"task": "math", "prompt": "q", "reference": "{\\"solution\\": \\"1\\"}"}', "reference.answer must be"),
    ('{"task": "math", "prompt": "q", "reference": "{\\"answer\\": \\"1\\"}", "metadata": 3}', "metadata must be"),
    ('{"task": "math", "prompt": "q"', "not JSON"),
    ('[1, 2]', "a row must be an object"),
]


@pytest.mark.parametrize("line,message", BAD_ROWS)
def test_a_bad_row_is_an_error_naming_file_and_line(tmp_path, line, message):
    path = write_rows(tmp_path / "rows.jsonl", _math_rows(2))
    with path.open("a") as f:
        f.write(line + "\n")
    with pytest.raises(DataError) as e:
        load_rows(path, "math")
    assert str(e.value).startswith(f"{path}:line 3: ") and message in str(e.value)
    skipped = load_rows(path, "math", bad_rows="skip")
    assert len(skipped.rows) == 2 and len(skipped.skipped) == 1 and skipped.skipped[0].startswith(f"{path}:line 3")


def test_family_references_are_checked_when_loading(tmp_path):
    rows = [{"task": "code", "prompt": "p", "reference": {"tests": [{"kind": "stdio", "stdin": "1"}]}},
            {"task": "ifeval", "prompt": "p", "reference": {"instructions": [{"kind": "shout"}]}},
            {"task": "stem", "prompt": "p", "reference": {"choices": ["a", "b"], "answer": "Z"}},
            {"task": "logic", "prompt": "p", "reference": {"answer": "1", "metadata": {}}}]
    path = write_rows(tmp_path / "mixed.parquet", rows + _math_rows(1))
    out = load_rows(path, None, bad_rows="skip")
    assert len(out.rows) == 1
    assert [s.split(": ", 1)[0] for s in out.skipped] == [f"{path}:row {i}" for i in (1, 2, 3, 4)]
    assert "code reference" in out.skipped[0] and "ifeval reference" in out.skipped[1]


def test_file_task_holdout_rows_validate_and_never_train(tmp_path):
    path = write_rows(tmp_path / "m.jsonl", _math_rows(30))
    task = {"name": "m", "family": "math", "source": "file", "path": str(path), "holdout_rows": 6}
    spec = build_spec({"data": {"tasks": [task]}, "validation": {"num_prompts_per_task": 10}})
    val = validation_items(spec.data, spec.validation.num_prompts_per_task)
    assert len(val) == 6   # capped at the held-out rows
    train = TaskMixture(spec.data).sample(24 * 3)   # three epochs of the 24 training rows
    held = {it.question for it in val}
    assert not held & {it.question for it in train}
    epochs = [[it.question for it in train[k * 24:(k + 1) * 24]] for k in range(3)]
    assert all(len(set(e)) == 24 for e in epochs) and epochs[0] != epochs[1]   # each epoch: every row, reshuffled
    # the same rows are held out whatever the seeds
    spec2 = build_spec({"data": {"tasks": [task], "train_seed": 5, "validation_seed": 7_000_000}})
    assert {it.question for it in validation_items(spec2.data, 10)} == held


def test_file_task_without_holdout_says_validation_overlaps_training(tmp_path):
    path = write_rows(tmp_path / "m.jsonl", _math_rows(8))
    spec = build_spec({"data": {"tasks": [{"name": "m", "family": "math", "source": "file",
                                           "path": str(path)}]}})
    notes = []
    assert len(validation_items(spec.data, 20, notes=notes)) == 8
    assert notes == [{"event": "validation_overlaps_training", "task": "m", "reason": notes[0]["reason"]}]


# ------------------------------------------------------------------------------------ converters
def test_deepscaler_json_array_and_jsonl():
    arr = convert("deepscaler", FIX / "deepscaler.json")
    assert [json.loads(r["reference"])["answer"] for r in arr.rows] == ["\\frac{3}{4}", "\\sqrt{2}", "4"]
    assert [w.split(": ", 1)[0] for w in arr.rejected] == [f"{FIX / 'deepscaler.json'}:item {i}" for i in (4, 5)]
    lines = convert("deepscaler", FIX / "deepscaler.jsonl")
    assert len(lines.rows) == 2 and lines.rejected[0].startswith(f"{FIX / 'deepscaler.jsonl'}:line 3: not JSON")
    with pytest.raises(DataError, match="item 4"):
        convert("deepscaler", FIX / "deepscaler.json", strict=True)


def test_eurus_code_and_math_rows_and_their_tests_run():
    out = convert("eurus", FIX / "eurus_rl.parquet")
    assert [r["task"] for r in out.rows] == ["code", "code", "code", "math"]
    assert len(out.rejected) == 3 and "not JSON" in out.rejected[0] and "equally long" in out.rejected[1]
    assert "'chat' is neither" in out.rejected[2]
    refs = [json.loads(r["reference"]) for r in out.rows]
    assert refs[0]["tests"][1] == {"kind": "stdio", "stdin": "-4 5\n", "stdout": "-20\n"}
    assert refs[1]["tests"][0] == {"kind": "call", "fn": "count_vowels", "args": ["hello"], "expected": 2}
    assert refs[2]["tests"][0] == {"kind": "stdio", "stdin": "3\n", "stdout": "1\n2\n3\n"}
    assert "When tackling" not in out.rows[0]["prompt"]   # Eurus's own system message is not the prompt
    scorer = Scorer(build_spec({"data": {"tasks": [{"name": "c", "family": "code", "dataset": "stdio"},
                                                   {"name": "m", "family": "math", "dataset": "arithmetic"}]}}).data)
    try:
        solutions = ["a, b = map(int, input().split())\nprint(a * b)",
                     "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)",
                     "for i in range(int(input())):\n    print(i + 1)"]
        for row, sol in zip(out.rows, solutions):
            assert scorer.score("c", f"```python\n{sol}\n```", row["reference"]) == 1.0
            assert scorer.score("c", "```python\nprint(0)\n```", row["reference"]) < 1.0
        assert scorer.score("m", "\\boxed{56}", out.rows[3]["reference"]) == 1.0
    finally:
        scorer.close()


def test_scp116k_takes_the_final_answer_of_the_solution():
    out = convert("scp116k", FIX / "scp116k.jsonl")
    assert [json.loads(r["reference"])["answer"] for r in out.rows] == ["19.6", "18", "mitochondrion"]
    assert out.rows[0]["metadata"] == {"source": "scp-116k", "domain": "Physics"}
    assert "line 4: no final answer" in out.rejected[0] and "line 5: problem must be" in out.rejected[1]


def test_nemotron_if_maps_ifeval_ids_and_drops_null_kwargs():
    out = convert("nemotron-if", FIX / "nemotron_if.jsonl")
    refs = [json.loads(r["reference"])["instructions"] for r in out.rows]
    assert refs[0] == [{"kind": "lowercase"}, {"kind": "no_commas"}]
    assert refs[1] == [{"kind": "word_count", "relation": "at least", "num": 12}, {"kind": "title"},
                       {"kind": "end_phrase", "phrase": "Any other questions?"}]
    assert out.rows[1]["prompt"].startswith("Describe a city")   # the user turn, not the system one
    assert len(out.rejected) == 3
    assert "'language:response_language' has no verifier" in out.rejected[0]
    assert "lacks 'frequency'" in out.rejected[1] and "equally long" in out.rejected[2]
    from prorl_actors.tasks import ifeval
    good = "<think>plan</think><<Lisbon>>\nLisbon is a bright city of hills, trams and tiled houses by the river. " \
           "Any other questions?"
    assert ifeval.score(good, refs[1]) == 1.0 and ifeval.score("lisbon.", refs[1]) == 0.0


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_cli_convert_writes_a_loadable_file(tmp_path, suffix):
    dst = tmp_path / f"if{suffix}"
    r = subprocess.run([sys.executable, "-m", "prorl_actors.cli", "convert", "nemotron-if",
                        str(FIX / "nemotron_if.jsonl"), str(dst)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "3 rows" in r.stdout and "3 rejected" in r.stdout
    assert len(load_rows(dst, "ifeval").rows) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    r = subprocess.run([sys.executable, "-m", "prorl_actors.cli", "convert", "deepscaler", str(bad),
                        str(tmp_path / "o.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2 and "no row could be converted" in r.stderr


def test_convert_file_logs_counts(tmp_path):
    lines = []
    convert_file("scp116k", FIX / "scp116k.jsonl", tmp_path / "s.jsonl", log=lines.append)
    assert lines[0].startswith("scp116k: 3 rows") and "2 rejected" in lines[0]


def test_a_file_is_read_once_while_unchanged(tmp_path):
    from prorl_actors.tasks import _load_file
    path = write_rows(tmp_path / "m.jsonl", _math_rows(4))
    first = _load_file(str(path), "math", "error")
    assert _load_file(str(path), "math", "error") is first
    write_rows(path, _math_rows(6))        # changed on disk: read again
    assert len(_load_file(str(path), "math", "error").rows) == 6
