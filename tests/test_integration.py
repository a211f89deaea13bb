"""The real loop, end to end: `prorl train` on an embedded local Ray, real engines, real tiny model."""
import json
import math
import os
import subprocess
import sys

import pytest

from prorl_actors.metrics import STEP_KEYS, read_jsonl

pytestmark = pytest.mark.integration


def _train(tiny_model, tmp_path, engine, extra=()):
    from tests.conftest import TEST_OVERRIDES
    args = [sys.executable, "-m", "prorl_actors.cli", "train", "specs/tiny-cpu.yaml", *TEST_OVERRIDES,
            f"model.path={tiny_model}", f"output_dir={tmp_path}", "name=it", f"generator.engine={engine}",
            "num_steps=3", "supervisor.num_prompts_per_step=8", "learner.num_prompts_per_mini_batch=4",
            "generator.num_samples_per_prompt=4", "generator.max_new_tokens=8",
            "validation.num_prompts_per_task=8", "validation.num_samples=4", "validation.ks=[1,2,4]",
            "validation.every_steps=2", "supervisor.resets.every_steps=1", "checkpoint.every_steps=2",
            "ray.num_cpus=2", *extra]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r, tmp_path / "it"


# the HF run also holds beta by kl-target (far below the KL, so that beta moves every step) and
# shapes the rewards with DAPO's soft overlong penalty over the whole response (buffer = 8 tokens)
KL_TARGET_SOFT_PUNISH = ("supervisor.kl.mode=kl-target", "supervisor.kl.kl_target=1e-9", "supervisor.kl.horizon=5",
                         "supervisor.kl.coef=1e-3", "algorithm.overlong.mode=soft_punish",
                         "algorithm.overlong.buffer_tokens=8")


