"""Runs that survive: real `prorl train` drivers on an embedded Ray, real actor processes killed
by pid in the middle of their work, a driver SIGKILLed and restarted, SIGTERM.

Generation is seeded per call (the HF engine's generator, vLLM's workers), so a run that
loses an actor, rolls back or resumes must end with exactly the weights of the uninterrupted
run (`baseline`): the strongest check that no step was lost, done twice or done with the
wrong state (weights, optimizer, reference, KL coefficient, sampler position, RNG)."""
import signal
from pathlib import Path

import pytest

from prorl_actors.checkpoint import list_checkpoints, read_state
from prorl_actors.metrics import read_jsonl
from tests.conftest import unexpected_warnings
from tests.readback import tensorboard_scalars, wandb_runs

pytestmark = pytest.mark.integration

from tests.drivers import STEPS, Driver, _args, _check_complete, _kill_in, _steps_done, _until


@pytest.fixture(scope="module")
def baselines(tiny_model, tmp_path_factory):
    """engine -> the run directory of an uninterrupted run (made once per module)."""
    made = {}

    def get(engine: str) -> Path:
        if engine not in made:
            out = tmp_path_factory.mktemp(f"baseline-{engine}")
            d = Driver(_args(tiny_model, out, (f"generator.engine={engine}",)), out / "log.txt")
            assert d.wait() == 0, d.text()[-4000:]
            assert [m["step"] for m in read_jsonl(out / "run" / "metrics.jsonl")] == list(range(1, STEPS + 1))
            made[engine] = out / "run"
        return made[engine]
    return get


@pytest.fixture
def baseline(baselines):
    return baselines("hf")


ONE_STEP_OFF = ("supervisor.max_staleness=1", "generator.engine=vllm")


@pytest.fixture(scope="module")
def baseline_one_step_off(tiny_model, tmp_path_factory):
    """An uninterrupted run at supervisor.max_staleness 1 (one-step-off), on vLLM."""
    out = tmp_path_factory.mktemp("baseline-s1")
    d = Driver(_args(tiny_model, out, ONE_STEP_OFF), out / "log.txt")
    assert d.wait() == 0, d.text()[-4000:]
    # a vLLM run's terminal: no library warning, not even the one at every weight update (quiet.py)
    assert not unexpected_warnings(d.text()), unexpected_warnings(d.text())
    return out / "run"


def test_every_role_killed_mid_step(tiny_model, tmp_path, baseline):
    """In one run: the generator killed in step 2's generation, the verifier in step 2's
    verification, the reference in step 3's scoring (it was reset at step 2), then the learner in
    step 3's update. Each stateless or rebuildable actor is replaced, brought up to date and sent
    its work again, inside its step, with no group lost; the learner's optimizer state dies with
    it, so the run goes back to the checkpoint of step 2 in-process and does step 3 again. The
    run ends as if nothing had happened, records each step once, and says what happened."""
    run = tmp_path / "run"
    d = Driver(_args(tiny_model, tmp_path), tmp_path / "log.txt")
    pids = [_kill_in(d, run, "ray::GeneratorActor.generate", 1)]
    pids.append(_kill_in(d, run, "ray::VerifierActor.verify", 1))     # the same step's verification
    pids.append(_kill_in(d, run, "ray::ReferenceActor.logprobs", 2))
    pids.append(_kill_in(d, run, "ray::LearnerActor.update", 2))      # after the reference, in step 3
    assert d.wait() == 0, d.text()[-4000:]
    events = _check_complete(run, baseline)
    died = [e for e in events if e["event"] == "actor_died"]
    restarted = [e for e in events if e["event"] == "actor_restarted"]
    roles = ["generator", "verifier", "reference", "learner"]
    assert [e["role"] for e in died] == roles and [e["role"] for e in restarted] == roles
    assert [e["step"] for e in died] == [2, 2, 3, 3] and all("ActorDiedError" in e["cause"] for e in died)
    assert all(f"pid: {pid}" in e["cause"] for e, pid in zip(died, pids)), died     # which process died
    # a stateless role's shard is sent again; a dead reference's call is repeated
    assert [e["role"] for e in events if e["event"] == "work_redispatched"] == ["generator", "verifier"]
    rb = [e for e in events if e["event"] == "rolled_back"]
    assert len(rb) == 1 and rb[0]["step"] == 3 and rb[0]["to_step"] == 2
    assert rb[0]["checkpoint"].endswith("step_000002") and "rolled back to step 2" in d.text()
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [[m[f"actor_restarts/{r}"] for r in roles] for m in metrics] == [[0, 0, 0, 0], [1, 1, 0, 0],
                                                                             [1, 1, 1, 1], [1, 1, 1, 1]]
    assert [m["rollbacks"] for m in metrics] == [0, 0, 1, 1]


