"""Time per phase of a training step on the tiny spec, and generation tokens/s.

    .venv/bin/python benchmarks/step_time.py [--steps 6] [--spec specs/tiny-cpu.yaml] [overrides ...]

Runs the real loop (embedded Ray, the spec's engines) for a few steps after a warm-up
step, then prints the mean seconds per phase — generate, verify, reference, learn, weight
sync, everything else — and generated tokens per second.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prorl_actors.cli import connect_ray  # noqa: E402
from prorl_actors.config import load_spec  # noqa: E402
from prorl_actors.metrics import RECORD_PHASES  # noqa: E402
from prorl_actors.supervisor import Supervisor  # noqa: E402
from prorl_actors.tinymodel import resolve_model_path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="specs/tiny-cpu.yaml")
    p.add_argument("--steps", type=int, default=6, help="timed steps (after 1 warm-up step)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = tempfile.mkdtemp(prefix="prorl-bench-")
    spec = load_spec(args.spec, [*args.overrides, f"output_dir={out}", "name=bench"])
    model_path = resolve_model_path(spec.model, spec.data)
    connect_ray(spec)
    sup = Supervisor(spec, model_path, log=lambda m: print(m, flush=True))
    rows = []
    try:
        for sup.step in range(1, args.steps + 2):
            m = sup.train_step()
            print(f"step {sup.step}: {m['step_s']:.2f}s  ({m['gen_rounds']} generation rounds)", flush=True)
            if sup.step > 1:
                rows.append(m)
    finally:
        sup.shutdown()
    mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
    print(f"\n{spec.generator.engine} generator, {spec.supervisor.num_prompts_per_step} prompts x "
          f"{spec.group_size} samples per round, {len(rows)} steps after warm-up")
    print(f"{'phase':<12}{'s/step':>10}{'share':>9}")
    total = mean("step_s")
    for ph in RECORD_PHASES:
        s = mean(f"time/{ph}_s")
        print(f"{ph:<12}{s:10.3f}{100 * s / total:8.1f}%")
    print(f"{'total':<12}{total:10.3f}")
    print(f"generation: {mean('gen_tokens_per_s'):.0f} tokens/s (mean response {mean('response_len_mean'):.1f} tokens)")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"benchmark wall time {time.time() - t0:.0f}s")
