"""Asynchronous rollouts on the demo spec: the same run at supervisor.max_staleness 0, 1 and 2,
one after the other in one invocation (vLLM on CPU, the embedded tiny model, 2 cores). An arm
written with an "f" (`--staleness 0 1 1f`) is that staleness with in-flight weight updates
(generator.in_flight_updates, pieces of --piece-tokens tokens).

With --repeats N each staleness runs N times, in alternating order (0 1 2, 2 1 0, ...), and the
table gives the median of each figure over its runs (this machine is shared: one slow run would
otherwise make a ratio). Per run, from its records: trained samples per second of wall time (the `time` of the first
and last step records: validations and checkpoints in between count), the median step time, the
generator and learner idle fractions, the trained rows' staleness, the sampler/learner mismatch,
and held-out accuracy after the same number of trained samples (the runs train the same number
of steps of the same batch size). A PNG: held-out accuracy against trained samples and against
wall time, for each staleness.

The synchronous run is the demo as it was before rollouts were made ahead: the learner and the
reference on two threads (the machine is theirs while generation waits), no off-policy
correction. The runs with max_staleness > 0 are the demo spec's own (one thread each, so that
vLLM's one core and theirs are apart; truncated importance sampling).

    .venv/bin/python benchmarks/pipeline.py [--staleness 0 1 2 1f] [--steps 24] [--out runs/bench_pipeline] [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prorl_actors.metrics import read_jsonl  # noqa: E402

SYNC = ["learner.num_threads=2", "reference.num_threads=2", "algorithm.off_policy_correction.mode=none"]


def run(out: Path, name: str, staleness: int, steps: int, extra: list[str], overrides: list[str]) -> Path:
    """One `prorl train` of the demo spec at `staleness` -> its run directory."""
    args = [sys.executable, "-m", "prorl_actors.cli", "train", "specs/tiny-cpu.yaml", f"output_dir={out}",
            f"name={name}", f"num_steps={steps}", "metrics.prometheus.enabled=false", *overrides,
            f"supervisor.max_staleness={staleness}", *extra]
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"max_staleness {staleness}: prorl train failed ({rc}); see {out / f'{name}.log'}")
    print(f"{name}: {time.time() - t0:.0f}s", flush=True)
    return out / name


def figures(run_dir: Path, group_size: int) -> dict:
    m = read_jsonl(run_dir / "metrics.jsonl")
    val = read_jsonl(run_dir / "validation.jsonl")
    samples = [sum(r["trained_groups"] for r in m[:i + 1]) * group_size for i in range(len(m))]   # after step i + 1
    wall = m[-1]["time"] - m[0]["time"]
    med = lambda k: statistics.median(r[k] for r in m[1:] if r.get(k) is not None)  # noqa: E731
    at_step = {r["step"]: (s, r["time"] - m[0]["time"] + m[0]["step_s"]) for r, s in zip(m, samples)}
    return {"samples_per_s": (samples[-1] - samples[0]) / wall, "step_s": med("step_s"),
            "generator_idle": med("generator_idle_frac"), "learner_idle": med("learner_idle_frac"),
            "staleness": statistics.mean(r["staleness_mean"] for r in m if r["staleness_mean"] is not None),
            "mismatch_k3": med("logp_mismatch_k3"), "gap_max": max(r["logp_gap_max"] or 0 for r in m),
            "in_flight": sum(r.get("in_flight_pushes") or 0 for r in m) / len(m),
            "carried": sum(r.get("carried_groups") or 0 for r in m) / len(m),
            "val_first": val[0]["accuracy"], "val_last": val[-1]["accuracy"], "samples": samples[-1],
            "curve": [(at_step.get(v["step"], (0, 0.0)), v["accuracy"]) for v in val]}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for s, f in results.items():      # (the first run of each staleness)
        xs = [c[0][0] for c in f["curve"]]
        ts = [c[0][1] for c in f["curve"]]
        ys = [c[1] for c in f["curve"]]
        ax[0].plot(xs, ys, marker="o", label=label(s))
        ax[1].plot(ts, ys, marker="o", label=f"{label(s)} ({f['samples_per_s']:.0f} samples/s)")
    ax[0].set_xlabel("trained samples")
    ax[1].set_xlabel("wall time since the first step started (s)")
    for a in ax:
        a.set_ylabel("held-out accuracy")
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle("demo spec on 2 CPU cores: synchronous vs asynchronous rollouts")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label(arm: str) -> str:
    return f"max_staleness {arm.rstrip('f')}" + (", in flight" if arm.endswith("f") else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--staleness", nargs="+", default=["0", "1", "2"],
                   help="arms: a staleness, or a staleness >= 1 and f (in-flight weight updates)")
    p.add_argument("--piece-tokens", type=int, default=4, help="in-flight arms: tokens per decoding piece")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--repeats", type=int, default=1, help="runs per staleness (alternating order; medians)")
    p.add_argument("--out", default="runs/bench_pipeline")
    p.add_argument("--png", default="benchmarks/results/pipeline.png")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    from prorl_actors.config import load_spec
    G = load_spec("specs/tiny-cpu.yaml", a.overrides).group_size
    runs: dict[str, list[dict]] = {s: [] for s in a.staleness}
    for i in range(a.repeats):
        for s in (a.staleness if i % 2 == 0 else a.staleness[::-1]):
            S = int(s.rstrip("f"))
            extra = SYNC if S == 0 else []
            if s.endswith("f"):
                extra = ["generator.in_flight_updates=true", f"generator.in_flight_piece_tokens={a.piece_tokens}"]
            print(f"{label(s)}, run {i + 1}: specs/tiny-cpu.yaml {' '.join(extra + a.overrides)}", flush=True)
            runs[s].append(figures(run(out, f"s{s}_{i + 1}", S, a.steps, extra, a.overrides), G))
    for s, rs in runs.items():
        if len(rs) > 1:
            print(f"{label(s)}: samples/s per run " + ", ".join(f"{r['samples_per_s']:.1f}" for r in rs)
                  + "; held-out accuracy per run " + ", ".join(f"{r['val_last']:.3f}" for r in rs))
    results = {s: {k: (statistics.median(r[k] for r in rs) if k != "curve" else rs[0][k]) for k in rs[0]}
               for s, rs in runs.items()}
    base = results.get("0") or next(iter(results.values()))
    print(f"\n{a.steps} steps of specs/tiny-cpu.yaml each, {a.repeats} run(s) per staleness (medians over the runs); "
          "step figures: medians over the steps after the first")
    print(f"{'max_staleness':>13}{'samples/s':>11}{'speed-up':>10}{'step s':>8}{'gen idle':>10}{'learner idle':>14}"
          f"{'staleness':>11}{'mismatch k3':>13}{'held-out acc':>14}{'start':>8}{'in-flight/step':>16}{'carried/step':>14}")
    for s, f in results.items():
        print(f"{s:>13}{f['samples_per_s']:11.1f}{f['samples_per_s'] / base['samples_per_s']:9.2f}x{f['step_s']:8.2f}"
              f"{f['generator_idle']:10.2f}{f['learner_idle']:14.2f}{f['staleness']:11.2f}{f['mismatch_k3']:13.2e}"
              f"{f['val_last']:14.3f}{f['val_first']:8.3f}{f['in_flight']:16.2f}{f['carried']:14.2f}")
    for s, f in results.items():
        if s != "0" and "0" in results:
            d = f["val_last"] - base["val_last"]
            print(f"{label(s)}: held-out accuracy after {f['samples']} trained samples {d:+.3f} against 0"
                  + (" (within 2 points)" if abs(d) <= 0.02 else ""))
    png = Path(a.png)
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, png)
    print(f"plot: {png}")
    if any(not math.isfinite(f["samples_per_s"]) for f in results.values()):
        sys.exit("a run recorded no throughput")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"benchmark wall time {time.time() - t0:.0f}s")