def test_train_few_steps(tiny_model, tmp_path):
    """The HF engine, the synchronous loop (vLLM, batches made two steps ahead and in-flight
    updates: test_survival's two-ahead run)."""
    r, run = _train(tiny_model, tmp_path, "hf", KL_TARGET_SOFT_PUNISH)
    assert "validation accuracy (held-out)" in r.stdout  # the start-vs-end table
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        missing = [k for k in STEP_KEYS if k not in m]
        assert not missing, missing
        assert "reward/chain_sum" in m and 1 <= m["gen_rounds"] <= 4
        assert all(m[f"time/{p}_s"] >= 0 for p in ("generate", "verify", "reference", "learn", "sync"))
    trained = [m for m in metrics if m["trained_groups"] > 0]
    assert trained, "no step trained (no informative group in 3 steps)"
    assert all(m["entropy"] > 0 and m["kl"] >= 0 for m in trained)
    assert all(m["optimizer_steps"] == -(-m["trained_groups"] // 4) for m in trained)  # mini-batches of 4
    for m in trained:   # the correction's figures, in range
        assert 0 <= m["is_masked_frac"] <= 1 and m["logp_mismatch_k3"] >= 0 and m["logp_gap_max"] >= 0
        assert 0 <= m["generator_idle_frac"] <= 1 and 0 <= m["learner_idle_frac"] <= 1
    assert all(m["sampler_logp_gap"] < 0.05 for m in trained)  # the sampler runs the learner's weights
    assert all(m["staleness_max"] == 0 and m["is_weight_mean"] == 1.0 for m in trained)
    val = read_jsonl(run / "validation.jsonl")
    assert [v["step"] for v in val] == [0, 2, 3]
    assert all(0 <= v["pass@1/chain_sum"] <= v["pass@4/chain_sum"] <= 1 for v in val)
    events = read_jsonl(run / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    # resets every step: one after each step that trained, each recorded with its reason
    resets = [e for e in events if e["event"] == "reference_reset"]
    assert [e["step"] for e in resets] == [m["step"] for m in trained]
    assert all(e["reason"] == "scheduled" and e["optimizer_reset"] for e in resets)
    assert metrics[-1]["reference_resets"] == len(resets)
    # checkpoints: HF format, loadable by transformers; the last 2 kept
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000003"]
    last = run / "checkpoints" / "step_000003"
    state = json.loads((last / "supervisor_state.json").read_text())
    assert state["step"] == 3 and state["policy_version"] == len(trained)
    made_ahead = json.loads((run / "checkpoints" / "step_000002" / "supervisor_state.json").read_text())["ready"]
    assert made_ahead == []
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(last)
    assert (run / "spec.yaml").exists() and (run / "curves.png").stat().st_size > 10_000
    _check_kl_target_and_soft_punish(metrics)


def _check_kl_target_and_soft_punish(metrics):
    """kl-target: beta follows Ziegler et al.'s rule from each trained step's KL, coef x (1 +
    clip(kl / target - 1, +-0.2) / horizon); soft_punish: with the ramp over the whole response,
    every trained response of length L > 0 adds -L/8 to its reward (the step's mean is recorded)."""
    coef = 1e-3
    for m in metrics:
        assert m["kl_coef"] == pytest.approx(coef, rel=1e-12)
        if m["trained_groups"]:
            coef *= 1 + min(max(m["kl"] / 1e-9 - 1, -0.2), 0.2) / 5
            assert -1 <= m["overlong_penalty"] < 0
        assert m["kl_coef_next"] == pytest.approx(coef, rel=1e-12)
    assert any(m["kl_coef_next"] > m["kl_coef"] for m in metrics)   # KL above its target: beta rose


def test_five_families_files_and_held_out_tasks_through_ray(tiny_model, tmp_path):
    """Every family in one run, a converted file among the sources, two verifier actors (the
    code sandbox inside a Ray worker) and an evaluation-only held-out task."""
    from prorl_actors.tasks.convert import convert_file
    from tests.test_data_files import FIX
    code_file = tmp_path / "eurus.jsonl"
    convert_file("eurus", FIX / "eurus_rl.parquet", code_file, log=lambda *_: None)
    tasks = ("[{name: sums, family: math, dataset: arithmetic}, {name: elements, family: stem, dataset: element_symbols},"
             " {name: aiw, family: logic, dataset: aiw}, {name: writing, family: ifeval, dataset: short_writing},"
             " {name: fn, family: code, dataset: function},"
             f" {{name: eurus, family: code, source: file, path: '{code_file}', bad_rows: skip}}]")
    # the converted file holds code and math rows: the math row is skipped (and counted) in a code task
    r, run = _train(tiny_model, tmp_path, "hf", extra=(
        f"data.tasks={tasks}", "validation.tasks=[{name: acre, family: logic, dataset: acre}]",
        "validation.num_prompts_per_task=4", "generator.max_model_len=2048", "verifier.num_actors=2"))
    metrics = read_jsonl(run / "metrics.jsonl")
    for m in metrics:
        assert m["verify_errors"] == 0 and m["verify_timeouts"] == 0
    seen = {k.split("/", 1)[1] for m in metrics for k in m if k.startswith("reward/")}
    assert seen <= {"sums", "elements", "aiw", "writing", "fn", "eurus"} and len(seen) >= 4
    val = read_jsonl(run / "validation.jsonl")
    for task in ("sums", "elements", "aiw", "writing", "fn", "eurus", "acre"):
        assert all(f"accuracy/{task}" in v and f"format_frac/{task}" in v for v in val), task
    events = read_jsonl(run / "events.jsonl")
    skipped = [e for e in events if e["event"] == "rows_skipped"]
    assert skipped and skipped[0]["task"] == "eurus" and skipped[0]["count"] == 1
    assert "in a file loaded for family 'code'" in skipped[0]["first"][0]
    assert any(e["event"] == "validation_overlaps_training" and e["task"] == "eurus" for e in events)


def test_entropy_controller_and_kl_triggered_reset(tiny_model, tmp_path):
    """The controller raises beta while entropy is below its band; a KL trigger resets the
    reference with its reason; the controller's state is in the checkpoint."""
    r, run = _train(tiny_model, tmp_path, "hf", extra=(
        "supervisor.kl.mode=entropy-target", "supervisor.kl.entropy_target_relative=3.0",
        "supervisor.kl.coef=1e-3", "supervisor.resets.triggers=[kl]", "supervisor.resets.kl_ceiling=1e-12",
        "supervisor.resets.kl_steps=1", "supervisor.resets.restore_kl_coef=true", "num_steps=4",
        "supervisor.resets.wait_for_entropy=false"))
    metrics = read_jsonl(run / "metrics.jsonl")
    trained = [m for m in metrics if m["trained_groups"] > 0]
    assert len(trained) >= 2
    first = trained[0]
    assert first["entropy_target"] == pytest.approx(3.0 * first["entropy"])
    assert first["kl_coef"] == 1e-3 and first["kl_coef_next"] > 1e-3      # entropy below the band: beta up
    resets = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "reference_reset"]
    assert resets and all(e["reason"] == "KL above 1e-12 for 1 steps" for e in resets)
    assert all(e["kl_coef"] == 1e-3 for e in resets)                     # restored at each reset
    state = json.loads((run / "checkpoints" / "step_000004" / "supervisor_state.json").read_text())
    assert state["kl"]["target"] == pytest.approx(first["entropy_target"])
    assert [tuple(e) for e in state["resets"]["events"]] == [(e["step"], e["reason"]) for e in resets]


@pytest.mark.parametrize("relative,side", [(3.0, "below"), (0.3, "above")])
def test_a_due_reset_waits_while_entropy_is_outside_the_window(tiny_model, tmp_path, relative, side):
    """With the target far above (below) the entropy, a due reset waits (an event), then is skipped."""
    r, run = _train(tiny_model, tmp_path, "hf", extra=(
        "supervisor.kl.mode=entropy-target", f"supervisor.kl.entropy_target_relative={relative}",
        "supervisor.resets.triggers=[scheduled]", "supervisor.resets.every_steps=1",
        "supervisor.resets.entropy_margin_high=0", "supervisor.resets.max_wait_steps=1", "num_steps=3"))
    events = [e for e in read_jsonl(run / "events.jsonl") if e["event"].startswith("reference_reset")]
    assert [e["event"] for e in events] == ["reference_reset_waits", "reference_reset_skipped",
                                            "reference_reset_waits"], events
    assert all(e["entropy_target"] > 0 and e["reason"].startswith("scheduled; entropy") for e in events)
    assert side in events[0]["reason"]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["reference_resets_skipped"] for m in metrics] == [0, 1, 1]
    assert [m["reference_reset_waiting"] for m in metrics] == [1, 0, 1] and metrics[-1]["reference_resets"] == 0


def test_the_controller_can_move_the_entropy_bonus_instead_of_beta(tiny_model, tmp_path):
    """kl.actuator=entropy_coef: beta stays at kl.coef, the bonus rises while entropy is below
    the target, and resets do not wait for entropy (only a penalty anchors it to the reference).
    A flattened reference (temperature_scale > 1) differs from the policy even at step 1."""
    r, run = _train(tiny_model, tmp_path, "hf", extra=(
        "supervisor.kl.mode=entropy-target", "supervisor.kl.entropy_target_relative=3.0",
        "supervisor.kl.actuator=entropy_coef", "supervisor.kl.coef=1e-3", "supervisor.kl.coef_min=1e-4",
        "algorithm.entropy_coef=1e-3", "supervisor.resets.triggers=[scheduled]",
        "supervisor.resets.every_steps=2", "num_steps=3", "reference.temperature_scale=1.5"))
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["kl_coef"] for m in metrics] == [1e-3] * 3
    assert metrics[0]["kl"] > 1e-3          # with the plain snapshot it is 0 at step 1 (policy == reference)
    bonus = [m["entropy_coef"] for m in metrics]
    assert bonus[0] == 1e-3 and bonus[0] < bonus[1] < bonus[2]
    kinds = [e["event"] for e in read_jsonl(run / "events.jsonl") if e["event"].startswith("reference_reset")]
    assert kinds == ["reference_reset"]