def _validated(run: Path, step: int) -> bool:
    return any(v["step"] == step for v in read_jsonl(run / "validation.jsonl"))


def _preempted(run: Path) -> list[tuple[str, int]]:
    return [(e["signal"], e["step"]) for e in read_jsonl(run / "events.jsonl") if e["event"] == "preempted"]


def test_a_run_stopped_five_ways_ends_as_if_never_stopped(tiny_model, tmp_path, baseline):
    """One run, stopped by every kind of stop in turn, each start the same command:
    1. Ctrl-C in step 2's validation: interrupted at once, a checkpoint of step 2, exit 0;
    2. SIGTERM (what `ray job stop` sends) in step 3's generation: the step is dropped with its
       sampler state, the checkpoint of step 2 again (validation 2 was done again first);
    3. Ctrl-C twice in step 3's update: the first asks for a stop after the update, the second
       stops now: no checkpoint of step 3, no `preempted` record, not a clean exit;
    4. SIGTERM in step 3's update: the update is let finish with its step, then a checkpoint;
    5. SIGKILL in the final validation, after step 4 was recorded: the resume from step 3 moves
       step 4's records to rolled_back.jsonl.
    The sixth start ends the run with the uninterrupted run's records and weights."""
    run, log = tmp_path / "run", lambda i: tmp_path / f"log{i}.txt"
    # the only checkpoints before the end are the stops'; validations long enough to be caught
    extra = ["checkpoint.every_steps=0", "validation.num_prompts_per_task=64", "metrics.trackers=[tensorboard,wandb]"]
    ckpts = lambda: [p.name for p in list_checkpoints(run / "checkpoints")]  # noqa: E731

    saved_validation = lambda: read_state(run / "checkpoints" / "step_000002")["last_validation_step"]  # noqa: E731

    d = Driver(_args(tiny_model, tmp_path, extra), log(1))
    d.catch("ray::GeneratorActor.generate", when=lambda: _steps_done(run) >= 2)       # step 2's validation
    d.kill(d.proc.pid, signal.SIGINT)
    assert d.wait(120) == 0, d.text()[-4000:]
    assert "stopped by SIGINT after step 2" in d.text() and not _validated(run, 2)
    assert ckpts() == ["step_000002"] and _preempted(run) == [("SIGINT", 2)] and saved_validation() == 0

    d = Driver(_args(tiny_model, tmp_path, extra), log(2))
    d.catch("ray::GeneratorActor.generate", when=lambda: _validated(run, 2))         # step 3's generation
    d.kill(d.proc.pid, signal.SIGTERM)
    assert d.wait(120) == 0, d.text()[-4000:]
    assert "stopped by SIGTERM after step 2" in d.text() and _steps_done(run) == 2
    assert ckpts() == ["step_000002"] and _preempted(run) == [("SIGINT", 2), ("SIGTERM", 2)]
    assert saved_validation() == 2           # saved again: the validation done since is not done a third time

    d = Driver(_args(tiny_model, tmp_path, extra), log(3))
    learner = d.catch("ray::LearnerActor.update")                                      # step 3's
    d.kill(learner, signal.SIGSTOP)          # the update lasts until both Ctrl-Cs have landed
    d.kill(d.proc.pid, signal.SIGINT)
    _until(lambda: "SIGINT: stopping at the next safe point" in d.text(), 60, "the first Ctrl-C's answer", d, 0.01)
    d.kill(d.proc.pid, signal.SIGINT)
    assert d.wait(120) != 0 and "KeyboardInterrupt" in d.text() and "stopped by" not in d.text()
    assert ckpts() == ["step_000002"] and len(_preempted(run)) == 2

    d = Driver(_args(tiny_model, tmp_path, extra), log(4))
    d.catch("ray::LearnerActor.update")                                                # step 3's again
    d.kill(d.proc.pid, signal.SIGTERM)
    assert d.wait(120) == 0, d.text()[-4000:]
    assert "stopped by SIGTERM after step 3" in d.text() and _steps_done(run) == 3
    assert ckpts() == ["step_000002", "step_000003"] and _preempted(run)[-1] == ("SIGTERM", 3)

    d = Driver(_args(tiny_model, tmp_path, extra), log(5))
    d.catch("ray::GeneratorActor.generate", when=lambda: _steps_done(run) >= 4)       # the final validation
    d.kill(d.proc.pid, signal.SIGKILL)
    d.wait()
    step4 = [r for r in read_jsonl(run / "metrics.jsonl") if r["step"] == 4]
    saved = read_state(run / "checkpoints" / "step_000003")

    d = Driver(_args(tiny_model, tmp_path, extra), log(6))
    assert d.wait() == 0, d.text()[-4000:]
    assert f"resuming {run} from {run / 'checkpoints' / 'step_000003'} (step 3)" in d.text()
    events = _check_complete(run, baseline)
    resumed = [e for e in events if e["event"] == "run_resumed"]
    assert [e["step"] for e in resumed] == [2, 2, 2, 3, 3]
    assert resumed[-1]["policy_version"] == saved["policy_version"] and resumed[-1]["kl_coef"] == saved["kl"]["coef"]
    assert resumed[-1]["weights_sha256"] == saved["weights_sha256"]
    assert resumed[-1]["data"] == saved["data"]["cursors"]
    assert read_jsonl(run / "metrics.jsonl")[-1]["resumes"] == 5
    # what the killed driver recorded after its checkpoint, each line tagged with the file it left
    moved = [r for r in read_jsonl(run / "rolled_back.jsonl") if r["rolled_back_to"] == 3]
    assert [r for r in moved if r["file"] == "metrics.jsonl"] == [{**step4[0], "file": "metrics.jsonl",
                                                                   "rolled_back_to": 3}]
    assert all(r["step"] == 4 for r in moved) and resumed[-1]["rolled_back_lines"] == len(moved)
    # no validation was ever done twice (step 2's, interrupted in stop 1, was redone once)
    assert not [r for r in read_jsonl(run / "rolled_back.jsonl") if r["file"] == "validation.jsonl"]
    _check_trackers(run, drivers=6)


