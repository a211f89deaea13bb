"""End-of-run pictures, from the run directory's records alone (also for a run read later):

curves.png      training reward per task, held-out accuracy per task, entropy with its target
                band, KL and its coefficient; reference resets marked on every panel
throughput.png  tokens per second, time per phase, dynamic sampling, response length

and, for `prorl eval`, passk.png: pass@k against log-scaled k per task, one line per model.
"""
from __future__ import annotations

import math
from pathlib import Path

from prorl_actors.events import Event
from prorl_actors.metrics import STEP_PHASES, read_jsonl

RESET_COLORS = {"scheduled": "tab:green", "validation": "tab:orange", "kl": "tab:red"}


def _series(records: list[dict], key: str) -> list[float]:
    return [math.nan if r.get(key) is None else float(r[key]) for r in records]


def plot_run(run_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = read_jsonl(run_dir / "metrics.jsonl")
    v = read_jsonl(run_dir / "validation.jsonl")
    resets = [(e["step"], e.get("trigger", "unrecorded")) for e in read_jsonl(run_dir / "events.jsonl")
              if e["event"] == Event.REFERENCE_RESET]
    steps = [r["step"] for r in m]

    def mark_resets(ax):
        seen = set()
        for s, why in resets:
            ax.axvline(s, color=RESET_COLORS.get(why, "tab:gray"), ls=":", lw=1.2,
                       label=None if why in seen else f"reset ({why})")
            seen.add(why)

    def finish(fig, ax, name, title):
        for a in ax.flat:
            a.set_xlabel("step")
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
        fig.suptitle(title)
        out = run_dir / name
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return out

    # ---------------------------------------------------------------- curves.png
    fig, ax = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    tasks = sorted({k.split("/", 1)[1] for r in m for k in r if k.startswith("reward/")})
    for t in tasks:
        ax[0, 0].plot(steps, _series(m, f"reward/{t}"), label=t, alpha=0.8)
    ax[0, 0].plot(steps, _series(m, "reward_mean"), color="k", lw=2, label="all tasks")
    ax[0, 0].set_title("training reward per task")
    vt = sorted({k.split("/", 1)[1] for r in v for k in r if k.startswith("accuracy/")})
    vsteps = [r["step"] for r in v]
    for t in vt:
        ax[0, 1].plot(vsteps, _series(v, f"accuracy/{t}"), marker="o", label=t)
    ax[0, 1].plot(vsteps, _series(v, "accuracy"), marker="s", color="k", lw=2, label="training tasks")
    ax[0, 1].set_title("held-out accuracy per task")
    e = ax[1, 0]
    target, band = _series(m, "entropy_target"), _series(m, "entropy_band")
    if any(not math.isnan(t) for t in target):
        e.fill_between(steps, [t - b for t, b in zip(target, band)], [t + b for t, b in zip(target, band)],
                       color="tab:green", alpha=0.15, step="mid", label="target band")
        e.plot(steps, target, color="tab:green", lw=1, ls="--", label="target")
    e.plot(steps, _series(m, "entropy"), color="tab:purple", label="entropy (trained tokens)")
    if any(not math.isnan(x) for x in _series(m, "entropy_signal")):
        e.plot(steps, _series(m, "entropy_signal"), color="tab:purple", alpha=0.5, ls="-.", label="controlled signal")
    e.set_title("policy entropy (nats / token)")
    k = ax[1, 1]
    k.plot(steps, _series(m, "kl"), color="tab:red", label="KL to reference")
    k.set_yscale("log")
    k.set_ylim(bottom=1e-6)  # right after a reset the KL is 0 up to float noise
    twin = k.twinx()
    coefs = _series(m, "kl_coef")
    twin.plot(steps, coefs, color="tab:gray", ls="--")
    finite = [c for c in coefs if not math.isnan(c)]
    twin.set_ylim(0, 2 * max(finite) if finite and max(finite) > 0 else 1.0)
    twin.set_ylabel("KL coefficient (grey, dashed)")
    k.set_title("KL to reference (red) and its coefficient (grey)")
    for a in ax.flat:
        mark_resets(a)
    curves = finish(fig, ax, "curves.png", f"{run_dir.name}: training curves (dotted lines: reference resets)")

    # ---------------------------------------------------------------- throughput.png
    fig, ax = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax[0, 0].plot(steps, _series(m, "gen_tokens_per_s"), label="generated")
    ax[0, 0].plot(steps, _series(m, "train_tokens_per_s"), label="trained")
    ax[0, 0].set_title("tokens per second")
    pad = ax[0, 0].twinx()
    pad.plot(steps, _series(m, "pad_frac"), color="tab:gray", ls="--")
    pad.set_ylabel("learner padding share (grey, dashed)")
    phases = [[0.0 if math.isnan(x) else x for x in _series(m, f"time/{p}_s")] for p in STEP_PHASES]
    ax[0, 1].stackplot(steps, phases, labels=[f"{p} (for the batch)" if p == "wait" else p for p in STEP_PHASES],
                       alpha=0.8)
    ax[0, 1].plot(steps, [g + v for g, v in zip(_series(m, "time/generate_s"), _series(m, "time/verify_s"))],
                  color="black", ls=":", label="generate + verify (the batch's own)")
    ax[0, 1].set_title("time per phase (s, stacked: the step)")
    ax[1, 0].plot(steps, _series(m, "kept_groups_frac"), label="groups kept")
    ax[1, 0].plot(steps, _series(m, "keep_rate"), label="running keep rate (sizes the rounds)")
    ax[1, 0].set_ylim(0, 1.05)
    rounds = ax[1, 0].twinx()
    rounds.plot(steps, _series(m, "gen_rounds"), color="tab:gray", ls="--")
    rounds.set_ylabel("generation rounds (grey, dashed)")
    ax[1, 0].set_title("dynamic sampling")
    ax[1, 1].plot(steps, _series(m, "response_len_mean"), label="mean response length (tokens)")
    trunc = ax[1, 1].twinx()
    trunc.plot(steps, _series(m, "truncated_frac"), color="tab:gray", ls="--")
    trunc.set_ylabel("truncated share (grey, dashed)")
    ax[1, 1].set_title("responses")
    for a in ax.flat:
        mark_resets(a)
    throughput = finish(fig, ax, "throughput.png", f"{run_dir.name}: throughput")
    return [curves, throughput]


def plot_passk(curves: dict[str, dict[str, dict]], ks: list[int], out: Path, title: str) -> Path:
    """curves: {model label: {task: {"pass@k": {k: mean}, "pass@k_se": {k: se}, "held_out": bool}}}
    -> one panel per task, pass@k with a band of one standard error, k on a log2 axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, c in next(iter(curves.values())).items() if "pass@k" in c]   # tasks with prompts
    cols = min(len(tasks), 3)
    rows = math.ceil(len(tasks) / cols)
    fig, ax = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), constrained_layout=True, squeeze=False)
    colors = {"base": "tab:gray", "model": "tab:blue"}
    for a, task in zip(ax.flat, tasks):
        for label, per_task in curves.items():
            c = per_task[task]
            mean = [c["pass@k"][str(k)] for k in ks]
            se = [c["pass@k_se"][str(k)] for k in ks]
            a.plot(ks, mean, marker="o", ms=3, color=colors.get(label), label=label)
            a.fill_between(ks, [m - e for m, e in zip(mean, se)], [m + e for m, e in zip(mean, se)],
                           color=colors.get(label), alpha=0.15)
        a.set_xscale("log", base=2)
        a.set_xticks(ks, [str(k) for k in ks], fontsize=7)
        a.set_ylim(-0.02, 1.02)
        a.set_xlabel("k")
        a.set_ylabel("pass@k")
        a.set_title(f"{task} ({'held out' if c['held_out'] else 'trained'})", fontsize=9)
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="lower right")
    for a in list(ax.flat)[len(tasks):]:
        a.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
