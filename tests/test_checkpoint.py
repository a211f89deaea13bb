"""Checkpoint files and run records without Ray: atomic saves (also under SIGKILL at random
moments), rolled-back records, torn lines, the `resume` key, spec changes between starts."""
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prorl_actors.checkpoint import (latest_checkpoint, list_checkpoints, save_checkpoint, verify_checkpoint,
                                     weights_digest)
from prorl_actors.cli import _spec_changes
from prorl_actors.config import load_spec
from prorl_actors.metrics import read_jsonl, roll_back_records
from prorl_actors.spec import SpecError


def _write_policy(payload):
    def save(d):
        (Path(d) / "part.txt").write_text(payload)
        return "sha-" + payload
    return save


def _save(root, step, payload="x", keep=2):
    return save_checkpoint(root, step, _write_policy(payload), lambda d: None, {"step": step}, keep)


def test_saves_are_listed_only_when_complete_and_the_last_k_kept(tmp_path):
    for s in (1, 2, 3):
        _save(tmp_path, s)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    (tmp_path / ".tmp-step_000004").mkdir()               # a save killed half-way
    (tmp_path / ".tmp-step_000004" / "part.txt").write_text("half")
    (tmp_path / "step_000009").mkdir()                     # no state file: never complete
    assert latest_checkpoint(tmp_path).name == "step_000003"
    _save(tmp_path, 4)
    assert not list(tmp_path.glob(".tmp-*"))               # the next save clears it
    _save(tmp_path, 4, payload="again")                    # the same step saved again (after a rollback)
    assert (tmp_path / "step_000004" / "part.txt").read_text() == "again"
    state = json.loads((tmp_path / "step_000004" / "supervisor_state.json").read_text())
    assert state["step"] == 4 and state["weights_sha256"] == "sha-again"


def test_a_failing_part_leaves_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 1)

    def broken(d):
        raise OSError("disk full")
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, _write_policy("y"), broken, {"step": 2}, 2)
    assert latest_checkpoint(tmp_path).name == "step_000001"


def test_weights_digest_sees_one_changed_value():
    a = {"w": torch.zeros(3, 2), "b": torch.ones(2)}
    b = {"b": torch.ones(2), "w": torch.zeros(3, 2)}
    assert weights_digest(a) == weights_digest(b)
    b["w"][1, 1] = 1e-30
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a) != weights_digest({"w": torch.zeros(3, 2).double(), "b": torch.ones(2)})


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_roll_back_moves_later_steps_aside_but_keeps_the_runs_life(tmp_path):
    _write(tmp_path / "metrics.jsonl", [{"step": s} for s in (1, 2, 3, 4)])
    _write(tmp_path / "validation.jsonl", [{"step": 0}, {"step": 2}, {"step": 4}])
    _write(tmp_path / "events.jsonl", [{"event": "run_start", "step": 0}, {"event": "checkpoint", "step": 2},
                                       {"event": "reference_reset", "step": 3},
                                       {"event": "actor_died", "step": 3, "role": "learner"},
                                       {"event": "batch_short", "step": 4}])
    assert roll_back_records(tmp_path, 2) == 5
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in read_jsonl(tmp_path / "validation.jsonl")] == [0, 2]
    assert [r["event"] for r in read_jsonl(tmp_path / "events.jsonl")] == ["run_start", "checkpoint", "actor_died"]
    moved = read_jsonl(tmp_path / "rolled_back.jsonl")
    assert [(r["file"], r["step"]) for r in moved] == [("metrics.jsonl", 3), ("metrics.jsonl", 4),
                                                       ("validation.jsonl", 4), ("events.jsonl", 3),
                                                       ("events.jsonl", 4)]
    assert all(r["rolled_back_to"] == 2 for r in moved)
    # a checkpoint of step 2 saved before step 2's validation (a stop in its middle): that
    # validation is done again after the resume, so its record leaves with the later steps
    _write(tmp_path / "validation.jsonl", [{"step": 0}, {"step": 2}])
    assert roll_back_records(tmp_path, 2, validated_to=0) == 1
    assert [r["step"] for r in read_jsonl(tmp_path / "validation.jsonl")] == [0]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    # a rollback to the start (no checkpoint yet): validation 0 is done again too
    assert roll_back_records(tmp_path, 0, validated_to=-1) == 4      # steps 1 and 2, validation 0, an event
    assert read_jsonl(tmp_path / "validation.jsonl") == read_jsonl(tmp_path / "metrics.jsonl") == []


def test_a_save_killed_between_its_renames_leaves_the_step_it_replaced(tmp_path):
    """Saving a step again renames the old checkpoint aside, then the new one in: a kill between
    the two leaves `.tmp-old-step_N` alone, which the next listing puts back."""
    from prorl_actors.checkpoint import list_checkpoints
    ckpt = tmp_path / "step_000002"
    ckpt.mkdir()
    (ckpt / "supervisor_state.json").write_text(json.dumps({"step": 2}))
    os.replace(ckpt, tmp_path / ".tmp-old-step_000002")
    assert list_checkpoints(tmp_path) == [ckpt] and not (tmp_path / ".tmp-old-step_000002").exists()


def test_a_torn_last_line_is_dropped_a_bad_middle_line_is_an_error(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}]
    p.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not a JSON record"):
        read_jsonl(p)


def test_resume_key(tmp_path):
    assert load_spec("specs/tiny-cpu.yaml", []).resume == "auto"
    with pytest.raises(SpecError, match=r"resume: got '/nowhere'; allowed: auto, never, or a checkpoint"):
        load_spec("specs/tiny-cpu.yaml", ["resume=/nowhere"])
    ckpt = _save(tmp_path, 5)
    assert load_spec("specs/tiny-cpu.yaml", [f"resume={ckpt}"]).resume == str(ckpt)


def test_spec_changes_between_starts():
    old = "num_steps: 10\nlearner: {lr: 0.001, betas: [0.9, 0.99]}\n"
    new = "num_steps: 20\nlearner: {lr: 0.001, betas: [0.9, 0.999]}\nresume: auto\n"
    assert _spec_changes(old, new) == {"learner.betas": [[0.9, 0.99], [0.9, 0.999]], "num_steps": [10, 20],
                                       "resume": [None, "auto"]}


def test_a_checkpoint_of_another_format_is_not_resumed(tmp_path):
    from prorl_actors.checkpoint import FORMAT, format_problem
    ckpt = _save(tmp_path, 1)
    assert format_problem(ckpt) is None and json.loads((ckpt / "supervisor_state.json").read_text())["format"] == FORMAT
    (ckpt / "supervisor_state.json").write_text(json.dumps({"step": 1, "kl_coef": 0.001}))   # an older layout
    assert "format None, this version reads" in format_problem(ckpt)


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
from prorl_actors.config import load_spec
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