def _check_trackers(run: Path, drivers: int) -> None:
    """What the trackers wrote across every driver of the run, read back: TensorBoard shows each
    step once, with the records' figures; W&B has one run continued by each driver, whose last
    point at each step is the record that stands."""
    metrics, validations = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "validation.jsonl")
    tb = tensorboard_scalars(run / "tensorboard")
    for k in ("reward_mean", "entropy", "kl_coef", "step_s"):
        assert tb[k] == [(m["step"], pytest.approx(m[k], rel=1e-6)) for m in metrics], k
    assert tb["validation/accuracy"] == [(v["step"], pytest.approx(v["accuracy"], rel=1e-6)) for v in validations]
    resumes = [e["step"] for e in read_jsonl(run / "events.jsonl") if e["event"] == "run_resumed"]
    assert tb["events/run_resumed"] == [(s, float(i + 1)) for i, s in enumerate(resumes)]
    runs = wandb_runs(run / "wandb")   # a SIGKILLed driver's W&B service may not have written its first record
    assert len(runs) == drivers and len({r["id"] for r in runs if r["id"]}) == 1
    last = {}
    for row in (row for r in runs for row in r["history"] if "reward_mean" in row):
        last[row["step"]] = row
    assert [(s, row["reward_mean"], row["entropy"]) for s, row in sorted(last.items())] == \
        [(m["step"], pytest.approx(m["reward_mean"]), pytest.approx(m["entropy"])) for m in metrics]


