import subprocess
import sys
from pathlib import Path

import pytest

from prorl_actors.config import build_spec, load_spec
from prorl_actors.spec import RunSpec, SpecError, to_yaml

SPECS = sorted(Path("specs").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_shipped_specs_validate(path):
    spec = load_spec(path)
    assert isinstance(spec, RunSpec)


def test_paper_recipe_values():
    s = load_spec("specs/prorl-1.5b.yaml")
    assert s.group_size == 16 and s.generator.temperature == 1.2
    assert (s.algorithm.eps_low, s.algorithm.eps_high) == (0.2, 0.4)
    assert s.supervisor.kl.coef == 1e-4 and s.learner.lr == 2e-6
    assert s.supervisor.num_prompts_per_step == 256 and s.learner.num_prompts_per_mini_batch == 64
    assert s.generator.max_new_tokens == 8192 and s.supervisor.resets.triggers == ["scheduled"]


def test_every_error_reported_at_once_with_paths():
    with pytest.raises(SpecError) as e:
        build_spec({"learner": {"lr": -1, "betas": "x"}, "generator": {"engine": "foo", "temperature": "hot"},
                    "bogus": 1, "algorithm": {"eps_low": 1.5}, "data": {"tasks": [{"weight": 0}]}})
    paths = {p for p, _, _ in e.value.errors}
    assert paths == {"learner.lr", "learner.betas", "generator.engine", "generator.temperature", "bogus",
                     "algorithm.eps_low", "data.tasks[0].weight"}
    msg = str(e.value)
    assert "generator.engine: got 'foo'; allowed: one of 'vllm', 'hf'" in msg
    assert "learner.lr: got -1; allowed: > 0" in msg


def test_no_silent_coercion():
    # a bool is not an int, a string is not a number, an int where a string goes is refused
    with pytest.raises(SpecError) as e:
        build_spec({"num_steps": True, "seed": "3", "name": 5})
    assert {p for p, _, _ in e.value.errors} == {"num_steps", "seed", "name"}
    # an int is accepted where a float is expected, and becomes a float
    assert build_spec({"learner": {"lr": 1}}).learner.lr == 1.0


def test_cross_field_rules():
    with pytest.raises(SpecError) as e:
        build_spec({"supervisor": {"num_prompts_per_step": 8}, "learner": {"num_prompts_per_mini_batch": 16},
                    "validation": {"num_samples": 4, "ks": [1, 8]}, "data": {"validation_seed": 2}})
    assert {p for p, _, _ in e.value.errors} == {"learner.num_prompts_per_mini_batch", "validation.ks[1]",
                                                 "data.validation_seed"}


def test_entropy_control_and_reset_rules():
    with pytest.raises(SpecError) as e:
        build_spec({"supervisor": {
            "kl": {"mode": "entropy-target", "entropy_target": 0.5, "entropy_target_relative": 0.8,
                   "coef_min": 1.0, "coef_max": 0.5},
            "resets": {"triggers": ["kl", "validation", "kl"]}},
            "validation": {"every_steps": 0},
            "algorithm": {"overlong": {"mode": "soft_punish", "buffer_tokens": 100_000}}})
    errors = {p: why for p, _, why in e.value.errors}
    assert set(errors) == {"supervisor.kl.entropy_target", "supervisor.kl.coef_min", "supervisor.resets.triggers",
                           "algorithm.overlong.buffer_tokens"}
    whys = [why for p, _, why in e.value.errors if p == "supervisor.resets.triggers"]
    assert len(whys) == 3 and any("validation only" in w for w in whys) and any("each trigger once" in w for w in whys)
    with pytest.raises(SpecError, match="supervisor.resets.max_wait_steps"):
        build_spec({"supervisor": {"resets": {"max_wait_steps": -1}}})
    with pytest.raises(SpecError) as e:
        build_spec({"supervisor": {"kl": {"mode": "kl-target", "actuator": "entropy_coef"}}})
    assert {p for p, _, _ in e.value.errors} == {"supervisor.kl.kl_target", "supervisor.kl.actuator"}
    with pytest.raises(SpecError) as e:   # the reference's temperature: beta > 0, a scale within [0.5, 2]
        build_spec({"supervisor": {"kl": {"mode": "entropy-target", "entropy_target_relative": 0.8,
                                          "actuator": "reference_temperature", "coef": 0}}})
    assert {p for p, _, _ in e.value.errors} == {"supervisor.kl.coef", "supervisor.kl.coef_min"}
    ok = build_spec({"supervisor": {"kl": {"mode": "entropy-target", "entropy_target_relative": 0.8, "coef": 1,
                                           "actuator": "reference_temperature", "coef_min": 0.9, "coef_max": 1.5}}})
    assert ok.supervisor.kl.actuator == "reference_temperature"
    ok = build_spec({"supervisor": {"kl": {"mode": "entropy-target", "entropy_target_relative": 0.8,
                                           "actuator": "entropy_coef"}}})
    assert ok.supervisor.resets.wait_for_entropy and ok.supervisor.resets.entropy_margin == 0.5


def test_overrides_and_yaml_round_trip(tmp_path):
    s = load_spec("specs/tiny-cpu.yaml", ["learner.lr=3e-4", "generator.engine=hf", "num_steps=7"])
    assert (s.learner.lr, s.generator.engine, s.num_steps) == (3e-4, "hf", 7)
    p = tmp_path / "s.yaml"
    p.write_text(to_yaml(s))
    assert load_spec(p) == s


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prorl_actors.cli", *args], capture_output=True, text=True,
                          cwd=cwd)


