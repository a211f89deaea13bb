"""`prorl eval`: the per-task figures and the boundary report on hand-made samples, then the
command on real engines (a base model against a broken copy of itself, a run directory
against its own base model)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from prorl_actors import batch as rb
from prorl_actors.config import load_spec
from prorl_actors.evaluate import boundary, markdown, prompt_tables, task_results
from prorl_actors.spec import to_yaml
from tests.conftest import brute_pass_at_k, unexpected_warnings


def _scored(rows):
    """rows: (task, item, text, reward) -> a scored rollout table (n consecutive rows per prompt)."""
    n = len(rows)
    t = rb.make_rollouts(prompt_ids=[[1]] * n, response_ids=[[5] * len(r[2].split()) for r in rows],
                        sample_logp=[[0.0] * len(r[2].split()) for r in rows], response_text=[r[2] for r in rows],
                        task=[r[0] for r in rows], item_index=[r[1] for r in rows], reference=["{}"] * n,
                        group_id=[r[1] for r in rows], truncated=[False] * n, policy_version=[0] * n)
    for col, vals in ((rb.REWARD, [r[3] for r in rows]), (rb.FORMATTED, [r[3] > 0 for r in rows]),
                      (rb.VERIFY_ERROR, [False] * n), (rb.VERIFY_TIMEOUT, [False] * n)):
        t = rb.with_column(t, col, vals)
    return t


INFO = {"math": {"family": "math", "held_out": False}, "new": {"family": "ifeval", "held_out": True}}


def test_task_results_and_boundary_by_hand():
    # n = 2 samples; math: prompt 0 solved by both, prompt 1 only by the model, prompt 2 only by the base
    model = _scored([("math", 0, "a b c", 1.0), ("math", 0, "x", 0.0),
                     ("math", 1, "p q r s", 1.0), ("math", 1, "p q r s", 1.0),
                     ("math", 2, "z", 0.0), ("math", 2, "z", 0.5),
                     ("new", 7, "u v w", 0.0), ("new", 7, "u", 0.0)])
    base = _scored([("math", 0, "a b c", 1.0), ("math", 0, "a b", 0.0),
                    ("math", 1, "q r s", 0.0), ("math", 1, "y", 0.0),
                    ("math", 2, "k", 1.0), ("math", 2, "k", 0.0),
                    ("new", 7, "u v w", 0.0), ("new", 7, "u", 0.0)])
    r = task_results(model, 2, [1, 2], INFO)
    m = r["math"]
    assert m["num_prompts"] == 3 and m["correct_per_prompt"] == {"0": 1, "1": 2, "2": 0}
    assert m["pass@1"] == pytest.approx(0.5)                        # 3 of 6 (a reward of 0.5 is not correct)
    assert m["pass@k"] == {"1": pytest.approx(0.5), "2": pytest.approx(2 / 3)}
    assert m["pass@k_se"]["2"] == pytest.approx(np.std([1, 1, 0], ddof=1) / np.sqrt(3))
    assert m["solved_frac"] == pytest.approx(2 / 3) and m["format_frac"] == pytest.approx(4 / 6)
    assert m["response_tokens_mean"] == pytest.approx((3 + 1 + 4 + 4 + 1 + 1) / 6)
    assert r["new"]["held_out"] and r["new"]["pass@k"]["2"] == 0.0

    rep = boundary(model, base, 2, [1, 2], INFO, ngram=2, margin=0.02, z=0.0)
    b = rep["math"]
    assert b["solved_by_model_only"] == [1] and b["solved_by_base_only"] == [2]
    assert b["model"]["pass@k"]["2"] == pytest.approx(2 / 3) and b["base"]["pass@k"]["2"] == pytest.approx(2 / 3)
    # per-prompt differences: pass@1 (0, 1, -0.5), pass@2 (0, 1, -1)
    assert b["delta_pass@1"] == pytest.approx(1 / 6) and b["delta_pass@2"] == pytest.approx(0.0)
    assert b["delta_pass@1_se"] == pytest.approx(np.std([0, 1, -0.5], ddof=1) / np.sqrt(3))
    assert b["delta_pass@2_se"] == pytest.approx(1 / np.sqrt(3))
    assert b["verdict"] == "sharpens"    # z = 0: the margin alone
    assert boundary(model, base, 2, [1, 2], INFO, ngram=2, margin=0.02, z=2.0)["math"]["verdict"] == "unchanged"
    # correct model responses: "a b c" (bigrams ab, bc; the base said "a b c": none novel) and "p q r s"
    # twice (pq, qr, rs each time; the base said "q r s": pq novel) -> 2 novel of 2 + 3 + 3
    assert b["novelty_ngrams"] == 8 and b["novelty"] == pytest.approx(2 / 8)
    assert rep["new"]["novelty"] is None and rep["new"]["verdict"] == "too few prompts"   # one prompt
    md = markdown({"model": "M", "base": "B", "tasks": rep,
                   "settings": {"num_samples": 2, "ks": [1, 2], "temperature": 0.6, "top_p": 0.95,
                                "max_new_tokens": 8, "novelty_ngram": 2, "margin": 0.02, "z": 0.0}})
    assert b["format_frac"] == {"model": pytest.approx(4 / 6), "base": pytest.approx(2 / 6)}
    assert b["format_driven"] is False                               # not an expansion
    assert ("| math | trained (math) | 3 | 0.33 → 0.67 | 0.333 → 0.500 | 0.667 → 0.667 | +0.000 ± 0.577 | 1 | 1 "
            "| 0.25 | sharpens |") in md
    assert "| new | held out (ifeval) | 1 |" in md and "| math | model | 0.500 ± " in md
    assert "Tasks where the model solves prompts the base never does in 2 samples: math (1)." in md
    assert "Tasks where the base solves prompts the model never does in 2 samples: math (1)." in md


def test_an_expansion_on_a_base_out_of_format_is_flagged():
    """The base never answers in the format the verifier reads (rewards 0, not formatted); the
    model does and solves: "expands", flagged as format-driven. The same gain over a base that
    answered in format but wrong is not flagged."""
    info = {"sym": {"family": "stem", "held_out": True}}
    model = _scored([("sym", i, "A", 1.0) for i in range(3) for _ in range(2)])
    unformatted = _scored([("sym", i, "iron", 0.0) for i in range(3) for _ in range(2)])
    rep = boundary(model, unformatted, 2, [1, 2], info, ngram=1, margin=0.02, z=0.0)["sym"]
    assert rep["verdict"] == "expands" and rep["format_frac"] == {"model": 1.0, "base": 0.0}
    assert rep["format_driven"] is True
    md = markdown({"model": "M", "base": "B", "tasks": {"sym": rep},
                   "settings": {"num_samples": 2, "ks": [1, 2], "temperature": 0.6, "top_p": 0.95,
                                "max_new_tokens": 8, "novelty_ngram": 1, "margin": 0.02, "z": 0.0}})
    assert "| 0.00 → 1.00 |" in md and "expands (format-driven: the base was mostly out of format) |" in md
    formatted = rb.with_column(unformatted, rb.FORMATTED, [True] * unformatted.num_rows)   # in format, wrong
    rep = boundary(model, formatted, 2, [1, 2], info, ngram=1, margin=0.02, z=0.0)["sym"]
    assert rep["verdict"] == "expands" and rep["format_driven"] is False


class _Tok:
    """A tokenizer of `per_char` tokens per character of the prompt."""

    def __init__(self, per_char):
        self.per_char = per_char

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return messages[-1]["content"]

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [7] * (len(text) * self.per_char)}


def test_prompts_too_long_for_one_model_are_left_out_for_both():
    from prorl_actors.tasks import Item
    items = [Item("math", "math", i, q, "", "{}", [{"role": "user", "content": q}])
             for i, q in enumerate(["short", "a longer one", "mid size"])]
    rejected = []
    tables = prompt_tables(items, {"model": _Tok(1), "base": _Tok(2)}, 16, rejected)
    # 5, 12, 8 characters: all fit the model (16 tokens); 10, 24, 16 tokens for the base: item 1 does not
    for label, per_char in (("model", 1), ("base", 2)):
        assert tables[label][rb.ITEM_INDEX].to_pylist() == [0, 2]
        assert [len(p) for p in tables[label][rb.PROMPT_IDS].to_pylist()] == [5 * per_char, 8 * per_char]
    assert rejected == [{"task": "math", "item_index": 1, "error": "prompt too long for the base model: 24 tokens > 16"}]


def test_tasks_without_prompts_and_single_prompts_are_reported_not_judged():
    # "new" has no prompt left; "math" has one answered by both (prompt 1 by the model alone is not compared)
    model = _scored([("math", 0, "a", 1.0), ("math", 0, "a", 1.0), ("math", 1, "b", 1.0), ("math", 1, "b", 1.0)])
    base = _scored([("math", 0, "a", 0.0), ("math", 0, "a", 0.0)])
    rep = boundary(model, base, 2, [1, 2], INFO, ngram=1, margin=0.0, z=2.0)
    assert rep["math"]["num_prompts"] == 1 and rep["math"]["solved_by_model_only"] == [0]
    assert rep["math"]["verdict"] == "too few prompts"          # one prompt: no standard error
    assert rep["new"] == {**INFO["new"], "num_prompts": 0, "verdict": "too few prompts"}
    assert task_results(model, 2, [1, 2], INFO)["new"] == {**INFO["new"], "num_prompts": 0}
    md = markdown({"model": "M", "base": "B", "tasks": rep,
                   "settings": {"num_samples": 2, "ks": [1, 2], "temperature": 0.6, "top_p": 0.95,
                                "max_new_tokens": 8, "novelty_ngram": 1, "margin": 0.0, "z": 2.0}})
    assert "| new | held out (ifeval) | 0 | – | – | – | – | – | – | – | too few prompts |" in md
    with pytest.raises(ValueError, match="not the 2 samples of one prompt"):
        boundary(_scored([("math", 0, "a", 1.0), ("math", 1, "b", 1.0)]), base, 2, [1, 2], INFO, 1, 0.0, 2.0)


def test_evaluation_spec():
    spec = load_spec("specs/tiny-cpu.yaml", ["evaluation.num_samples=12"])
    assert spec.evaluation.reported_ks == [1, 2, 4, 8, 12]
    assert load_spec("specs/tiny-cpu.yaml", ["evaluation.ks=[8,4,8]"]).evaluation.reported_ks == [1, 4, 8, 64]


# ------------------------------------------------------------------------------ the command
def _eval(*args, timeout=600):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "prorl_actors.cli", "eval", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _spec_args(tiny_model, tmp_path, engine):
    from tests.conftest import TEST_OVERRIDES
    return ["--spec", "specs/tiny-cpu.yaml", *TEST_OVERRIDES, f"model.path={tiny_model}", f"output_dir={tmp_path}",
            "name=ev", f"generator.engine={engine}", "generator.max_new_tokens=8", "ray.num_cpus=2",
            "validation.tasks=[{name: held, family: math, dataset: arithmetic, "
            "config: {min_terms: 2, max_terms: 2, max_value: 9, ops: '+'}}]"]


@pytest.mark.integration
def test_eval_against_a_broken_base(tiny_model, tmp_path):
    """The tiny model against a copy whose output layer is noise: the report says which prompts only
    the model solves, and every figure is what the written samples give."""
    import torch
    from transformers import AutoModelForCausalLM
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    m = AutoModelForCausalLM.from_pretrained(broken)
    torch.manual_seed(0)
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 1.0)
    m.config.tie_word_embeddings = False
    m.save_pretrained(broken)
    out = tmp_path / "report"
    r = _eval("--model", str(tiny_model), "--base", str(broken), "--n", "6", "--k", "2", "--num-prompts", "8",
              "--out", str(out), *_spec_args(tiny_model, tmp_path, "hf"), "evaluation.z=0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "# Boundary report" in r.stdout and "chain_sum: 8 prompts x 6" in r.stdout   # progress lines
    assert sorted(p.name for p in out.iterdir()) == ["base.json", "boundary.json", "boundary.md", "model.json",
                                                       "passk.png", "samples-base.parquet", "samples-model.parquet"]
    rep = json.loads((out / "boundary.json").read_text())
    assert set(rep["tasks"]) == {"chain_sum", "held"}
    assert rep["tasks"]["held"]["held_out"] and not rep["tasks"]["chain_sum"]["held_out"]
    for label in ("model", "base"):
        res = json.loads((out / f"{label}.json").read_text())
        samples = pq.read_table(out / f"samples-{label}.parquet").to_pylist()
        assert len(samples) == 2 * 8 * 6
        for task, t in res["tasks"].items():
            rows = [s for s in samples if s["task"] == task]
            per_prompt = [[s["reward"] >= 1.0 for s in rows[i:i + 6]] for i in range(0, len(rows), 6)]
            assert t["num_prompts"] == len(per_prompt) == 8
            for k in (1, 2, 6):   # the unbiased estimator, checked by enumeration on the written samples
                assert t["pass@k"][str(k)] == pytest.approx(np.mean([brute_pass_at_k(c, k) for c in per_prompt]), abs=1e-9)
                assert rep["tasks"][task][label]["pass@k"][str(k)] == pytest.approx(t["pass@k"][str(k)])
            assert t["solved_frac"] == pytest.approx(np.mean([any(c) for c in per_prompt]))
    model, base = json.loads((out / "model.json").read_text()), json.loads((out / "base.json").read_text())
    assert sum(t["pass@k"]["6"] for t in base["tasks"].values()) == 0      # noise solves nothing
    solved = {task: sorted(int(i) for i, c in t["correct_per_prompt"].items() if c > 0)
              for task, t in model["tasks"].items()}
    assert any(solved.values()), "the tiny model solved no prompt: the test shows nothing"
    for task, b in rep["tasks"].items():
        assert b["solved_by_model_only"] == solved[task] and b["solved_by_base_only"] == []
        assert b["verdict"] == ("expands" if solved[task] else "unchanged")
    md = (out / "boundary.md").read_text()
    assert md in r.stdout and "| held | held out (math) | 8 |" in md
    assert (out / "passk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_eval_run_directory_against_its_base(tiny_model, tmp_path):
    """`--model RUN_DIR --base`: the newest checkpoint, the run's spec, the spec's base model and the
    default output directory. Here the checkpoint holds the base's weights, so both sample the same
    responses (vLLM, the same seeds): nothing only one solves, no novelty, no change."""
    spec = load_spec("specs/tiny-cpu.yaml", _spec_args(tiny_model, tmp_path, "vllm")[2:])
    run = tmp_path / "ev"
    for step in (1, 3):
        shutil.copytree(tiny_model, run / "checkpoints" / f"step_{step:06d}")
        (run / "checkpoints" / f"step_{step:06d}" / "supervisor_state.json").write_text("{}")
    (run / "spec.yaml").write_text(to_yaml(spec))
    r = _eval("--model", str(run), "--base", "--n", "4", "--num-prompts", "6", "--tasks", "chain_sum")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert not unexpected_warnings(r.stdout + r.stderr)   # vLLM's known noise is filtered (quiet.py)
    out = run / "eval" / "step_000003"
    rep = json.loads((out / "boundary.json").read_text())
    assert rep["model"].endswith("step_000003") and rep["base"] == str(tiny_model)
    assert list(rep["tasks"]) == ["chain_sum"] and rep["settings"]["ks"] == [1, 2, 4]
    b = rep["tasks"]["chain_sum"]
    assert b["model"] == b["base"] and b["verdict"] == "unchanged"
    assert b["solved_by_model_only"] == b["solved_by_base_only"] == []
    assert b["novelty"] in (None, 0.0)
    a = pq.read_table(out / "samples-model.parquet").column("response_text").to_pylist()
    assert a == pq.read_table(out / "samples-base.parquet").column("response_text").to_pylist()


def test_eval_refuses_bad_input(tiny_model, tmp_path):
    r = _eval("--model", str(tiny_model))
    assert r.returncode != 0 and "give the run spec with --spec" in r.stderr
    r = _eval("--model", str(tmp_path))
    assert r.returncode != 0 and "neither a run directory, a checkpoint nor a model directory" in r.stderr
    r = _eval("--model", str(tiny_model), "--spec", "specs/tiny-cpu.yaml", "--n", "8", "--k", "1,16",
              "--tasks", "nope")
    assert r.returncode == 2
    assert "evaluation.ks[1]: got 16; allowed: 1..evaluation.num_samples (8)" in r.stderr
    assert "evaluation.tasks[0]: got 'nope'" in r.stderr
    r = _eval("--model", str(tiny_model), "--spec", "specs/tiny-cpu.yaml", "--base", "evaluation.z=0")
    assert r.returncode != 0 and "write --base= evaluation.z=0" in r.stderr