def test_a_finished_run_says_so_and_raising_num_steps_prolongs_it(tiny_model, tmp_path, baseline):
    """The same command on a complete run does nothing and says so; with more steps it goes on
    from the final checkpoint, and the changed key is recorded."""
    import shutil
    shutil.copytree(baseline, tmp_path / "run")
    d = Driver(_args(tiny_model, tmp_path), tmp_path / "log1.txt")
    assert d.wait() == 0 and "the run is complete at step 4" in d.text()
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == STEPS
    d2 = Driver(_args(tiny_model, tmp_path, ("num_steps=6",)), tmp_path / "log2.txt")
    assert d2.wait() == 0, d2.text()[-4000:]
    assert "spec changed since the last start: num_steps: 4 -> 6" in d2.text()
    run = tmp_path / "run"
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == list(range(1, 7))
    assert [v["step"] for v in read_jsonl(run / "validation.jsonl")] == [0, 2, 4, 6]
    events = read_jsonl(run / "events.jsonl")
    changed = [e["changes"] for e in events if e["event"] == "spec_changed"]
    assert len(changed) == 1 and changed[0]["num_steps"] == [4, 6]     # (output_dir too: the copy moved)
    assert [e["step"] for e in events if e["event"] == "run_resumed"] == [4]
    assert read_state(run / "checkpoints" / "step_000006")["complete"]

    # resume: PATH starts from that checkpoint, not the newest: steps 5 and 6 again, to the same weights
    sha6 = read_state(run / "checkpoints" / "step_000006")["weights_sha256"]
    step4 = run / "checkpoints" / "step_000004"
    d3 = Driver(_args(tiny_model, tmp_path, ("num_steps=6", f"resume={step4}")), tmp_path / "log3.txt")
    assert d3.wait() == 0, d3.text()[-4000:]
    assert f"resuming {run} from {step4} (step 4)" in d3.text()
    assert read_state(run / "checkpoints" / "step_000006")["weights_sha256"] == sha6
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == list(range(1, 7))
    assert [r["step"] for r in read_jsonl(run / "rolled_back.jsonl") if r["file"] == "metrics.jsonl"] == [5, 6]

    # a file of the newest checkpoint damaged after its commit: the checkpoint is moved aside, the
    # next older one resumed, and the run ends where it would have (steps 5 and 6 once more)
    weights = run / "checkpoints" / "step_000006" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    d6 = Driver(_args(tiny_model, tmp_path, ("num_steps=6",)), tmp_path / "log6.txt")
    assert d6.wait() == 0, d6.text()[-4000:]
    aside = run / "checkpoints" / "damaged-step_000006"
    assert f"checkpoint {weights.parent} is damaged ({weights}: its sha256 is not the manifest's): moved to " \
           f"{aside}" in d6.text() and f"resuming {run} from {step4} (step 4)" in d6.text()
    (bad,) = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "checkpoint_damaged"]
    assert bad["checkpoint"] == str(weights.parent) and str(weights) in bad["problem"] and aside.is_dir()
    assert read_state(run / "checkpoints" / "step_000006")["weights_sha256"] == sha6

    # a resume with another learner layout is refused, both layouts named
    d4 = Driver(_args(tiny_model, tmp_path, ("num_steps=8", "learner.engine=deepspeed")), tmp_path / "log4.txt")
    assert d4.wait() != 0
    assert "saved by learner engine torch with 1 rank(s) (None); this run has ('deepspeed', 1, {" in d4.text()
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == list(range(1, 7))      # nothing done

    # resume: never moves the run aside and starts afresh
    d5 = Driver(_args(tiny_model, tmp_path, ("num_steps=1", "resume=never")), tmp_path / "log5.txt")
    assert d5.wait() == 0, d5.text()[-4000:]
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert f"{run} held an earlier run (resume: never): moved it to {old}" in d5.text()
    assert [m["step"] for m in read_jsonl(old / "metrics.jsonl")] == list(range(1, 7))
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [1]
    assert [e["event"] for e in read_jsonl(run / "events.jsonl")][0] == "run_start"


