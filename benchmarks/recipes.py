"""ProRL v1, ProRL v2 and BroRL on the demo (specs/tiny-cpu.yaml: its tasks, its seeds, its tiny
model, vLLM on 2 CPU cores), one after the other in one invocation.

    v1     the demo as it is: GRPO, clip 0.2 / 0.4, k3 KL, truncated importance sampling, resets
    v2     ProRL v2's algorithm on the same run: REINFORCE++-baseline, clip 0.2 / 0.27, k2 KL,
           ICE-POP [0.5, 5], stop-properly penalty 0, dynamic sampling up to 1.5x the missing
           prompts and 10 rounds, the scheduled cosine length penalty (scaled to the demo's 16
           tokens: free up to 8, half the reward at 16, on in the last 4 of every 8 steps)
    brorl  v2 with 8x the rollouts per prompt and 1/8 the prompts (64 x 8 -> 8 x 64): the same
           number of generated samples per step, the same number of updates per step

With --seeds, each arm runs once per seed (the run's `seed`: sampling; the model and the data stream stay the demo's;
the demo's is 0). Per run: held-out accuracy of the training tasks (validation at temperature 0.6, as the
demo reports it) at the start and the end, the mean of the out-of-distribution tasks' pass@1
and pass@8, the entropy of the last 4 steps, the response length, the share truncated, the
share of groups dynamic sampling kept, steps that needed more than one generation round, wall
time and trained samples per second. The table gives the mean
over seeds (with the range); a PNG shows held-out accuracy and entropy over the steps, per arm.

    .venv/bin/python benchmarks/recipes.py [--arms v1 v2 brorl] [--seeds 0 1] [--steps 24] [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline import run  # noqa: E402

from prorl_actors.metrics import read_jsonl  # noqa: E402

V2 = ["algorithm.adv_estimator=reinforce_pp_baseline", "algorithm.eps_high=0.27", "algorithm.kl_estimator=k2",
      "algorithm.off_policy_correction.mode=icepop", "algorithm.off_policy_correction.low=0.5",
      "algorithm.off_policy_correction.high=5.0", "algorithm.reward_shaping.stop_properly_coef=0.0",
      "supervisor.dynamic_sampling.max_rounds=10", "supervisor.dynamic_sampling.max_oversample=1.5",
      "algorithm.reward_shaping.length_penalty.mode=cosine", "algorithm.reward_shaping.length_penalty.min_scale=0.5",
      "algorithm.reward_shaping.length_penalty.free_tokens=8",
      "algorithm.reward_shaping.length_penalty.period_steps=8", "algorithm.reward_shaping.length_penalty.on_steps=4"]
ARMS = {
    "v1": [],
    "v2": V2,
    "brorl": V2 + ["generator.num_samples_per_prompt=64", "supervisor.num_prompts_per_step=8",
                   "learner.num_prompts_per_mini_batch=4"],
}


def figures(run_dir: Path, group_size: int) -> dict:
    m = read_jsonl(run_dir / "metrics.jsonl")
    val = read_jsonl(run_dir / "validation.jsonl")
    ood = lambda v, k: statistics.mean([x for key, x in v.items() if key.startswith(f"{k}/ood-")] or [math.nan])  # noqa: E731
    last = [r for r in m[-4:] if r.get("entropy") is not None and math.isfinite(r["entropy"])]
    return {"acc_first": val[0]["accuracy"], "acc_last": val[-1]["accuracy"],
            "ood_pass1": ood(val[-1], "pass@1"), "ood_pass8": ood(val[-1], "pass@8"),
            "entropy": statistics.mean(r["entropy"] for r in last) if last else math.nan,
            "resp_len": statistics.mean(r["response_len_mean"] for r in m),
            "truncated": statistics.mean(r["truncated_frac"] for r in m),
            "kept": statistics.mean(r["kept_groups_frac"] for r in m if r.get("kept_groups_frac") is not None),
            "multi_round": sum(r["gen_rounds"] > 1 for r in m) / len(m),
            "wall_s": m[-1]["time"] - m[0]["time"] + m[0]["step_s"],
            "samples_per_s": sum(r["trained_groups"] for r in m) * group_size / (m[-1]["time"] - m[0]["time"] + m[0]["step_s"]),
            "curve": [(v["step"], v["accuracy"]) for v in val],
            "entropy_curve": [(r["step"], r["entropy"]) for r in m]}


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for (arm, runs), color in zip(results.items(), ("C0", "C1", "C2", "C3")):
        for i, f in enumerate(runs):
            kw = dict(color=color, alpha=1.0 if i == 0 else 0.45, label=arm if i == 0 else None)
            ax[0].plot(*zip(*f["curve"]), marker="o", **kw)
            ax[1].plot(*zip(*f["entropy_curve"]), **kw)
    ax[0].set_ylabel("held-out accuracy (training tasks)")
    ax[1].set_ylabel("entropy of the trained tokens (nats)")
    for a in ax:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle("demo spec on 2 CPU cores: ProRL v1, v2 and BroRL (one line per seed)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--out", default="runs/bench_recipes")
    p.add_argument("--png", default="benchmarks/results/recipes.png")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    from prorl_actors.config import load_spec
    results: dict[str, list[dict]] = {arm: [] for arm in a.arms}
    for seed in a.seeds:
        for arm in a.arms:
            extra = ARMS[arm] + [f"seed={seed}"]
            print(f"{arm}, seed {seed}: specs/tiny-cpu.yaml {' '.join(extra + a.overrides)}", flush=True)
            G = load_spec("specs/tiny-cpu.yaml", extra + a.overrides).group_size
            results[arm].append(figures(run(out, f"{arm}_s{seed}", 1, a.steps, extra, a.overrides), G))
    cols = ("acc_first", "acc_last", "ood_pass1", "ood_pass8", "entropy", "resp_len", "truncated", "kept",
            "multi_round", "wall_s", "samples_per_s")
    print(f"\n{a.steps} steps of specs/tiny-cpu.yaml per run, seeds {a.seeds}: mean over seeds [min, max]")
    print(f"{'arm':>6}" + "".join(f"{c:>22}" for c in cols))
    for arm, runs in results.items():
        cells = []
        for c in cols:
            xs = [r[c] for r in runs]
            cells.append(f"{statistics.mean(xs):.3f} [{min(xs):.3f},{max(xs):.3f}]" if len(xs) > 1
                         else f"{xs[0]:.3f}")
        print(f"{arm:>6}" + "".join(f"{c:>22}" for c in cells))
    png = Path(a.png)
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, png)
    print(f"plot: {png}")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"benchmark wall time {time.time() - t0:.0f}s")
