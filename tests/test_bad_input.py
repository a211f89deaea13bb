"""Bad input, class by class: every CLI command answers it with one clear message naming the
input (file, line or key path, what was found, what is expected) and exit status 2, never a
traceback; a bug (any other exception) keeps its traceback. Damaged checkpoints: found by their
manifest, moved aside, the newest intact one resumed (a real run resumed past one:
tests/test_survival.py::test_a_finished_run_says_so_and_raising_num_steps_prolongs_it)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prorl_actors import cli
from prorl_actors.checkpoint import MANIFEST, damage, newest_intact, read_state, save_checkpoint
from prorl_actors.tasks.files import write_rows

SPEC = "specs/tiny-cpu.yaml"
MATH_ROW = {"task": "math", "prompt": "1 + 1 =", "reference": json.dumps({"answer": "2"})}


def _file_task(path: Path, **kw) -> str:
    extra = "".join(f", {k}: {v}" for k, v in kw.items())
    return f"data.tasks=[{{name: f, family: math, source: file, path: '{path}'{extra}}}]"


def _write_inputs(tmp: Path) -> None:
    (tmp / "bad.yaml").write_text("model: {path: [1, 2}\n")
    (tmp / "list.yaml").write_text("- model\n- data\n")
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    write_rows(tmp / "rows.jsonl", [MATH_ROW, {**MATH_ROW, "prompt": ""}])
    (tmp / "notjson.jsonl").write_text(json.dumps(MATH_ROW) + "\n{oops\n")
    (tmp / "fake.parquet").write_text("task,prompt\nmath,1+1\n")
    (tmp / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    write_rows(tmp / "two.jsonl", [MATH_ROW, MATH_ROW])


def _cases(tmp: Path) -> dict:
    """Name -> (argv, what stderr must say), for the inputs _write_inputs(tmp) writes."""
    return {
        "spec not YAML": (["validate", str(tmp / "bad.yaml")], f"{tmp / 'bad.yaml'}: not valid YAML at line 1, column 20"),
        "spec not a mapping": (["validate", str(tmp / "list.yaml")], "a run spec is a mapping of sections"),
        "spec not text": (["train", str(tmp / "binary.yaml")], f"{tmp / 'binary.yaml'}: not a text file"),
        "no spec file": (["validate", str(tmp / "none.yaml")], f"{tmp / 'none.yaml'}: no such file"),
        "override without =": (["validate", SPEC, "learner.lr"], "learner.lr: got 'learner.lr'; allowed: overrides"),
        "override not parsed": (["validate", SPEC, "learner.lr=[1"], "learner.lr: got '[1'; allowed: a value OmegaConf"),
        "override of a wrong type": (["validate", SPEC, "learner=3"], "learner: got 3; allowed: a mapping with keys"),
        "override of a wrong shape": (["validate", SPEC, "data.tasks.name=3"],
                                      "<overrides>: got ['data.tasks.name=3']; allowed: values that fit"),
        "value out of range": (["train", SPEC, "learner.lr=-1"], "learner.lr: got -1; allowed: > 0"),
        "no model there": (["train", SPEC, f"model.path={tmp}", f"output_dir={tmp / 'runs'}"],
                           f"model.path {tmp}: not a model directory (no config.json there)"),
        "bad data row": (["validate", SPEC, _file_task(tmp / "rows.jsonl")],
                         f"{tmp / 'rows.jsonl'}:line 2: prompt must be a non-empty string"),
        "bad data row, train": (["train", SPEC, _file_task(tmp / "rows.jsonl"), f"output_dir={tmp / 'runs'}"],
                                f"{tmp / 'rows.jsonl'}:line 2: prompt must be a non-empty string"),
        "data line not JSON": (["validate", SPEC, _file_task(tmp / "notjson.jsonl")],
                               f"{tmp / 'notjson.jsonl'}:line 2: not JSON"),
        "parquet that is not": (["validate", SPEC, _file_task(tmp / "fake.parquet")],
                                f"{tmp / 'fake.parquet'}: not a Parquet file"),
        "jsonl that is not text": (["validate", SPEC, _file_task(tmp / "binary.jsonl")],
                                   f"{tmp / 'binary.jsonl'}: not UTF-8 text"),
        "no data file": (["validate", SPEC, _file_task(tmp / "gone.jsonl")],
                         f"data.tasks[0].path: got '{tmp / 'gone.jsonl'}'; allowed: an existing file"),
        "holdout leaves nothing": (["validate", SPEC, _file_task(tmp / "two.jsonl", holdout_rows=2)],
                                   "holdout_rows 2 leaves no training row (2 usable rows)"),
        "convert: no input": (["convert", "deepscaler", str(tmp / "gone.jsonl"), str(tmp / "o.jsonl")],
                              f"{tmp / 'gone.jsonl'}: no such file"),
        "make-tiny-model: bad spec": (["make-tiny-model", str(tmp / "m"), "--spec", str(tmp / "list.yaml")],
                                      "a run spec is a mapping"),
        "eval: not a model": (["eval", "--model", str(tmp)], "neither a run directory, a checkpoint nor a model"),
        "checkpoint verify: not one": (["checkpoint", "verify", str(tmp)], f"{tmp}: not a checkpoint"),
    }


NAMES = list(_cases(Path("/tmp")))


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_one_message_and_exit_2(name, tmp_path, capsys):
    _write_inputs(tmp_path)
    argv, says = _cases(tmp_path)[name]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prorl {argv[0]}: ") and says in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()          # train stopped before anything was made


def test_as_a_process_too_no_traceback(tmp_path):
    _write_inputs(tmp_path)
    argv, says = _cases(tmp_path)["bad data row, train"]
    r = subprocess.run([sys.executable, "-m", "prorl_actors.cli", *argv], capture_output=True, text=True)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.stderr.count("\n") == 1                  # one line


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise KeyError("a bug")
    monkeypatch.setattr(cli, "cmd_tasks", broken)
    with pytest.raises(KeyError, match="a bug"):     # not turned into exit 2: its traceback stays
        cli.main(["tasks"])


def test_validate_reads_every_data_file_and_counts_its_rows(tmp_path, capsys):
    write_rows(tmp_path / "ok.jsonl", [MATH_ROW] * 5)
    assert cli.main(["validate", SPEC, _file_task(tmp_path / "ok.jsonl", holdout_rows=1)]) == 0
    out = capsys.readouterr().out
    assert f"#   f (math): 5 rows from {tmp_path / 'ok.jsonl'}, 1 held out for validation\n" in out
    assert "#   ood-minus (math): generator arithmetic, endless" in out


# ------------------------------------------------------------------------------ damaged checkpoints
def _save(root: Path, step: int) -> Path:
    """A checkpoint of small real files through save_checkpoint (its manifest written last)."""
    def policy(d):
        (Path(d) / "model.safetensors").write_bytes(bytes(range(256)) * (step + 1))
        return "digest"
    return save_checkpoint(root, step, policy, lambda d: (Path(d) / "weights.bin").write_bytes(b"r" * step),
                           {"step": step}, keep_last=5)


def test_the_manifest_finds_every_kind_of_damage(tmp_path):
    ckpts = [_save(tmp_path, s) for s in (1, 2, 3)]
    assert all(damage(c) is None for c in ckpts) and read_state(ckpts[0])["manifest"]
    files = json.loads((ckpts[0] / MANIFEST).read_text())["files"]
    assert set(files) == {"model.safetensors", "reference/weights.bin", "supervisor_state.json"}
    flipped = bytearray((ckpts[2] / "model.safetensors").read_bytes())
    flipped[100] ^= 1
    (ckpts[2] / "model.safetensors").write_bytes(bytes(flipped))                  # same size, other bytes
    (ckpts[1] / "reference" / "weights.bin").write_bytes(b"r")                       # truncated
    assert damage(ckpts[2]) == f"{ckpts[2] / 'model.safetensors'}: its sha256 is not the manifest's"
    assert damage(ckpts[1]) == f"{ckpts[1] / 'reference' / 'weights.bin'}: 1 bytes, the manifest says 2"
    assert newest_intact(tmp_path) == (ckpts[0], [(ckpts[2], damage(ckpts[2])), (ckpts[1], damage(ckpts[1]))])
    (ckpts[0] / MANIFEST).unlink()
    assert damage(ckpts[0]).startswith(f"{ckpts[0] / MANIFEST}: unreadable")
    assert newest_intact(tmp_path)[0] is None


def test_a_resume_with_every_checkpoint_damaged_says_so_and_exits_2(tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    c = _save(run / "checkpoints", 2)
    (c / "model.safetensors").unlink()
    assert cli.main(["train", SPEC, f"output_dir={tmp_path / 'runs'}", "name=x"]) == 2
    err = capsys.readouterr().err
    assert f"every checkpoint is damaged, none to resume from: {c / 'model.safetensors'}: missing" in err
    assert c.is_dir()                                  # left where it was, for a look


def test_checkpoint_verify_by_hand(tmp_path, capsys):
    c = _save(tmp_path, 1)
    (c / "reference" / "weights.bin").write_bytes(b"x")
    assert cli.main(["checkpoint", "verify", str(c)]) == 2
    assert f"{c}: damaged: {c / 'reference' / 'weights.bin'}: its sha256 is not the manifest's" in capsys.readouterr().err
