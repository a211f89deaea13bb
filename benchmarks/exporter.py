"""What the exporter costs on a long run: folding the records at a resume (once), a scrape
(every 5 s), and the memory the folded figures hold. Records are copies of a real run's
records (the tiny demo's: 3 tasks, 66 keys per step).

    .venv/bin/python benchmarks/exporter.py [RUN_DIR] [--steps N ...]    # RUN_DIR: a run to copy records from
"""
import argparse
import time
import tracemalloc
from pathlib import Path

from prorl_actors.exporter import STEP_COUNTERS, STEP_GAUGES, STEP_TASK_COUNTERS, STEP_TASK_GAUGES, Exporter
from prorl_actors.metrics import RECORD_PHASES
from prorl_actors.metrics import read_jsonl
from prorl_actors.spec import PrometheusSpec


TASKS = ("arithmetic", "units", "aiw")


def synthetic_step() -> dict:
    rec = {key: 0.5 for table in (STEP_GAUGES, STEP_COUNTERS) for _, key, _ in table}
    rec.update({f"{prefix}{t}": 0.5 for table in (STEP_TASK_GAUGES, STEP_TASK_COUNTERS) for _, prefix, _ in table
                for t in TASKS})
    rec.update({f"time/{p}_s": 0.1 for p in RECORD_PHASES})
    return rec


def synthetic_validation() -> dict:
    rec = {"step": 0, "accuracy": 0.5, "answer_format_frac": 0.9}
    rec.update({f"{key}/{t}": 0.5 for key in ("accuracy", "solved_frac", "pass@1", "pass@4", "pass@8") for t in TASKS})
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default="runs/tiny-cpu", help="a run to copy records from")
    p.add_argument("--steps", type=int, nargs="+", default=[100, 1_000, 10_000, 50_000], help="run lengths timed")
    args = p.parse_args()
    run = Path(args.run)
    m, v, e = (read_jsonl(run / f"{n}.jsonl") for n in ("metrics", "validation", "events"))
    if m and v:
        print(f"records copied from {run}: {len(m[-1])} keys per step, {len(v[-1])} per validation")
    else:   # no run here yet: records of the same shape (the values do not change the cost)
        m, v, e = [synthetic_step()], [synthetic_validation()], []
        print(f"no records in {run} (`make demo` makes some): synthetic records, {len(m[0])} keys per step, "
              f"{len(v[0])} per validation")
    print(f"{'steps':>7} {'fold at resume s':>17} {'scrape ms':>10} {'exposition KiB':>15} {'figures KiB':>12}")
    for n in args.steps:
        steps = [{**m[i % len(m)], "step": i + 1} for i in range(n)]
        vals = [{**v[i % len(v)], "step": 10 * i} for i in range(n // 10)]
        x = Exporter("bench", n, PrometheusSpec())
        tracemalloc.start()
        t0 = time.perf_counter()
        x.load(steps, vals, e)
        fold_s = time.perf_counter() - t0
        kib = tracemalloc.get_traced_memory()[0] / 1024
        tracemalloc.stop()
        x.scrape()
        t0 = time.perf_counter()
        for _ in range(20):
            text = x.scrape()
        ms = (time.perf_counter() - t0) / 20 * 1e3
        print(f"{n:7d} {fold_s:17.2f} {ms:10.2f} {len(text) / 1024:15.1f} {kib:12.1f}")


if __name__ == "__main__":
    main()
