"""Entropy with and without the entropy controller, same model, seeds and steps.

Runs `prorl train` twice on a spec (default: the demo's):
  uncontrolled: no KL penalty (beta = 0) and no reference resets;
  controlled:   supervisor.kl.mode = entropy-target (target relative to the first step's
                entropy) with the spec's resets, and the --controller settings (default: the
                ones tuned for the tiny model, a flattened reference among them; see README).
Then writes a PNG of entropy per step for both runs (the band shaded, resets and skipped
resets marked, the controlled coefficient below) and prints the fraction of steps inside the
band after warm-up, and validation accuracy. The entropy is the one the controller holds
(supervisor.kl.entropy_signal: by default here the tasks' entropies weighted by the mixture);
when that is not the batch's token mean, the batch's mean is drawn dotted and its fraction
printed too.

    .venv/bin/python benchmarks/entropy_control.py [--steps 48] [--relative 0.8] [--band 0.025]
        [--warmup 8] [--out runs/entropy_control] [--controller KEY=VALUE ...]
        [--reuse-uncontrolled] [dotted.key=value overrides for both runs]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from prorl_actors.algo import mixture_entropy
from prorl_actors.config import load_spec

# the controller's settings for the tiny model (README: "Entropy control and reference resets")
TUNED = ["supervisor.kl.entropy_signal=task_mean", "supervisor.kl.coef=1", "supervisor.kl.coef_min=0.5",
         "supervisor.kl.coef_max=10", "supervisor.kl.rate=0.3", "supervisor.kl.kp=1",
         "reference.temperature_scale=1.05", "supervisor.resets.entropy_margin=-0.5"]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(spec: str, out: Path, name: str, overrides: list[str], prefix: str = "") -> Path:
    """`prorl train` into OUT/<name> (resuming a run there, per the spec's `resume`), its lines
    printed as they come, each after `prefix`; its stderr kept in OUT/<name>.stderr.log."""
    cmd = [sys.executable, "-m", "prorl_actors.cli", "train", spec, f"output_dir={out}", f"name={name}", *overrides]
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{name}.stderr.log"      # Ray's and vLLM's chatter; its end is shown if the run fails
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        for line in proc.stdout:
            print(f"{prefix}{line}", end="", flush=True)
        code = proc.wait()
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"{name} run failed (exit {code}); the end of {log}:\n{tail}")
    return out / name


def in_band(entropies: list[float], low: float, high: float) -> float:
    vals = [e for e in entropies if e is not None and not math.isnan(e)]
    return sum(low <= e <= high for e in vals) / max(len(vals), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="specs/tiny-cpu.yaml")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--relative", type=float, default=0.8, help="entropy target / the first step's entropy")
    ap.add_argument("--band", type=float, default=0.025, help="band half-width, nats per token")
    ap.add_argument("--warmup", type=int, default=8, help="steps not counted in the in-band fraction")
    ap.add_argument("--out", default="runs/entropy_control")
    ap.add_argument("--controller", nargs="*", default=TUNED, metavar="KEY=VALUE",
                    help=f"settings of the controlled run only (default: {' '.join(TUNED)})")
    ap.add_argument("--reuse-uncontrolled", action="store_true",
                    help="keep an uncontrolled run already in --out (same spec and steps)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value for both runs")
    args = ap.parse_args()
    out = Path(args.out)
    common = [f"num_steps={args.steps}", *args.overrides]
    reuse = args.reuse_uncontrolled and (out / "uncontrolled" / "summary.txt").exists()
    runs = {
        "uncontrolled": out / "uncontrolled" if reuse else train(args.spec, out, "uncontrolled", common + [
            "supervisor.kl.mode=fixed", "supervisor.kl.coef=0", "supervisor.resets.triggers=[]"]),
        "controlled": train(args.spec, out, "controlled", common + [
            "supervisor.kl.mode=entropy-target", f"supervisor.kl.entropy_target_relative={args.relative}",
            f"supervisor.kl.band={args.band}", *args.controller]),
    }
    metrics = {k: _read(v / "metrics.jsonl") for k, v in runs.items()}
    # the entropy the controller held (supervisor.kl.entropy_signal), for both runs alike
    spec = load_spec(runs["controlled"] / "spec.yaml")
    signal, weights = spec.supervisor.kl.entropy_signal, {t.name: t.weight for t in spec.data.tasks}
    for name, ms in metrics.items():
        for m in ms:
            m["held"] = m["entropy"] if signal == "batch" else mixture_entropy(
                {k[len("entropy/"):]: v for k, v in m.items() if k.startswith("entropy/") and v is not None}, weights)
        if all(math.isnan(m["held"]) for m in ms):
            sys.exit(f"{runs[name]} has no entropy per task (an older run?): run it again")
    target = next(m["entropy_target"] for m in metrics["controlled"] if m.get("entropy_target") is not None)
    low, high = target - args.band, target + args.band
    events = _read(runs["controlled"] / "events.jsonl")
    resets = [e["step"] for e in events if e["event"] == "reference_reset"]
    skipped = [e["step"] for e in events if e["event"] == "reference_reset_skipped"]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ax.axhspan(low, high, color="tab:green", alpha=0.15, label=f"band {target:.3f} +- {args.band}")
    for name, color in (("uncontrolled", "tab:red"), ("controlled", "tab:blue")):
        ms = metrics[name]
        ax.plot([m["step"] for m in ms], [m["held"] for m in ms], color=color, marker=".", label=name)
        if signal != "batch":
            ax.plot([m["step"] for m in ms], [m["entropy"] for m in ms], color=color, ls=":", lw=1,
                    label=f"{name}, the batch's token mean")
    for s in resets:
        ax.axvline(s, color="tab:green", ls=":", lw=1)
        ax2.axvline(s, color="tab:green", ls=":", lw=1)
    for i, s in enumerate(skipped):   # a due reset that waited for entropy and was skipped
        ax.axvline(s, color="tab:orange", ls=":", lw=1, label="reset skipped (entropy outside the window)" if i == 0 else None)
    ax.axvline(args.warmup + 0.5, color="grey", ls="--", lw=1, label="end of warm-up")
    ax.set_ylabel("policy entropy (nats / token)" + ("" if signal == "batch" else ", tasks' weighted mean"))
    ax.legend(fontsize=8)
    ax.set_title("entropy with and without the entropy controller (dotted: reference resets)")
    ms = metrics["controlled"]
    moved = next((k for k in ("ref_temperature_scale", "entropy_coef") if len({m.get(k) for m in ms}) > 1),
                 "kl_coef")   # what the controller moved (kl.actuator)
    ax2.plot([m["step"] for m in ms], [max(m[moved], 1e-8) for m in ms], color="tab:blue")
    if moved != "ref_temperature_scale":
        ax2.set_yscale("log")
    ax2.set_ylabel({"kl_coef": "KL coefficient", "entropy_coef": "entropy bonus coefficient",
                    "ref_temperature_scale": "reference temperature scale"}[moved] + " (controlled)")
    ax2.set_xlabel("step")
    fig.tight_layout()
    png = out / "entropy_control.png"
    fig.savefig(png, dpi=110)

    print(f"\nband [{low:.4f}, {high:.4f}] (target {target:.4f} = {args.relative} x the first step's entropy)")
    print(f"{'run':14}{'in band after warm-up':>24}{'final entropy':>15}{'val acc start':>15}{'val acc end':>13}"
          f"{'mean of last 2':>16}")
    for name in ("uncontrolled", "controlled"):
        after = [m["held"] for m in metrics[name] if m["step"] > args.warmup]
        val = [v["accuracy"] for v in _read(runs[name] / "validation.jsonl")]
        print(f"{name:14}{in_band(after, low, high):24.2f}{metrics[name][-1]['held']:15.4f}"
              f"{val[0]:15.3f}{val[-1]:13.3f}{sum(val[-2:]) / len(val[-2:]):16.3f}")
    if signal != "batch":
        print("entropy held: the tasks' entropies weighted by data.tasks' weights (supervisor.kl.entropy_signal "
              "task_mean); the batch's token mean in the band: " + ", ".join(
                  f"{name} {in_band([m['entropy'] for m in metrics[name] if m['step'] > args.warmup], low, high):.2f}"
                  for name in ("uncontrolled", "controlled")))
    print(f"resets (controlled): {resets}; skipped (entropy outside the window): {skipped}\nplot: {png}")


if __name__ == "__main__":
    main()
