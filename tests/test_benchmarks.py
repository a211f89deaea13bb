"""Every script `make bench` runs, run as `make bench` runs it (a subprocess from the repository
root) with tiny settings: it exits 0 and prints its figures, each found, finite, and positive
where it is a time, a rate or a size. Smoke tests, so that the scripts cannot rot: the figures
are never compared with a bound (they are this machine's, under whatever else it runs).

The models are the session's tiny model (`model.path`) and, for scale.py's larger one, a model
built under a temporary $PRORL_CACHE: nothing is read from, or built into, the demo's cache."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prorl_actors.metrics import RECORD_PHASES
from sandbox import probe
from tests.conftest import TEST_OVERRIDES

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
ISO = probe()
WEAKER = [] if ISO.full else ["--allow-weaker"]   # as test_sandbox's CLI test: the weaker sandbox where layers lack
# a few small steps of the tiny model on the HF engine (the scripts' default is the spec's vLLM);
# every group trained, so that every phase runs
SMALL_RUN = ["generator.engine=hf", "supervisor.num_prompts_per_step=4", "learner.num_prompts_per_mini_batch=4",
             "generator.num_samples_per_prompt=4", "generator.max_new_tokens=8",
             "supervisor.dynamic_sampling.enabled=false", "ray.num_cpus=2"]
NUM = r"(?<![\w.\-/])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|\b(?:nan|inf)\b"   # not a path's digits


def bench(script: str, *args, tmp_path: Path, timeout: float = 600) -> str:
    """Run benchmarks/`script` -> its stdout (it must exit 0)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PRORL_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, f"benchmarks/{script}", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{script} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def row(out: str, label: str) -> list[float]:
    """The numbers of the line that starts with `label` (after leading spaces), all finite."""
    m = re.search(rf"^\s*{label}(.*)$", out, re.M)
    assert m, f"no line {label!r} in:\n{out}"
    nums = [float(x) for x in re.findall(NUM, m.group(1))]
    assert nums and all(math.isfinite(x) for x in nums), m.group(0)
    return nums


def rows(out: str, pattern: str) -> list[tuple[float, ...]]:
    """Every match of `pattern` (its groups: numbers), each number finite."""
    found = [tuple(float(x) for x in m.groups()) for m in re.finditer(pattern, out, re.M)]
    assert found and all(math.isfinite(x) for r in found for x in r), f"{pattern!r} in:\n{out}"
    return found


def positive(*xs: float) -> bool:
    return all(x > 0 for x in xs)


def test_step_time(tiny_model, tmp_path):
    out = bench("step_time.py", "--steps", 1, *TEST_OVERRIDES, f"model.path={tiny_model}", *SMALL_RUN,
                tmp_path=tmp_path)
    assert [s for s, in rows(out, rf"^step (\d+): (?:{NUM})s")] == [1, 2]   # the warm-up step, then 1 timed
    phases = {ph: row(out, rf"{ph}\b") for ph in RECORD_PHASES}
    assert all(len(v) == 2 and min(v) >= 0 for v in phases.values()), phases   # s/step, share %
    assert positive(phases["generate"][0], phases["learn"][0])
    assert positive(*row(out, "total"))
    tokens_per_s, mean_len = row(out, "generation:")
    assert positive(tokens_per_s, mean_len)


def test_learner(tiny_model, tmp_path):
    out = bench("learner.py", "--repeats", 1, *TEST_OVERRIDES, f"model.path={tiny_model}", *SMALL_RUN,
                tmp_path=tmp_path)
    n_rows, prompts, samples, *_ = row(out, "batch:")
    assert n_rows == prompts * samples == 16
    ref_s, learn_s, both_s, tok_s, pos_s, opt_steps, *pad = row(out, r"this(?=\s+\d)")
    assert positive(ref_s, learn_s, both_s, tok_s, pos_s, opt_steps)
    assert all(0 <= p < 1 for p in pad)


def test_sandbox_throughput(tmp_path):
    out = bench("sandbox_throughput.py", "--programs", 8, "--concurrency", 2, "--repeats", 1, *WEAKER,
                tmp_path=tmp_path)
    cells = rows(out, rf"^(?:baseline|sandbox): .*?\s({NUM}) programs/s\s+p50\s+({NUM}) ms\s+p99\s+({NUM}) ms")
    assert len(cells) == 2 and all(positive(*c) for c in cells), cells
    assert ("sandbox: full isolation" in out) == ISO.full
    assert re.search(r"^layers: ", out, re.M)
    assert positive(*row(out, "speed-up, best against best on"))