@pytest.mark.parametrize("role,title,limit", [
    ("verifier", "ray::VerifierActor.verify", "fault_tolerance.max_actor_restarts=0"),
    ("learner", "ray::LearnerActor.update", "fault_tolerance.max_rollbacks=0"),
])
def test_a_death_over_the_limit_fails_the_run_with_its_cause(tiny_model, tmp_path, role, title, limit):
    """More deaths than fault_tolerance allows (a restart storm is a bug to look at): the run
    fails, naming the limit and the death that crossed it."""
    d = Driver(_args(tiny_model, tmp_path, (limit,)), tmp_path / "log.txt")
    pid = _kill_in(d, tmp_path / "run", title, 0)
    assert d.wait() != 0
    text = d.text()
    assert f"({limit.split('=')[0]})" in text and f"pid: {pid}" in text, text[-4000:]
    died = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "actor_died"]
    assert [e["role"] for e in died] == [role] and _steps_done(tmp_path / "run") == 0


def _kill_every_role_then_the_driver(d: Driver, run: Path, generator_call: str) -> list[int]:
    """A generator in `generator_call` and a verifier after step 1, the reference and the learner
    in step 3, then the driver itself (SIGKILL) in step 4's update -> the actors' pids."""
    pids = [_kill_in(d, run, generator_call, 1)]
    pids.append(_kill_in(d, run, "ray::VerifierActor.verify", 1))
    pids.append(_kill_in(d, run, "ray::ReferenceActor.logprobs", 2))
    pids.append(_kill_in(d, run, "ray::LearnerActor.update", 2))
    d.catch("ray::LearnerActor.update", when=lambda: _steps_done(run) >= 3)            # step 4's update
    d.kill(d.proc.pid, signal.SIGKILL)
    d.wait()
    return pids


def test_one_step_off_survives_every_role_and_a_driver_kill(tiny_model, tmp_path, baseline_one_step_off):
    """At max_staleness 1 the next batch is sampled while the learner trains, with weights one
    version old (vLLM). In one run: a vLLM generator killed in a generation made ahead (fill 3, sampled with
    version 1 while step 2 trains), a verifier in a verification made ahead, the reference in step
    3's scoring, the learner in step 3's update (rolled back to the checkpoint of step 2, which
    holds batch 3, made and not yet trained on), then the driver SIGKILLed in step 4's update
    (resumed from step 2 again). The run ends with the weights, records and sampler of the
    uninterrupted one-step-off run: no group lost, none trained twice, the schedule unbroken."""
    run = tmp_path / "run"
    args = lambda: _args(tiny_model, tmp_path, ONE_STEP_OFF)  # noqa: E731
    pids = _kill_every_role_then_the_driver(Driver(args(), tmp_path / "log1.txt"), run, "ray::GeneratorActor.generate")
    assert (run / "checkpoints" / "step_000002" / "rollouts" / "kept_000003.arrow").is_file()
    saved = read_state(run / "checkpoints" / "step_000002")
    assert [f["step"] for f in saved["ready"]] == [3] and saved["ready"][0]["version"] == 1
    assert saved["next_fill_step"] == 4           # batch 4 (version 2) is made again after a resume
    d = Driver(args(), tmp_path / "log2.txt")
    assert d.wait() == 0, d.text()[-4000:]
    events = _check_complete(run, baseline_one_step_off)
    died = [e for e in events if e["event"] == "actor_died"]
    assert [e["role"] for e in died] == ["generator", "verifier", "reference", "learner"], died
    assert all(f"pid: {pid}" in e["cause"] for e, pid in zip(died, pids)), died
    rb = [e for e in events if e["event"] == "rolled_back"]
    assert len(rb) == 1 and rb[0]["to_step"] == 2
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["staleness_max"] for m in metrics] == [0, 1, 1, 1]    # batches 1 and 2 both sampled with version 0
    assert [m["staleness_max"] for m in metrics] == [m["staleness_max"] for m in read_jsonl(
        baseline_one_step_off / "metrics.jsonl")]