def test_the_controller_can_move_the_reference_temperature(tiny_model, tmp_path):
    """kl.actuator=reference_temperature: beta stays at kl.coef while the reference's temperature
    scale rises (entropy below the target); the scale used is recorded per step; KL is 0 at step 1
    only while the scale is 1; resets do not wait for entropy, and at a reset the scale is chosen
    again so that the new reference's entropy on the step's responses is the old one's. Two tasks
    of weights 1 and 3: the signal held is their entropies weighted 1:3, not the batch's mean."""
    tasks = ("[{name: two, dataset: chain_sum, weight: 1.0, config: {min_terms: 2, max_terms: 2, min_digits: 1, "
             "max_digits: 1}}, {name: three, dataset: chain_sum, weight: 3.0, config: {min_terms: 3, max_terms: 3, "
             "min_digits: 1, max_digits: 1}}]")
    r, run = _train(tiny_model, tmp_path, "hf", extra=(
        "supervisor.kl.mode=entropy-target", "supervisor.kl.entropy_target_relative=3.0",
        "supervisor.kl.actuator=reference_temperature", "supervisor.kl.coef=0.5", "supervisor.kl.coef_min=0.8",
        "supervisor.kl.coef_max=1.5", "supervisor.kl.rate=0.05", "supervisor.kl.kp=0",
        "supervisor.resets.triggers=[scheduled]", "supervisor.resets.every_steps=2", "num_steps=3",
        "supervisor.kl.entropy_signal=task_mean", f"data.tasks={tasks}"))
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["kl_coef"] for m in metrics] == [0.5] * 3
    both = 0
    for m in metrics:
        h = {t: m.get(f"entropy/{t}") for t in ("two", "three")}
        w = {t: {"two": 1.0, "three": 3.0}[t] for t in h if h[t] is not None}          # the tasks trained
        assert w and m["entropy_signal"] == pytest.approx(sum(w[t] * h[t] for t in w) / sum(w.values()), rel=1e-9)
        both += len(w) == 2
    assert both, "no step trained both tasks: the weighting was not exercised"
    assert metrics[0]["entropy_target"] == pytest.approx(3.0 * metrics[0]["entropy_signal"])
    scale = [m["ref_temperature_scale"] for m in metrics]
    assert scale[0] == 1.0 and scale[1] == pytest.approx(math.exp(0.1))     # rate 0.05 x error 2 (clipped)
    assert abs(metrics[0]["kl"]) < 1e-6 and metrics[1]["kl"] > 1e-3
    resets = [e for e in read_jsonl(run / "events.jsonl") if e["event"].startswith("reference_reset")]
    assert [e["event"] for e in resets] == ["reference_reset"]
    e = resets[0]
    assert e["ref_temperature_scale_before"] == pytest.approx(math.exp(0.2))
    assert e["ref_entropy"] == pytest.approx(e["ref_entropy_before"], rel=1e-3)
    assert scale[2] == pytest.approx(e["ref_temperature_scale"]) and 0.8 < scale[2] < 1.5
