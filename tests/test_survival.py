"""Runs that survive: real `prorl train` drivers on an embedded Ray, real actor processes killed
by pid in the middle of their work, a driver SIGKILLed and restarted, SIGTERM.

Generation is seeded per call (the HF engine's generator, vLLM's workers), so a run that
loses an actor, rolls back or resumes must end with exactly the weights of the uninterrupted
run (`baseline`): the strongest check that no step was lost, done twice or done with the
wrong state (weights, optimizer, reference, KL coefficient, sampler position, RNG)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from prorl_actors.checkpoint import read_state
from prorl_actors.metrics import read_jsonl

pytestmark = pytest.mark.integration

STEPS = 4


def _args(tiny_model, out: Path, extra=()) -> list[str]:
    from tests.conftest import TEST_OVERRIDES
    return [sys.executable, "-m", "prorl_actors.cli", "train", "specs/tiny-cpu.yaml", *TEST_OVERRIDES,
            f"model.path={tiny_model}", f"output_dir={out}", "name=run", "generator.engine=hf",
            f"num_steps={STEPS}", "supervisor.num_prompts_per_step=8", "learner.num_prompts_per_mini_batch=4",
            "generator.num_samples_per_prompt=4", "generator.max_new_tokens=8",
            "validation.num_prompts_per_task=8", "validation.num_samples=4", "validation.ks=[1,2,4]",
            "validation.every_steps=2", "checkpoint.every_steps=2", "supervisor.resets.every_steps=2",
            # the KL coefficient moves every step: its state has to survive too
            "supervisor.kl.mode=entropy-target", "supervisor.kl.entropy_target_relative=1.5",
            "supervisor.resets.wait_for_entropy=false", "ray.num_cpus=2", *extra]


class Driver:
    """A `prorl train` process; its output goes to a file; every process it starts is remembered
    so that nothing outlives the test (Ray's dashboard and runtime-env agents outlive a
    SIGKILLed driver)."""

    def __init__(self, args, log: Path):
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        env.pop("RAY_ADDRESS", None)
        self.log = log
        self.proc = subprocess.Popen(args, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env)
        self.seen: dict[int, psutil.Process] = {}

    def processes(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        for p in kids:
            self.seen.setdefault(p.pid, p)
        return kids

    def find(self, title: str) -> psutil.Process | None:
        """A child process whose title (Ray names a worker `ray::Class.method` while it runs one)
        starts with `title`."""
        for p in self.processes():
            try:
                if p.cmdline() and p.cmdline()[0].startswith(title):
                    return p
            except psutil.Error:
                continue
        return None

    def catch(self, title: str, timeout: float = 300) -> int:
        """The pid of the actor process at the moment it runs `title` ("ray::Class.method"): the
        actor's process is found once, then its /proc title is read in a tight loop, fast enough
        to catch calls of a few milliseconds."""
        proc = _until(lambda: self.find(title.split(".")[0]), timeout, f"a {title.split('.')[0]} process", self)
        path, want = f"/proc/{proc.pid}/cmdline", title.encode()
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                with open(path, "rb") as f:
                    if f.read(len(want)) == want:
                        return proc.pid
            except FileNotFoundError:   # replaced meanwhile (another test's kill): find the new one
                return self.catch(title, timeout - (time.time() - t0))
            if self.proc.poll() is not None:
                raise AssertionError(f"the driver exited before {title}\n" + self.text()[-4000:])
            time.sleep(0.0002)
        raise AssertionError(f"timed out waiting for {title}\n" + self.text()[-4000:])

    def wait(self, timeout=600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for p in self.seen.values():
            try:
                p.kill()
            except psutil.Error:
                pass

    def text(self) -> str:
        return self.log.read_text()


def _until(cond, timeout: float, what: str, driver: Driver, poll: float = 0.01):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got:
            return got
        if driver.proc.poll() is not None:
            raise AssertionError(f"the driver exited ({driver.proc.returncode}) before {what}\n" + driver.text()[-4000:])
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}\n" + driver.text()[-4000:])


def _steps_done(run: Path) -> int:
    m = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    return max((r["step"] for r in m), default=0)


def _kill_in(driver: Driver, run: Path, title: str, after_step: int) -> int:
    """SIGKILL the process running `title` once `after_step` steps are recorded -> its pid."""
    _until(lambda: _steps_done(run) >= after_step, 300, f"step {after_step}", driver, poll=0.05)
    pid = driver.catch(title)
    os.kill(pid, signal.SIGKILL)
    return pid


def _final(run: Path) -> dict:
    return read_state(run / "checkpoints" / f"step_{STEPS:06d}")


def _check_complete(run: Path, baseline: Path) -> list[dict]:
    """Every step once, the same records and the same final weights as the uninterrupted run."""
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    base = read_jsonl(baseline / "metrics.jsonl")
    for k in ("reward_mean", "kl_coef", "kl", "entropy", "trained_groups", "policy_version"):
        assert [m[k] for m in metrics] == [m[k] for m in base], k
    assert _final(run)["weights_sha256"] == _final(baseline)["weights_sha256"]
    assert _final(run)["data"] == _final(baseline)["data"] and _final(run)["kl"] == _final(baseline)["kl"]
    assert [v["step"] for v in read_jsonl(run / "validation.jsonl")] == [0, 2, 4]
    events = read_jsonl(run / "events.jsonl")
    resets = lambda evs: [e["step"] for e in evs if e["event"] == "reference_reset"]  # noqa: E731
    assert resets(events) == resets(read_jsonl(baseline / "events.jsonl")) and resets(events)
    assert events[-1]["event"] == "run_end"
    return events


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


@pytest.mark.parametrize("title,after_step,role", [
    ("ray::GeneratorActor.generate", 1, "generator"),
    ("ray::VerifierActor.verify", 1, "verifier"),
    ("ray::ReferenceActor.logprobs", 2, "reference"),   # step 3: the reference was reset at step 2
])
def test_stateless_or_rebuildable_actor_killed_mid_step(tiny_model, tmp_path, baseline, title, after_step, role):
    """The step completes with no group lost: the actor is replaced, brought up to date and
    sent its work again; the run ends as if nothing had happened, and says it happened."""
    d = Driver(_args(tiny_model, tmp_path), tmp_path / "log.txt")
    pid = _kill_in(d, tmp_path / "run", title, after_step)
    assert d.wait() == 0, d.text()[-4000:]
    events = _check_complete(tmp_path / "run", baseline)
    died = [e for e in events if e["event"] == "actor_died"]
    restarted = [e for e in events if e["event"] == "actor_restarted"]
    assert [e["role"] for e in died] == [role] and [e["role"] for e in restarted] == [role]
    assert died[0]["step"] > after_step and "ActorDiedError" in died[0]["cause"]
    if role != "reference":   # a dead reference's call is repeated; a stateless role's shard is re-sent
        assert [e["role"] for e in events if e["event"] == "work_redispatched"] == [role]
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert metrics[-1][f"actor_restarts/{role}"] == 1
    assert all(m[f"actor_restarts/{r}"] == 0 for m in metrics for r in
               {"generator", "verifier", "reference", "learner"} - {role})
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_learner_killed_mid_update_rolls_back_to_the_checkpoint(tiny_model, tmp_path, baseline):
    """The learner's optimizer state dies with it: the run goes back to the checkpoint of step 2
    in-process and does step 3 again; the records hold each step once."""
    d = Driver(_args(tiny_model, tmp_path), tmp_path / "log.txt")
    _kill_in(d, tmp_path / "run", "ray::LearnerActor.update", 2)
    assert d.wait() == 0, d.text()[-4000:]
    events = _check_complete(tmp_path / "run", baseline)
    rb = [e for e in events if e["event"] == "rolled_back"]
    assert len(rb) == 1 and rb[0]["step"] == 3 and rb[0]["to_step"] == 2
    assert rb[0]["checkpoint"].endswith("step_000002")
    assert [e["role"] for e in events if e["event"] == "actor_restarted"] == ["learner"]
    m = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert m["actor_restarts/learner"] == 1 and m["rollbacks"] == 1
    assert "rolled back to step 2" in d.text()


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_driver_sigkill_then_resume(tiny_model, tmp_path, baselines, engine):
    """SIGKILL the driver during step 3; the same command continues from the checkpoint of
    step 2 with its step, KL coefficient, sampler position and weights, and ends with the
    weights of the uninterrupted run (vLLM too: its workers are reseeded at every call)."""
    run, extra = tmp_path / "run", (f"generator.engine={engine}",)
    d = Driver(_args(tiny_model, tmp_path, extra), tmp_path / "log1.txt")
    _until(lambda: _steps_done(run) >= 2 and (run / "checkpoints" / "step_000002").exists(), 300,
           "the checkpoint of step 2", d, poll=0.1)
    d.catch("ray::GeneratorActor.generate")        # step 3's generation (step 2 is validated and saved)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.wait()
    saved = read_state(run / "checkpoints" / "step_000002")
    d2 = Driver(_args(tiny_model, tmp_path, extra), tmp_path / "log2.txt")
    assert d2.wait() == 0, d2.text()[-4000:]
    assert "resuming" in d2.text() and "(step 2)" in d2.text()
    events = _check_complete(run, baselines(engine))
    resumed = [e for e in events if e["event"] == "run_resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 2
    assert resumed[0]["policy_version"] == saved["policy_version"]
    assert resumed[0]["kl_coef"] == saved["kl"]["coef"]
    assert resumed[0]["weights_sha256"] == saved["weights_sha256"]
    assert resumed[0]["data"] == saved["data"]["cursors"]
    assert read_jsonl(run / "metrics.jsonl")[-1]["resumes"] == 1


def _validated(run: Path, step: int) -> bool:
    return any(v["step"] == step for v in read_jsonl(run / "validation.jsonl"))


@pytest.mark.parametrize("title,phase,stopped_at", [
    ("ray::GeneratorActor.generate", "step 3's generation", 2),     # the step is dropped, its sampler state too
    ("ray::GeneratorActor.generate", "step 2's validation", 2),     # the validation is done again at resume
    ("ray::LearnerActor.update", "step 3's update", 3),             # an update is let finish, with its step
])
def test_sigterm_checkpoints_then_resume(tiny_model, tmp_path, baseline, title, phase, stopped_at):
    """SIGTERM (what `ray job stop` sends) in the middle of a phase: the driver checkpoints the
    last complete step and exits 0; the same command finishes the run as if nothing happened."""
    run = tmp_path / "run"
    extra = ["checkpoint.every_steps=0"]   # the only checkpoint before the end is the SIGTERM one
    if "validation" in phase:
        extra.append("validation.num_prompts_per_task=64")   # long enough to be caught in the middle
    d = Driver(_args(tiny_model, tmp_path, extra), tmp_path / "log1.txt")
    _until(lambda: _steps_done(run) >= 2 and (_validated(run, 2) or "validation" in phase), 300, "step 2", d, 0.05)
    d.catch(title)
    os.kill(d.proc.pid, signal.SIGTERM)
    assert d.wait(120) == 0, d.text()[-4000:]
    assert f"stopped by SIGTERM after step {stopped_at}" in d.text()
    assert _validated(run, 2) == ("validation" not in phase)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{stopped_at:06d}"]
    pre = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "preempted"]
    assert len(pre) == 1 and pre[0]["signal"] == "SIGTERM" and pre[0]["step"] == stopped_at
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == list(range(1, stopped_at + 1))
    d2 = Driver(_args(tiny_model, tmp_path, extra), tmp_path / "log2.txt")
    assert d2.wait() == 0, d2.text()[-4000:]
    _check_complete(run, baseline)


def test_kill_during_checkpoint_write_leaves_the_previous_one(tiny_model, tmp_path):
    """A process saving checkpoints over and over (a real learner's weights, optimizer and a
    reference), SIGKILLed at random moments: the newest complete checkpoint always loads and
    matches its recorded digest; half-written ones are never listed, and the next save clears them."""
    script = tmp_path / "saver.py"
    script.write_text(f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path.cwd())!r})
from prorl_actors.actors.learner import LearnerActor
from prorl_actors.actors.reference import ReferenceActor
from prorl_actors.checkpoint import save_checkpoint
from prorl_actors.spec import load_spec
spec = load_spec("specs/tiny-cpu.yaml", [])
m = {str(tiny_model)!r}
learner = LearnerActor(m, spec.learner, spec.algorithm, 1.0, 4, 8, 0, 0)
ref = ReferenceActor(m, "float32", spec.reference, 1.0, 0)
root, step = Path(sys.argv[1]), int(sys.argv[2])
print("ready", flush=True)
while True:
    step += 1
    save_checkpoint(root, step, learner.save, ref.save, {{"step": step}}, 2, Path(m))
""")
    from prorl_actors.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
    import random
    root = tmp_path / "checkpoints"
    rng = random.Random(0)
    torn, step = 0, 0
    for _ in range(6):
        p = subprocess.Popen([sys.executable, str(script), str(root), str(step)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.3, 1.5))
        p.kill()
        p.wait()
        torn += any(root.glob(".tmp-*"))
        last = latest_checkpoint(root)
        assert last is not None
        state = verify_checkpoint(last)        # weights, reference and optimizer load; digest matches
        assert state["step"] == int(last.name.split("_")[1])
        assert len(list_checkpoints(root)) <= 3   # keep_last 2, +1 if killed between the rename and the pruning
        step = state["step"]
    assert torn >= 1, "no kill landed inside a save (the test did not test anything)"


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
