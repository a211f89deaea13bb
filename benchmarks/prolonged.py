"""Prolonged RL on the tiny model: does training longer keep moving the boundary, and what do the
KL penalty and the reference resets contribute? (ProRL's ablation, at the tiny model's scale.)

specs/tiny-compose.yaml (or --spec), the composition experiment whose warm start answers in the
verifier's format, so that what moves is solving, not the format (the demo's tiny-cpu.yaml mostly
learns its format), trained for --steps steps in three arms with the same seeds, model and data:
  prorl:     the spec's recipe: a KL penalty to a reference that is reset (reference <- policy,
             optimizer state re-initialised) every --reset-every steps; with --entropy-control
             the KL coefficient is moved to hold entropy in a band (the tuned controller of
             benchmarks/entropy_control.py);
  no-resets: the same, never reset;
  dapo:      no KL penalty and no resets: DAPO's decoupled clipping and dynamic sampling only.
Every --every steps each arm is validated on --prompts held-out prompts per task with 64
samples each at the paper's temperature 0.6 / top_p 0.95: pass@1 and pass@k up to 64, on the
training tasks' held-out prompts and on the held-out tasks (validation.tasks).

Resumable: each arm is a `prorl train` run in OUT/<arm> (checkpointed every --checkpoint-every
steps). Run the command again and every arm continues from its last checkpoint; a finished arm
is read, not run. Progress: each arm's line per step, prefixed with its name.

Writes OUT/prolonged.json (per arm: validations and the entropy/KL/reset series), the plot
benchmarks/results/prolonged.png (pass@1 and pass@64 over steps per arm, entropy with resets)
and prints a table, per arm (the means over tasks) and per task.

    .venv/bin/python benchmarks/prolonged.py [--steps 200] [--every 20] [--prompts 24]
        [--arms prorl no-resets dapo] [--reset-every 50] [--entropy-control] [--out runs/prolonged]
        [dotted.key=value overrides for every arm]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from entropy_control import TUNED, train   # the script's folder is on sys.path: the controller tuned for
from prorl_actors.config import load_spec  # the tiny model, and `prorl train` run and streamed

ARMS = {
    "prorl": [],
    "no-resets": ["supervisor.resets.triggers=[]"],
    "dapo": ["supervisor.kl.mode=fixed", "supervisor.kl.coef=0", "supervisor.resets.triggers=[]"],
}
KS = [1, 4, 16, 64]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def arm_overrides(arm: str, args) -> list[str]:
    """The settings of one arm on top of the spec: the schedule of the benchmark, then the arm's."""
    common = [f"num_steps={args.steps}", f"validation.every_steps={args.every}",
              f"validation.num_prompts_per_task={args.prompts}", "validation.num_samples=64",
              f"validation.ks={KS}", f"checkpoint.every_steps={args.checkpoint_every}", "resume=auto"]
    own = list(ARMS[arm])
    if arm == "prorl":
        own.append(f"supervisor.resets.every_steps={args.reset_every}")
    if args.entropy_control and arm != "dapo":
        own += ["supervisor.kl.mode=entropy-target", "supervisor.kl.entropy_target_relative=0.8",
                "supervisor.kl.band=0.025", *TUNED]
    return common + own + list(args.overrides)


def finished(run: Path, steps: int) -> bool:
    ms = _read(run / "metrics.jsonl")
    return bool(ms) and ms[-1]["step"] >= steps and (run / "summary.txt").exists()


def series(run: Path) -> dict:
    """What the plot and the table read from one arm's run directory."""
    spec = load_spec(run / "spec.yaml")
    trained = [t.name for t in spec.data.tasks]
    held = [t.name for t in spec.validation.tasks]
    vals = _read(run / "validation.jsonl")
    ms = _read(run / "metrics.jsonl")
    events = _read(run / "events.jsonl")

    def mean(v: dict, key: str, tasks: list[str]) -> float | None:
        xs = [v[f"{key}/{t}"] for t in tasks if v.get(f"{key}/{t}") is not None]
        return sum(xs) / len(xs) if xs else None

    return {"trained": trained, "held_out": held,
            "validation": [{"step": v["step"], **{f"{k}/{t}": v.get(f"{k}/{t}") for k in [f"pass@{k}" for k in KS]
                                                  for t in trained + held},
                            **{f"pass@{k}/{part}": mean(v, f"pass@{k}", tasks) for k in KS
                               for part, tasks in (("trained", trained), ("held_out", held)) if tasks}}
                           for v in vals],
            "steps": [m["step"] for m in ms], "entropy": [m.get("entropy") for m in ms],
            "kl_coef": [m.get("kl_coef") for m in ms], "reward": [m.get("reward_mean") for m in ms],
            "resets": [e["step"] for e in events if e.get("event") == "reference_reset"],
            "wall_s": sum(m.get("step_s") or 0.0 for m in ms)}


