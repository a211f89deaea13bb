"""`prorl train` as a real process for the survival tests: started, watched (its output, the
steps its records hold), its actors' processes found by their Ray titles and killed, SIGTERMed,
and its run directory checked against the uninterrupted run's."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from prorl_actors.checkpoint import read_state
from prorl_actors.metrics import read_jsonl

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
        self.killed: set[int] = set()

    def processes(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        for p in kids:
            self.seen.setdefault(p.pid, p)
        return kids

    def find(self, title: str) -> psutil.Process | None:
        """A live child process (not one this test killed) whose title (Ray names a worker
        `ray::Class.method` while it runs one) starts with `title`."""
        for p in self.processes():
            try:
                cmd = p.cmdline()         # once: a process that exits in between has none
            except psutil.Error:
                continue
            if p.pid not in self.killed and cmd and cmd[0].startswith(title):
                return p
        return None

    def catch(self, title: str, when=None, timeout: float = 300) -> int:
        """The pid of an actor process at the moment it starts running `title` ("ray::Class.method")
        with `when()` true (a check of the records): the process is found once, then its /proc
        title is read in a tight loop, fast enough to catch calls of a few milliseconds. `when`
        is evaluated as each such call starts, so a call already under way when the records
        change is not taken for the next one."""
        proc = _until(lambda: self.find(title.split(".")[0]), timeout, f"a {title.split('.')[0]} process", self)
        path, want = f"/proc/{proc.pid}/cmdline", title.encode()
        t0, skipping = time.time(), False
        while time.time() - t0 < timeout:
            try:
                with open(path, "rb") as f:
                    head = f.read(len(want))
            except FileNotFoundError:
                head = b""
            if not head:                # gone (a zombie's title is empty): find the live one
                return self.catch(title, when, timeout - (time.time() - t0))
            if head != want:
                skipping = False
            elif not skipping:
                if when is None or when():
                    return proc.pid
                skipping = True         # a call that started before the records said so
            if self.proc.poll() is not None:
                raise AssertionError(f"the driver exited before {title}\n" + self.text()[-4000:])
            time.sleep(0.0002)
        raise AssertionError(f"timed out waiting for {title}\n" + self.text()[-4000:])

    def kill(self, pid: int, sig=signal.SIGKILL) -> int:
        """Signal one of the run's processes; a SIGKILLed one is never found again."""
        if sig == signal.SIGKILL:
            self.killed.add(pid)
        os.kill(pid, sig)
        return pid

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
    """SIGKILL the process running `title` in its first call after `after_step` steps are
    recorded -> its pid."""
    return driver.kill(driver.catch(title, when=lambda: _steps_done(run) >= after_step))


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
