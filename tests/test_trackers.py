"""The experiment trackers (prorl_actors/trackers.py), fed through RunRecords as the exporter is,
read back from what they wrote: TensorBoard's event files and W&B's offline run."""
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from prorl_actors.config import load_spec
from prorl_actors.errors import InputError
from prorl_actors.metrics import RunRecords, read_jsonl
from prorl_actors.trackers import TensorBoardTracker, Trackers, WandbTracker, figures
from tests.readback import tensorboard_scalars, wandb_runs


def test_figures_of_each_record_kind_by_hand():
    counts = Counter()
    step = {"step": 3, "time": 1.7e9, "entropy": 0.5, "kl": float("nan"), "overlong_penalty": None,
            "reward/sums": 1, "complete": True, "note": "text"}
    assert figures("metrics", step, counts) == {"entropy": 0.5, "reward/sums": 1.0}   # no NaN, null, bool, text
    assert figures("validation", {"step": 2, "pass@4/sums": 0.25}, counts) == {"validation/pass@4/sums": 0.25}
    assert figures("events", {"event": "reference_reset", "step": 3}, counts) == {"events/reference_reset": 1.0}
    assert figures("events", {"event": "checkpoint", "step": 3}, counts) == {"events/checkpoint": 1.0}
    assert figures("events", {"event": "reference_reset", "step": 5}, counts) == {"events/reference_reset": 2.0}


def _spec(tmp_path, *trackers):
    return load_spec(None, [f"output_dir={tmp_path}", "name=trk", f"metrics.trackers=[{','.join(trackers)}]"])


def _first_life(spec):
    """A run's first driver: steps 1-3, validations at 0 and 2, a reset at 2; ends killed."""
    trk = Trackers.from_spec(spec)
    rec = RunRecords(spec.run_dir, sinks=[trk])
    rec.event("run_start", 0)
    rec.validation.write({"step": 0, "accuracy": 0.1})
    for s in (1, 2, 3):
        rec.metrics.write({"step": s, "time": 0.0, "entropy": s / 10, "kl": float("nan")})
        if s == 2:
            rec.validation.write({"step": 2, "accuracy": 0.2})
            rec.event("reference_reset", 2, reason="every 2 steps")
    rec.close()
    trk.close()


def _second_life(spec):
    """The next driver resumes from the checkpoint of step 2: step 3 is done again, then 4."""
    trk = Trackers.from_spec(spec)
    rec = RunRecords(spec.run_dir, sinks=[trk])   # the records as they stood at the kill
    rec.roll_back_to(2)                            # the resume: step 3's records go aside
    rec.event("run_resumed", 2)
    for s in (3, 4):
        rec.metrics.write({"step": s, "time": 0.0, "entropy": s / 10 + 1, "kl": 0.01})
    rec.close()
    trk.close()


def test_tensorboard_reads_back_each_step_once_after_a_resume(tmp_path):
    spec = _spec(tmp_path, "tensorboard")
    _first_life(spec)
    got = tensorboard_scalars(spec.run_dir / "tensorboard")
    assert got["entropy"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]
    assert "kl" not in got                                   # NaN: not measured, not logged
    assert got["validation/accuracy"] == [(0, pytest.approx(0.1)), (2, pytest.approx(0.2))]
    assert got["events/reference_reset"] == [(2, 1.0)] and got["events/run_start"] == [(0, 1.0)]
    _second_life(spec)
    got = tensorboard_scalars(spec.run_dir / "tensorboard")
    # the first life's step 3 is purged; the steps as metrics.jsonl has them
    assert got["entropy"] == [(s, pytest.approx(m["entropy"])) for s, m in
                              ((m["step"], m) for m in read_jsonl(spec.run_dir / "metrics.jsonl"))]
    assert [s for s, _ in got["entropy"]] == [1, 2, 3, 4] and got["entropy"][2][1] == pytest.approx(1.3)
    assert got["kl"] == [(3, pytest.approx(0.01)), (4, pytest.approx(0.01))]
    assert got["events/run_resumed"] == [(2, 1.0)]


@pytest.fixture
def own_wandb_env():
    """W&B puts its service's address in os.environ (WANDB_SERVICE) for child processes: after these
    tests, the environment is as it was and the service is stopped, so that no later test's
    subprocess inherits it."""
    before = dict(os.environ)
    yield
    import wandb
    wandb.teardown()
    os.environ.clear()
    os.environ.update(before)


