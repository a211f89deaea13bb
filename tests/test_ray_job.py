"""The cluster path of the README, end to end: `ray start --head` on 127.0.0.1, `ray job submit
--working-dir . -- prorl train ...`, `ray job stop` (SIGTERM: a checkpoint, status STOPPED),
a re-submit that resumes and finishes, and `prorl eval` of the result. The head node runs in
its own process group, which the test kills at the end (nothing else on the machine is
touched)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prorl_actors.metrics import read_jsonl

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
N = 40   # steps: ~0.3 s each here, long enough for `ray job stop` (a few seconds) to land in the middle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    """A real Ray head node on loopback, with the token authentication Ray has on by default."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dash = _free_port()
    start = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={_free_port()}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=2", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = start.communicate(timeout=120)[0]
    assert start.returncode == 0, out[-3000:]
    client_env = {**env, "RAY_AUTH_MODE": "token"}   # without it: "Missing authentication token"
    gcs = Path("/tmp/ray/ray_current_cluster")
    ours = gcs.read_text().strip() if gcs.exists() else None
    try:
        yield f"http://127.0.0.1:{dash}", client_env
    finally:
        if ours and gcs.exists() and gcs.read_text().strip() == ours:
            gcs.unlink()   # what `ray stop` would remove: later `ray.init()`s must not look for this head
        for sig in (signal.SIGTERM, signal.SIGKILL):  # every process `ray start` left behind
            try:
                os.killpg(start.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)


def _ray(args, env, timeout=600, **kw):
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).parent.parent, **kw)


def test_ray_job_submit_stop_and_resuming_resubmit(tiny_model, tmp_path, head):
    from tests.conftest import TEST_OVERRIDES
    address, env = head
    train = ["prorl", "train", "specs/tiny-cpu.yaml", *TEST_OVERRIDES, f"model.path={tiny_model}",
             f"output_dir={tmp_path}", "name=job", "generator.engine=hf", f"num_steps={N}", "checkpoint.every_steps=0",
             "supervisor.num_prompts_per_step=8", "learner.num_prompts_per_mini_batch=4",
             "generator.num_samples_per_prompt=4", "generator.max_new_tokens=8", "validation.num_prompts_per_task=8",
             "validation.num_samples=4", "validation.ks=[1,2,4]", "validation.every_steps=0"]
    # the job supervisor waits RAY_JOB_STOP_WAIT_TIME_S (default 3) after SIGTERM before SIGKILL
    runtime_env = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}})
    sub = _ray(["job", "submit", "--address", address, "--submission-id", "first", "--no-wait", "--working-dir", ".",
                "--runtime-env-json", runtime_env, "--", *train], env)
    assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-2000:]
    run = tmp_path / "job"
    t0 = time.time()
    while not (run / "metrics.jsonl").exists() or len(read_jsonl(run / "metrics.jsonl")) < 2:
        assert time.time() - t0 < 300, _ray(["job", "logs", "--address", address, "first"], env).stdout[-4000:]
        time.sleep(0.2)
    stop = _ray(["job", "stop", "--address", address, "first"], env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = _ray(["job", "status", "--address", address, "first"], env)
    assert "Job 'first' was stopped" in status.stdout + status.stderr      # status STOPPED
    logs = _ray(["job", "logs", "--address", address, "first"], env).stdout
    assert "SIGTERM: stopping at the next safe point" in logs and "stopped by SIGTERM after step" in logs
    events = read_jsonl(run / "events.jsonl")
    pre = [e for e in events if e["event"] == "preempted"]
    assert len(pre) == 1 and pre[0]["checkpoint"], logs[-3000:]
    stopped_at = pre[0]["step"]
    assert 2 <= stopped_at < N and (run / "checkpoints" / f"step_{stopped_at:06d}").is_dir()

    # the same submission again: it resumes, streams its logs, and finishes
    again = _ray(["job", "submit", "--address", address, "--submission-id", "second", "--working-dir", ".", "--",
                  *train], env)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    text = again.stdout + again.stderr
    assert f"resuming {run} from" in text and f"at step {stopped_at}" in text
    assert f"step   {N}/{N}" in text and "Job 'second' succeeded" in text
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, N + 1))
    assert metrics[-1]["resumes"] == 1
    assert read_jsonl(run / "events.jsonl")[-1]["event"] == "run_end"

    # the finished run's boundary report, submitted the same way (the spec from the run directory)
    ev = _ray(["job", "submit", "--address", address, "--submission-id", "eval", "--working-dir", ".", "--",
               "prorl", "eval", "--model", str(run), "--base", "--n", "4", "--num-prompts", "4"], env)
    assert ev.returncode == 0, ev.stdout[-4000:] + ev.stderr[-2000:]
    assert "# Boundary report" in ev.stdout + ev.stderr and "Job 'eval' succeeded" in ev.stdout + ev.stderr
    report = json.loads((run / "eval" / f"step_{N:06d}" / "boundary.json").read_text())
    assert report["base"] == str(tiny_model) and report["tasks"]["chain_sum"]["num_prompts"] == 4