def test_cli_validate_prints_resolved_spec():
    r = _cli("validate", "specs/tiny-cpu.yaml", "num_steps=3")
    assert r.returncode == 0 and "num_steps: 3" in r.stdout


def test_cli_bad_spec_exit_2_and_nothing_started(tmp_path):
    out = tmp_path / "runs"
    for cmd in ("validate", "train"):
        r = _cli(cmd, "specs/tiny-cpu.yaml", f"output_dir={out}", "learner.lr=-1", "supervisor.kl.coeff=1")
        assert r.returncode == 2, r.stderr
        assert "learner.lr: got -1" in r.stderr and "supervisor.kl.coeff" in r.stderr
    assert not out.exists()  # train stopped before creating anything (no run dir, no Ray)


def test_scale_out_specs_describe_their_clusters():
    """prorl-1.5b: four 8-GPU nodes; the 1-node variant: eight GPUs; both DeepSpeed, NCCL broadcast."""
    from prorl_actors.placement import gpus_needed, learner_bundles
    big, one = load_spec("specs/prorl-1.5b.yaml"), load_spec("specs/prorl-1.5b-1node.yaml")
    assert gpus_needed(big) == 32 and gpus_needed(one) == 8
    for s in (big, one):
        assert s.learner.engine == "deepspeed" and s.learner.deepspeed.bf16 and s.weight_sync.method == "broadcast"
        assert learner_bundles(s) == [{"CPU": 8.0, "GPU": 1.0}] * s.learner.num_actors
    # the reference on the learner's GPUs: 4 bundles of one GPU, and the 3 generators' own
    colocated = load_spec("specs/prorl-1.5b-1node.yaml", [
        "learner.num_gpus=0.75", "reference.num_actors=4", "reference.num_gpus=0.25", "placement.colocate=[reference]"])
    assert gpus_needed(colocated) == pytest.approx(7)
    assert learner_bundles(colocated)[0] == {"CPU": 12.0, "GPU": pytest.approx(1.0)}


def test_a_vllm_generator_cannot_share_the_learners_gpu():
    """verl's layout (every role on every GPU) needs vLLM sleep mode between phases, which is not
    implemented: refused at load time with its key path. An HF generator there, or vLLM on GPUs of its
    own in the learner's bundles (one node), is allowed."""
    def layout(learner_gpus: float, gen_gpus: float, ref_gpus: float, engine: str = "vllm") -> dict:
        return {"learner": {"engine": "deepspeed", "num_actors": 2, "num_gpus": learner_gpus},
                "generator": {"engine": engine, "num_actors": 2, "num_gpus": gen_gpus},
                "reference": {"num_actors": 2, "num_gpus": ref_gpus}, "placement": {"colocate": ["generator", "reference"]}}
    with pytest.raises(SpecError) as e:
        build_spec(layout(0.5, 0.25, 0.25))
    assert [p for p, _, a in e.value.errors if "sleep mode" in a] == ["placement.colocate"], e.value.errors
    build_spec(layout(0.5, 0.25, 0.25, engine="hf"))
    build_spec(layout(1, 1, 0))
    build_spec(layout(0.5, 1, 0.5))         # the generator's GPU is whole: Ray never shares it