def test_wandb_offline_run_reads_back_and_a_resume_continues_it(tmp_path, monkeypatch, own_wandb_env):
    monkeypatch.delenv("WANDB_MODE", raising=False)   # offline unless the environment says otherwise
    spec = _spec(tmp_path, "wandb")
    _first_life(spec)
    _second_life(spec)
    runs = wandb_runs(spec.run_dir / "wandb")
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"] == (spec.run_dir / "wandb_run_id").read_text().strip()
    assert runs[0]["config"]["name"] == "trk" and runs[0]["config"]["metrics"]["trackers"] == ["wandb"]
    rows = [r for run in runs for r in run["history"]]
    steps = [(r["step"], r["entropy"]) for r in rows if "entropy" in r]
    # append-only: step 3 twice, the later point (the resumed run's) is the one that stands
    assert steps == [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3)), (3, pytest.approx(1.3)), (4, pytest.approx(1.4))]
    assert all("kl" not in r or math.isfinite(r["kl"]) for r in rows)
    assert [(r["step"], r["validation/accuracy"]) for r in rows if "validation/accuracy" in r] == [(0, 0.1), (2, 0.2)]
    assert [(r["step"], r["events/run_resumed"]) for r in rows if "events/run_resumed" in r] == [(2, 1.0)]


def test_wandb_mode_from_the_environment(tmp_path, monkeypatch, own_wandb_env):
    monkeypatch.setenv("WANDB_MODE", "disabled")   # the environment says otherwise: nothing is written
    spec = _spec(tmp_path, "wandb")
    _first_life(spec)
    assert not list((spec.run_dir / "wandb").glob("offline-run-*"))


def test_a_failing_tracker_is_counted_and_the_others_go_on(tmp_path):
    class Broken:
        name = "broken"

        def rewind(self, step):
            pass

        def write(self, step, values):
            raise OSError("disk full")

        def close(self):
            pass

    said = []
    tb = TensorBoardTracker(tmp_path / "tb")
    trk = Trackers([Broken(), tb], log=said.append)
    rec = RunRecords(tmp_path / "run", sinks=[trk])
    for s in range(1, 6):
        rec.metrics.write({"step": s, "entropy": 0.5})
    rec.close()
    trk.close()
    assert trk.errors == {"broken": 5}
    assert sum("disk full" in m for m in said) == 3 and said[-1] == "broken: 5 record(s) could not be logged"
    assert [s for s, _ in tensorboard_scalars(tmp_path / "tb")["entropy"]] == [1, 2, 3, 4, 5]


def test_a_tracker_not_installed_stops_the_run_at_its_start(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` raises ImportError
    with pytest.raises(InputError, match=r"prorl-actors\[trackers\]"):
        WandbTracker(_spec(tmp_path, "wandb").metrics.wandb, "trk", tmp_path, {})
    assert Trackers.from_spec(load_spec(None, [f"output_dir={tmp_path}"])) is None   # none named: none started


DRIVER = """
import os, sys
sys.path.insert(0, {root!r})
from prorl_actors.config import load_spec
from prorl_actors.trackers import Trackers
spec = load_spec(None, ["output_dir={out}", "name=trk", "metrics.trackers=[wandb]"])
t = Trackers.from_spec(spec, log=lambda *a: None)
t.observe("metrics", {{"step": 1, "entropy": 0.5}})
if sys.argv[1] == "die":
    os._exit(9)   # killed: its W&B run is never finished
t.close()
"""


def test_a_driver_after_a_killed_one_starts_although_it_inherited_a_wandb_service(tmp_path, own_wandb_env):
    """What started the drivers had a W&B service of its own (pytest did, in the survival test): each
    driver starts its own, so the run id a killed driver held is not "in use" for the next."""
    import wandb
    wandb.setup()                                     # this process's service, in os.environ for children
    assert "WANDB_SERVICE" in os.environ
    script = DRIVER.format(root=str(Path(__file__).resolve().parents[1]), out=tmp_path)
    env = {**os.environ, "WANDB_MODE": "offline"}
    killed = subprocess.run([sys.executable, "-c", script, "die"], env=env, capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr[-2000:]
    after = subprocess.run([sys.executable, "-c", script, "live"], env=env, capture_output=True, text=True)
    assert after.returncode == 0, after.stderr[-2000:]
    assert len(wandb_runs(tmp_path / "trk" / "wandb")) == 2
