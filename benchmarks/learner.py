"""The learner and the reference on one rollout batch, in-process: seconds per update and per
reference pass, tokens/s, padding share; optionally the same for another checkout (the old
code, with its own copy of the spec file) in the same invocation, so that the ratio is measured
back to back on this machine.

    .venv/bin/python benchmarks/learner.py [--spec specs/tiny-cpu.yaml] [--repeats 5]
        [--against /path/to/old/checkout] [overrides ...]

The batch is made once, by the spec's tiny model with the HF engine (real prompts of the spec's
tasks, real sampled responses, group-relative advantages of random rewards) and written to an
Arrow file; each checkout then times, on that same file, `ReferenceActor.logprobs` and
`LearnerActor.update` (a fresh learner per repeat, so every repeat does the same work) and
prints the median of the repeats after one warm-up. "tokens" are trained response tokens;
"positions" are prompt + response tokens through the model.
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


def make_batch(spec, path: str) -> None:
    """One step's batch: P prompts x G samples from the spec's tasks and tiny model -> Arrow file."""
    import dataclasses

    import numpy as np
    import pyarrow.compute as pc
    import torch

    from prorl_actors import batch as rb
    from prorl_actors.actors.generator import GeneratorActor
    from prorl_actors.algo import group_advantages
    from prorl_actors.config import build_spec
    from prorl_actors.engines.generation import SamplingSpec
    from prorl_actors.tasks import TaskMixture
    from prorl_actors.tinymodel import load_tokenizer, resolve_model_path

    model = resolve_model_path(spec.model, spec.data)
    tok = load_tokenizer(model)
    g = spec.generator
    hf = build_spec({"generator": {**dataclasses.asdict(g), "engine": "hf"}}).generator
    items = TaskMixture(spec.data).sample(spec.supervisor.num_prompts_per_step)
    prompts, _ = rb.make_prompts(items, tok, g.max_model_len - g.max_new_tokens, 0)
    gen = GeneratorActor(str(model), spec.model.dtype, hf, spec.seed)
    rollouts = gen.generate(prompts, SamplingSpec(n=spec.group_size, temperature=g.temperature, top_p=g.top_p,
                                                  max_new_tokens=g.max_new_tokens, seed=spec.seed))
    rng = np.random.default_rng(0)
    rewards = torch.tensor(rng.integers(0, 2, rollouts.num_rows), dtype=torch.float32)
    rollouts = rb.with_column(rollouts, rb.ADV, group_advantages(rewards, spec.group_size).numpy())
    import pyarrow.feather as feather
    feather.write_feather(rollouts, path)
    n_resp = int(pc.sum(pc.list_value_length(rollouts[rb.RESPONSE_IDS])).as_py())
    n_prompt = int(pc.sum(pc.list_value_length(rollouts[rb.PROMPT_IDS])).as_py())
    print(f"batch: {rollouts.num_rows} rows ({spec.supervisor.num_prompts_per_step} prompts x {spec.group_size}), "
          f"{n_resp} response tokens, {n_prompt} prompt tokens, longest response "
          f"{int(pc.max(pc.list_value_length(rollouts[rb.RESPONSE_IDS])).as_py())}", flush=True)


def measure(spec_path: str, overrides: list[str], batch_path: str, repeats: int) -> dict:
    """Time the reference and the learner of the checkout on sys.path on the batch -> figures."""
    import inspect

    import pyarrow.compute as pc
    import pyarrow.feather as feather
    import torch

    from prorl_actors import batch as rb
    from prorl_actors.actors.learner import LearnerActor
    from prorl_actors.actors.reference import ReferenceActor
    from prorl_actors.tinymodel import load_tokenizer, resolve_model_path
    try:
        from prorl_actors.config import load_spec
    except ImportError:   # --against a checkout from before prorl_actors/config.py
        from prorl_actors.spec import load_spec

    spec = load_spec(spec_path, overrides)
    model = str(resolve_model_path(spec.model, spec.data, log=lambda *_: None))
    pad = load_tokenizer(model).pad_token_id
    batch = feather.read_table(batch_path)
    g, T = spec.generator, spec.generator.temperature
    ref = ReferenceActor(model, spec.model.dtype, spec.reference, T, pad)
    ref_s = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with_ref = ref.logprobs(batch)
        ref_s.append(time.perf_counter() - t0)
    kl = spec.supervisor.kl.coef
    learn_s, stats = [], {}
    for _ in range(repeats + 1):
        torch.manual_seed(0)
        learner = LearnerActor(model, spec.learner, spec.algorithm, T, spec.group_size, g.max_new_tokens, pad,
                               spec.seed)
        t0 = time.perf_counter()
        stats = learner.update(with_ref, kl)
        learn_s.append(time.perf_counter() - t0)
    n_resp = int(pc.sum(pc.list_value_length(batch[rb.RESPONSE_IDS])).as_py())
    n_pos = n_resp + int(pc.sum(pc.list_value_length(batch[rb.PROMPT_IDS])).as_py())
    return {"code": os.path.dirname(os.path.dirname(inspect.getfile(rb))),
            "reference_s": statistics.median(ref_s[1:]), "learn_s": statistics.median(learn_s[1:]),
            "response_tokens": n_resp, "positions": n_pos, "optimizer_steps": stats.get("optimizer_steps"),
            "pad_frac": stats.get("pad_frac"), "clip_frac": stats.get("clip_frac")}


def _child(args) -> None:
    print("RESULT " + json.dumps(measure(args.spec, args.overrides, args.batch, args.repeats)), flush=True)


def _run(tree: str, args, batch_path: str) -> dict:
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--batch", batch_path, "--spec", args.spec,
           "--repeats", str(args.repeats), *args.overrides]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)   # the checkout's own spec file
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{tree}: failed\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="specs/tiny-cpu.yaml")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up")
    p.add_argument("--against", help="another checkout (e.g. a git worktree of an older commit) timed on the "
                                     "same batch, first")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.child:
        return _child(args)
    sys.path.insert(0, ROOT)
    from prorl_actors.config import load_spec
    spec = load_spec(args.spec, args.overrides)
    batch_path = os.path.join(tempfile.mkdtemp(prefix="prorl-learner-bench-"), "batch.arrow")
    make_batch(spec, batch_path)
    trees = ([("before", os.path.abspath(args.against))] if args.against else []) + [("this", ROOT)]
    rows = []
    for name, tree in trees:
        r = _run(tree, args, batch_path)
        rows.append((name, r))
        print(f"{name} ({r['code']}): reference {r['reference_s']:.3f}s, learn {r['learn_s']:.3f}s", flush=True)
    print(f"\n{'code':<8}{'reference s':>13}{'learn s':>10}{'ref+learn s':>13}{'learn tok/s':>13}"
          f"{'learn pos/s':>13}{'opt steps':>11}{'pad frac':>10}")
    for name, r in rows:
        pad = "" if r["pad_frac"] is None else f"{r['pad_frac']:.3f}"
        print(f"{name:<8}{r['reference_s']:13.3f}{r['learn_s']:10.3f}{r['reference_s'] + r['learn_s']:13.3f}"
              f"{r['response_tokens'] / r['learn_s']:13.0f}{r['positions'] / r['learn_s']:13.0f}"
              f"{r['optimizer_steps']:>11}{pad:>10}")
    if len(rows) == 2:
        (_, a), (_, b) = rows
        print(f"\nthis / before: reference {b['reference_s'] / a['reference_s']:.2f}x, learn "
              f"{b['learn_s'] / a['learn_s']:.2f}x, reference + learn "
              f"{(b['reference_s'] + b['learn_s']) / (a['reference_s'] + a['learn_s']):.2f}x the time")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"benchmark wall time {time.time() - t0:.0f}s")