def test_bundles_hold_the_colocated_actor_of_the_same_index():
    from prorl_actors.placement import learner_bundles
    s = build_spec({"learner": {"engine": "deepspeed", "num_actors": 3, "num_cpus": 1, "num_gpus": 0},
                    "generator": {"num_actors": 2, "num_cpus": 0.5}, "reference": {"num_cpus": 0.25},
                    "placement": {"colocate": ["generator", "reference"]}})
    assert learner_bundles(s) == [{"CPU": 1.75}, {"CPU": 1.5}, {"CPU": 1.0}]


@pytest.mark.parametrize("overrides,path,allowed", [
    ({"learner": {"num_actors": 2}}, "learner.num_actors", "engine deepspeed"),
    ({"learner": {"engine": "deepspeed", "autocast_bf16": True}}, "learner.autocast_bf16", "learner.deepspeed.bf16"),
    ({"learner": {"engine": "deepspeed", "deepspeed": {"zero_stage": 2, "offload_params": True}}},
     "learner.deepspeed.offload_params", "zero_stage 3"),
    ({"learner": {"engine": "deepspeed", "deepspeed": {"zero_stage": 0}}}, "learner.deepspeed.zero_stage", ">= 1"),
    ({"learner": {"engine": "deepspeed", "num_actors": 2, "num_gpus": 0.5}}, "learner.num_gpus",
     "two NCCL ranks cannot share one"),
    ({"learner": {"num_gpus": 2}}, "learner.num_gpus", "at most 1 per rank"),
    ({"weight_sync": {"method": "broadcast"}, "learner": {"num_gpus": 1}, "generator": {"num_gpus": 0.5}},
     "generator.num_gpus", "whole GPUs with weight_sync.method broadcast"),
    ({"learner": {"engine": "deepspeed", "deepspeed": {"zero_stage": 4}}}, "learner.deepspeed.zero_stage", "<= 3"),
    ({"generator": {"vllm": {"tensor_parallel_size": 2}, "num_gpus": 1}}, "generator.vllm.tensor_parallel_size",
     "generator.num_gpus = 2"),
    ({"learner": {"num_gpus": 1.5}}, "learner.num_gpus", "whole number"),
    ({"placement": {"colocate": ["generator"]}, "generator": {"num_actors": 2}}, "generator.num_actors",
     "at most learner.num_actors (1)"),
    ({"placement": {"colocate": ["generator", "generator"]}}, "placement.colocate", "each role once"),
    ({"placement": {"colocate": ["generator"]}, "learner": {"num_gpus": 0.75}, "generator": {"num_gpus": 0.5}},
     "placement.colocate", "sum to at most 1"),
    ({"placement": {"colocate": ["verifier"]}}, "placement.colocate[0]", "'generator', 'reference'"),
    ({"weight_sync": {"method": "broadcast"}, "learner": {"num_gpus": 1}}, "weight_sync.method",
     "only one of learner and generator has GPUs"),
    ({"weight_sync": {"method": "broadcast"}, "learner": {"num_gpus": 0.5}, "generator": {"num_gpus": 0.5},
      "placement": {"colocate": ["generator"]}}, "weight_sync.method", "NCCL cannot broadcast"),
    ({"generator": {"in_flight_updates": True}}, "generator.in_flight_updates", "max_staleness 0"),
])
def test_scale_out_rules(overrides, path, allowed):
    with pytest.raises(SpecError) as e:
        build_spec(overrides)
    hits = [a for p, _, a in e.value.errors if p == path]
    assert hits and allowed in hits[0], e.value.errors