def test_two_ahead_with_in_flight_updates_survives_every_role_and_a_driver_kill(tiny_model, tmp_path):
    """vLLM, batches made two steps ahead (max_staleness 2), responses decoded in pieces of 2
    tokens with the learner's newest weights taken between them (in-flight updates). In one run:
    a generator killed in a piece of an in-flight continuation, a verifier, the reference in step
    3's scoring, the learner in step 3's update (rolled back to step 2's checkpoint, which holds
    the batches made ahead), then the driver SIGKILLed in step 4's update and the run resumed.
    Which version a token came from depends on timing here, so the run is not compared bit for
    bit: it ends complete, each step recorded once, every trained row within the bound and no
    token newer than the learner."""
    run = tmp_path / "run"
    args = lambda: _args(tiny_model, tmp_path, ("generator.engine=vllm", "supervisor.max_staleness=2",  # noqa: E731
                                                "generator.in_flight_updates=true",
                                                "generator.in_flight_piece_tokens=2",
                                                "algorithm.off_policy_correction.mode=icepop"))
    pids = _kill_every_role_then_the_driver(Driver(args(), tmp_path / "log1.txt"), run, "ray::GeneratorActor.extend")
    saved = read_state(run / "checkpoints" / "step_000002")
    assert [f["step"] for f in saved["ready"]][:1] == [3]        # made ahead, saved with the checkpoint
    assert (run / "checkpoints" / "step_000002" / "rollouts" / "made_000003.arrow").is_file()
    d = Driver(args(), tmp_path / "log2.txt")
    assert d.wait() == 0, d.text()[-4000:]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [v["step"] for v in read_jsonl(run / "validation.jsonl")] == [0, 2, 4]
    events = read_jsonl(run / "events.jsonl")
    assert events[-1]["event"] == "run_end"
    died = [e for e in events if e["event"] == "actor_died"]
    assert [e["role"] for e in died] == ["generator", "verifier", "reference", "learner"], died
    assert all(f"pid: {pid}" in e["cause"] for e, pid in zip(died, pids)), died
    redone = [e["method"] for e in events if e["event"] == "work_redispatched"]
    assert "extend" in redone and "verify" in redone              # the lost pieces went to the replacements
    assert [e["to_step"] for e in events if e["event"] == "rolled_back"] == [2]
    assert [e["event"] for e in events].count("run_resumed") == 1
    trained = [m for m in metrics if m["optimizer_steps"]]
    assert trained and all(m["version_span_max"] <= m["staleness_max"] <= 2 for m in trained)
    # the batches made while step 1 trains decode in pieces of 2 tokens: its weights reach them in flight
    assert sum(m["in_flight_pushes"] for m in metrics) >= 1, [m["in_flight_pushes"] for m in metrics]
    assert max(m["version_span_max"] for m in trained) >= 1
    assert all(m["overlong_penalty"] is None for m in metrics)     # not measured: no penalty asked for
    for m in trained:   # the correction's figures, in range
        assert 0 <= m["is_masked_frac"] <= 1 and m["logp_mismatch_k3"] >= 0 and m["logp_gap_max"] >= 0
