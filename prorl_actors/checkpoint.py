"""Checkpoints: `checkpoints/step_NNNNNN/` with the policy in HF format (+ tokenizer), the
learner's optimizer state and the supervisor's state (step, policy version, KL coefficient,
reset history, data cursors). Atomic: written to a temporary directory, fsynced, then
renamed; the last `keep_last` are kept.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ray

STATE_FILE = "supervisor_state.json"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, learner_actor, model_path: Path, state: dict, keep_last: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ray.get(learner_actor.save.remote(str(tmp)))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja"):
        if (Path(model_path) / name).exists():
            shutil.copy2(Path(model_path) / name, tmp / name)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).exists())
