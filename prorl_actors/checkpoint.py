"""Checkpoints: `checkpoints/step_NNNNNN/`, the whole state of a run at the end of a step.

    config.json, model.safetensors, tokenizer files   the policy in HF format (transformers, vLLM)
    learner_state.pt                                  AdamW moments, LR schedule, learner RNG, counters
    reference/                                        the reference policy in HF format
    rollouts/                                         batches made ahead of the learner (Arrow IPC;
                                                      supervisor.max_staleness > 0), not yet trained on
    supervisor_state.json                             step, policy version, KL controller, reset
                                                      history, data sampler, RNG states, weights digest

Atomic: every part is written into `.tmp-step_NNNNNN/`, `supervisor_state.json` after the
parts, then `manifest.json` (every other file's size and sha256), each file and the directory
are fsynced, then one rename makes it `step_NNNNNN/` (and the parent directory is fsynced). A
kill at any moment leaves either the new checkpoint or none of it: readers list only `step_*`
directories, and the next save removes stale `.tmp-*`. The last `keep_last` are kept.

Verified: a file damaged after the commit (shared storage, a disk) no longer matches the
manifest (`damage`); a resume moves such a checkpoint aside (`damaged-step_NNNNNN/`) and
continues from the newest intact one (`newest_intact`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

STATE_FILE = "supervisor_state.json"
MANIFEST = "manifest.json"
FORMAT = 2          # of the layout and state keys; a checkpoint of another format is not resumed
# 2: DeepSpeed partitions of the learner's TokenScorer (the LM under `lm.`); the dynamic-sampling keep rate
REFERENCE_DIR = "reference"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Every file, then every directory bottom-up (a rename is durable once its directory is)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            _fsync(p)
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync(d)
    _fsync(path)


def save_checkpoint(root: Path, step: int, save_policy: Callable[[str], str], save_reference: Callable[[str], None],
                    state: dict, keep_last: int, tokenizer_from: Path | None = None,
                    save_extra: Callable[[str], None] | None = None) -> Path:
    """save_policy(dir) writes the policy and the learner's state and returns the weights'
    digest; save_reference(dir) writes the reference; save_extra(dir) anything else (the
    rollouts made ahead); `state` (JSON) is written last, with the digest. -> the committed
    checkpoint directory."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):     # a save killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    tmp.mkdir()
    digest = save_policy(str(tmp))
    (tmp / REFERENCE_DIR).mkdir()
    save_reference(str(tmp / REFERENCE_DIR))
    if save_extra is not None:
        save_extra(str(tmp))
    for name in TOKENIZER_FILES:
        if tokenizer_from is not None and (Path(tokenizer_from) / name).exists():
            shutil.copy2(Path(tokenizer_from) / name, tmp / name)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "format": FORMAT, "weights_sha256": digest,
                                              "saved_at": time.time(), "manifest": True}, indent=1))
    _write_manifest(tmp)
    _fsync_tree(tmp)
    if final.exists():                          # a step saved twice (e.g. after a rollback): replace it
        old = root / f".tmp-old-step_{step:06d}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(ckpt: Path) -> None:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    (ckpt / MANIFEST).write_text(json.dumps({"files": {
        str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}, indent=1))


def damage(ckpt: Path) -> str | None:
    """What no longer matches a checkpoint's manifest: the first file missing, of another size or
    of another sha256 (None: intact; a checkpoint saved before manifests is taken as it is)."""
    ckpt = Path(ckpt)
    try:
        state = read_state(ckpt)
    except (OSError, ValueError) as e:
        return f"{ckpt / STATE_FILE}: unreadable ({e})"
    if not state.get("manifest"):
        return None
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{ckpt / MANIFEST}: unreadable ({type(e).__name__}: {e})"
    for rel, want in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{p}: missing"
        if p.stat().st_size != want["size"]:
            return f"{p}: {p.stat().st_size} bytes, the manifest says {want['size']}"
        if _sha256(p) != want["sha256"]:
            return f"{p}: its sha256 is not the manifest's"
    return None


def newest_intact(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under `root` whose files match their manifest, and the newer ones
    that do not, each with what is wrong (newest first)."""
    damaged = []
    for ckpt in reversed(list_checkpoints(root)):
        why = damage(ckpt)
        if why is None:
            return ckpt, damaged
        damaged.append((ckpt, why))
    return None, damaged


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed). A save that
    replaced a step's checkpoint and was killed between its two renames left the old one as
    `.tmp-old-step_N` and no `step_N`: it is put back first."""
    if not root.exists():
        return []
    for old in root.glob(".tmp-old-step_*"):
        final = root / old.name[len(".tmp-old-"):]
        if not final.exists() and (old / STATE_FILE).is_file():
            os.replace(old, final)
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def format_problem(ckpt: Path) -> str | None:
    """Why this version cannot resume from `ckpt` (None: it can)."""
    try:
        got = read_state(ckpt).get("format")
    except (OSError, ValueError) as e:
        return f"its state cannot be read ({e})"
    return None if got == FORMAT else f"it is of checkpoint format {got}, this version reads {FORMAT}"


def weights_digest(state_dict: dict) -> str:
    """sha256 over the tensors (name, dtype, shape, bytes) in name order: equal iff the weights are."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def verify_checkpoint(ckpt: Path) -> dict:
    """Load every part of a checkpoint the way a resume does and check the policy against the
    digest the learner recorded -> its state. Raises if anything is missing or differs."""
    from transformers import AutoModelForCausalLM
    why = damage(ckpt)
    if why:
        raise ValueError(f"{ckpt}: damaged: {why}")
    state = read_state(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")   # bf16 as saved by a bf16 learner
    if weights_digest(model.state_dict()) != state["weights_sha256"]:
        raise ValueError(f"{ckpt}: the policy's weights do not match the digest recorded at save time")
    AutoModelForCausalLM.from_pretrained(Path(ckpt) / REFERENCE_DIR)
    torch.load(Path(ckpt) / "learner_state.pt", weights_only=False)
    return state