def plot(data: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"prorl": "tab:blue", "no-resets": "tab:orange", "dapo": "tab:red"}
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    for arm, d in data.items():
        c = colors.get(arm, None)
        vs = d["validation"]
        steps = [v["step"] for v in vs]
        for ax, k in ((axes[0], 1), (axes[1], 64)):
            ax.plot(steps, [v.get(f"pass@{k}/trained") for v in vs], color=c, marker="o", label=f"{arm}: trained tasks")
            if d["held_out"]:
                ax.plot(steps, [v.get(f"pass@{k}/held_out") for v in vs], color=c, marker="s", ls="--",
                        label=f"{arm}: held-out tasks")
        axes[2].plot(d["steps"], d["entropy"], color=c, lw=1, label=arm)
        for i, s in enumerate(d["resets"]):
            axes[2].axvline(s, color=c, ls=":", lw=1, label=f"{arm}: reference resets" if i == 0 else None)
    axes[0].set_ylabel("pass@1 (held-out prompts)")
    axes[1].set_ylabel("pass@64 (held-out prompts)")
    axes[2].set_ylabel("policy entropy (nats / token)")
    axes[2].set_xlabel("step")
    axes[0].set_title("prolonged RL: ProRL vs no resets vs DAPO only (held-out prompts, T 0.6, top_p 0.95)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="specs/tiny-compose.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=20, help="validation every N steps (64 samples per prompt)")
    ap.add_argument("--prompts", type=int, default=24, help="held-out prompts per task at each validation")
    ap.add_argument("--reset-every", type=int, default=50, help="prorl arm: steps between reference resets")
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--entropy-control", action="store_true",
                    help="prorl and no-resets arms: move the KL coefficient to hold entropy in a band")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", default="runs/prolonged")
    ap.add_argument("--png", default="benchmarks/results/prolonged.png")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value for every arm")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.time()
    for arm in args.arms:
        run = out / arm
        if finished(run, args.steps):
            print(f"[{arm:>9}] finished earlier: read from {run}", flush=True)
            continue
        train(args.spec, out, arm, arm_overrides(arm, args), prefix=f"[{arm:>9}] ")
        print(f"[{arm:>9}] done ({(time.time() - t0) / 60:.1f} min since the start of this invocation)", flush=True)

    data = {arm: series(out / arm) for arm in args.arms}
    (out / "prolonged.json").write_text(json.dumps(data, indent=1))
    plot(data, Path(args.png))
    kmax = max(KS)
    print(f"\n{'arm':10}{'resets':>8}{'entropy end':>13}" + "".join(
        f"{f'{p} pass@{k} start->end':>34}" for p in ("trained", "held-out") for k in (1, kmax)))
    for arm, d in data.items():
        vs, row = d["validation"], ""
        for part in ("trained", "held_out"):
            for k in (1, kmax):
                a, b = vs[0].get(f"pass@{k}/{part}"), vs[-1].get(f"pass@{k}/{part}")
                row += f"{f'{a:.3f} -> {b:.3f}' if a is not None and b is not None else '-':>34}"
        ent = [e for e in d["entropy"] if e is not None]
        print(f"{arm:10}{len(d['resets']):8d}{ent[-1] if ent else float('nan'):13.4f}{row}")
    print(f"\nper task (held-out prompts): pass@1 and pass@{kmax}, start -> end")
    for arm, d in data.items():
        vs = d["validation"]
        for task in d["trained"] + d["held_out"]:
            cells = [(vs[0].get(f"pass@{k}/{task}"), vs[-1].get(f"pass@{k}/{task}")) for k in (1, kmax)]
            print(f"{task:24}{arm:>10}" + "".join(f"{f'{a:.3f} -> {b:.3f}' if None not in (a, b) else '-':>20}"
                                                  for a, b in cells))
    print(f"plot: {args.png}; data: {out / 'prolonged.json'}")


if __name__ == "__main__":
    main()