def test_verifiers(tmp_path):
    out = bench("verifiers.py", "--items", 4, "--threads", 2, *WEAKER, tmp_path=tmp_path)
    for family in ("math", "code", "stem", "logic", "ifeval"):
        checks, serial, pooled, reward, errors = row(out, rf"{family}\s")
        assert checks == 4 and positive(serial, pooled) and 0 <= reward <= 1 and errors == 0, (family, out)


def test_pipeline(tiny_model, tmp_path):
    out = bench("pipeline.py", "--staleness", 0, "1f", "--steps", 3, "--out", tmp_path / "pipeline",
                "--png", tmp_path / "pipeline.png", "--piece-tokens", 2, *TEST_OVERRIDES, f"model.path={tiny_model}",
                *SMALL_RUN, tmp_path=tmp_path)
    table = {s: row(out, rf"{s}\s") for s in ("0", "1f")}   # max_staleness 0, and 1 with in-flight updates
    for s, (samples_per_s, speed_up, step_s, gen_idle, learner_idle, staleness, k3, acc, first, in_flight,
            carried) in table.items():
        assert positive(samples_per_s, speed_up, step_s) and 0 <= gen_idle <= 1 and 0 <= learner_idle <= 1
        assert 0 <= acc <= 1 and 0 <= first <= 1 and k3 >= 0 and in_flight >= 0 and carried >= 0
    assert table["0"][5] == 0 and 0 < table["1f"][5] <= 1      # mean staleness: none, then at most one version
    assert table["0"][9] == 0                                  # no in-flight update in the synchronous loop
    assert "held-out accuracy after" in out and (tmp_path / "pipeline.png").stat().st_size > 10_000


def test_recipes(tiny_model, tmp_path):
    """BroRL in a real run: ProRL v2's algorithm (REINFORCE++-baseline, reward shaping) with 64
    rollouts per prompt (one arm: each costs a `prorl train`)."""
    out = bench("recipes.py", "--arms", "brorl", "--steps", 2, "--out", tmp_path / "recipes", "--png",
                tmp_path / "recipes.png", *TEST_OVERRIDES, f"model.path={tiny_model}", *SMALL_RUN,
                "generator.max_new_tokens=12", "validation.num_prompts_per_task=8",
                "validation.tasks=[{name: ood-sum, dataset: chain_sum, config: {min_terms: 3, max_terms: 3}}]",
                tmp_path=tmp_path)
    (acc_first, acc_last, pass1, pass8, entropy, resp_len, truncated, kept, multi, wall_s,
     samples_per_s) = row(out, r"brorl\s")
    assert all(0 <= x <= 1 for x in (acc_first, acc_last, pass1, pass8, truncated, kept, multi)), out
    assert positive(entropy, resp_len, wall_s, samples_per_s) and pass1 <= pass8
    run = tmp_path / "recipes" / "brorl_s0"
    assert "num_samples_per_prompt: 64" in (run / "spec.yaml").read_text()
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["length_penalty_on"] for r in steps] == [0.0, 0.0]      # period 8, on in steps 5-8
    assert all(0 <= r["shaped_reward_mean"] <= r["reward_mean"] for r in steps)
    assert (tmp_path / "recipes.png").stat().st_size > 10_000


def test_recovery(tiny_model, tmp_path):
    out = bench("recovery.py", "--out", tmp_path / "recovery", *TEST_OVERRIDES, f"model.path={tiny_model}",
                *SMALL_RUN, tmp_path=tmp_path)
    killed = re.findall(r"^killed ray::(\w+)Actor\.\w+ \(pid \d+\) after step \d+$", out, re.M)
    assert killed == ["Generator", "Verifier", "Reference", "Learner"], out
    assert positive(row(out, "demo spec, 8 steps; median step")[-1])
    restarts = rows(out, rf"^\s+(?:generator|verifier|reference|learner) replaced \(step \d+\)\s+({NUM})$")
    assert len(restarts) == 4 and all(positive(*r) for r in restarts), out
    lost_at, to_step, redone_s = row(out, "learner lost at step")
    assert to_step < lost_at and redone_s >= 0
    assert rows(out, rf"^\s+step \d+ with a death took ({NUM}) s")
    n_ck, write_s, mib = row(out, r"checkpoint write \(median of")
    assert positive(n_ck, write_s, mib)
    assert row(out, r"SIGTERM to checkpoint committed")[-1] >= 0
    assert positive(row(out, r"SIGTERM to exit")[-1])
    assert positive(*row(out, "actors up:"))


def test_exporter(tmp_path):
    out = bench("exporter.py", tmp_path / "no-run", "--steps", 200, 2000, tmp_path=tmp_path)
    assert "synthetic records" in out
    for n in (200, 2000):
        fold_s, scrape_ms, exposition_kib, figures_kib = row(out, rf"{n}\s")
        assert fold_s >= 0 and positive(scrape_ms, exposition_kib, figures_kib)


