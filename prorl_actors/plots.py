"""Training curves as one PNG: reward and accuracy per task, held-out validation, entropy,
KL and its coefficient, with reference resets marked."""
from __future__ import annotations

from pathlib import Path

from prorl_actors.metrics import read_jsonl


def plot_run(run_dir: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = read_jsonl(run_dir / "metrics.jsonl")
    v = read_jsonl(run_dir / "validation.jsonl")
    resets = [e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "reference_reset"]
    steps = [r["step"] for r in m]
    series = lambda k: [r.get(k) if r.get(k) is not None else float("nan") for r in m]  # noqa: E731
    fig, ax = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    tasks = sorted({k.split("/", 1)[1] for r in m for k in r if k.startswith("reward/")})
    for t in tasks:
        ax[0, 0].plot(steps, series(f"reward/{t}"), label=f"reward {t}", alpha=0.8)
    ax[0, 0].plot(steps, series("reward_mean"), color="k", lw=2, label="reward (all)")
    ax[0, 0].set_title("training reward")
    vt = sorted({k.split("/", 1)[1] for r in v for k in r if k.startswith("accuracy/")})
    for t in vt:
        ax[0, 1].plot([r["step"] for r in v], [r[f"accuracy/{t}"] for r in v], marker="o", label=t)
    ax[0, 1].plot([r["step"] for r in v], [r["accuracy"] for r in v], marker="s", color="k", lw=2, label="all")
    ax[0, 1].set_title("held-out validation accuracy")
    ax[1, 0].plot(steps, series("entropy"), color="tab:purple")
    ax[1, 0].set_title("policy entropy (nats / token)")
    ax[1, 1].plot(steps, series("kl"), color="tab:red", label="KL to reference")
    ax[1, 1].set_yscale("log")
    ax[1, 1].set_ylim(bottom=1e-6)  # right after a reset the KL is 0 up to float noise
    twin = ax[1, 1].twinx()
    coefs = series("kl_coef")
    twin.plot(steps, coefs, color="tab:gray", ls="--", label="KL coefficient")
    twin.set_ylim(0, 2 * max([c for c in coefs if c == c] or [1.0]) or 1.0)
    ax[1, 1].set_title("KL to reference (red) and its coefficient (grey)")
    for a in ax.flat:
        for s in resets:
            a.axvline(s, color="tab:green", ls=":", lw=1)
        a.set_xlabel("step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.suptitle(f"{run_dir.name}  (dotted green: reference resets)")
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