def test_scale(tiny_model, tmp_path):
    out = bench("scale.py", "--pushes", 1, "--hidden-size", 32, "--layers", 1, "--fleets", 1, "--sync-engine", "hf",
                "--prompts", 4, "--samples", 2, "--max-new-tokens", 8, "--calls", 1,
                *TEST_OVERRIDES, f"model.path={tiny_model}", "generator.engine=hf", tmp_path=tmp_path)
    models = re.findall(rf"^(spec|h32x1)\s+(\S+)\s+({NUM})M\s+({NUM})\s+hf$", out, re.M)
    assert [m[0] for m in models] == ["spec", "h32x1"], out
    assert models[0][1] == str(tiny_model) and models[1][1] != str(tiny_model)   # the larger model is its own
    assert all(positive(float(params), float(mb)) for _, _, params, mb in models)
    syncs = rows(out, rf"^(?:spec|h32x1)\s+1\s+(?:object_store|broadcast)\s+({NUM})\s+({NUM})\s+({NUM})\s+({NUM})"
                      rf"\s+({NUM})$")
    assert len(syncs) == 4 and all(positive(*s) for s in syncs), out
    (chunks, *gen), = rows(out, rf"^\s+1\s+(\d+)\s+(\d+)\s+({NUM})\s+({NUM})\s+({NUM})\s+({NUM})\s+1\.00x$")
    assert chunks == 1 and positive(*gen)   # tokens, seconds, tokens/s, median call, tokens/seq


def test_gpu_smoke_tiny(tmp_path):
    """benchmarks/gpu_smoke.py --tiny: every phase of the GPU smoke run, on this CPU, in seconds (it exits
    non-zero when a check fails: the NaN guard's included)."""
    import importlib.util
    out = bench("gpu_smoke.py", "--tiny", tmp_path=tmp_path, timeout=120)
    engines = ["torch"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") else [])
    for label in ("generation +hf", "reference +bf16", *(f"learner +{e}" for e in engines)):
        value, peak = row(out, label)
        assert positive(value, peak), label
    assert out.count("a NaN advantage skips the update, weights unchanged: ok") == len(engines)
    assert "checks: all passed" in out


def test_prolonged(tiny_model, tmp_path):
    """One arm of the prolonged benchmark in a real run, validated with 64 samples per prompt at its
    start and end; the same command again reads the finished arm instead of training it again."""
    from prorl_actors.config import load_spec
    args = ["--spec", "specs/tiny-cpu.yaml", "--arms", "dapo", "--steps", 2, "--every", 2, "--prompts", 3,
            "--out", tmp_path / "p",
            "--png", tmp_path / "p.png", *TEST_OVERRIDES, f"model.path={tiny_model}", *SMALL_RUN,
            "validation.tasks=[{name: ood-sum, dataset: chain_sum, config: {min_terms: 3, max_terms: 3}}]"]
    out = bench("prolonged.py", *args, tmp_path=tmp_path)
    resets, entropy, *passes = row(out, r"dapo\s")
    assert resets == 0 and entropy > 0 and len(passes) == 8 and all(0 <= x <= 1 for x in passes), out
    assert "[     dapo] " in out                                  # its per-step lines, prefixed
    for task in ("chain_sum", "ood-sum"):                          # and each task's own figures
        assert len(per_task := row(out, rf"{task}\s+dapo")) == 4 and all(0 <= x <= 1 for x in per_task), out
    run = tmp_path / "p" / "dapo"
    spec = load_spec(run / "spec.yaml")
    assert spec.supervisor.kl.coef == 0 and spec.supervisor.resets.triggers == []   # DAPO only
    assert spec.validation.num_samples == 64 and spec.validation.ks == [1, 4, 16, 64]
    data = json.loads((tmp_path / "p" / "prolonged.json").read_text())["dapo"]
    assert [v["step"] for v in data["validation"]] == [0, 2] and data["held_out"] == ["ood-sum"]
    for v in data["validation"]:
        assert v["pass@1/trained"] <= v["pass@4/trained"] <= v["pass@16/trained"] <= v["pass@64/trained"]
    assert (tmp_path / "p.png").stat().st_size > 10_000
    metrics = (run / "metrics.jsonl").read_text()
    again = bench("prolonged.py", *args, tmp_path=tmp_path)
    assert "finished earlier" in again and (run / "metrics.jsonl").read_text() == metrics
    assert row(again, r"dapo\s") == row(out, r"dapo\s")
