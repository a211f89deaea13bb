"""What surviving costs, on the demo spec (vLLM on CPU, the embedded tiny model, 2 cores).

One run of `prorl train` in which, one after another, a generator, a verifier, the reference
and the learner are SIGKILLed in the middle of their work, then the driver gets SIGTERM; a
second start resumes and finishes. Prints the seconds each recovery took (from events.jsonl
and the driver's log), the checkpoint's write time and size, SIGTERM-to-exit and the
resumed start-up.

    .venv/bin/python benchmarks/recovery.py [--out runs/bench_recovery] [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prorl_actors.metrics import read_jsonl  # noqa: E402
from tests.test_survival import Driver, _steps_done  # noqa: E402

KILLS = [("ray::GeneratorActor.generate", 1), ("ray::VerifierActor.verify", 2),
         ("ray::ReferenceActor.logprobs", 3), ("ray::LearnerActor.update", 4)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_recovery")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run = out / "run"
    args = [sys.executable, "-m", "prorl_actors.cli", "train", "specs/tiny-cpu.yaml", f"output_dir={out}", "name=run",
            "num_steps=8", "checkpoint.every_steps=2", "validation.every_steps=0", *a.overrides]
    d = Driver(args, out / "log1.txt")
    for title, after in KILLS:        # in the first such call after that step is recorded
        pid = d.kill(d.catch(title, when=lambda: _steps_done(run) >= after, timeout=900))
        print(f"killed {title} (pid {pid}) after step {after}", flush=True)
    d.catch("ray::GeneratorActor.generate", when=lambda: _steps_done(run) >= 6, timeout=900)   # step 7's generation
    t_term = time.time()
    os.kill(d.proc.pid, signal.SIGTERM)
    rc = d.wait(600)
    term_s = time.time() - t_term
    assert rc == 0, d.text()[-3000:]
    t_resume = time.time()
    d2 = Driver(args, out / "log2.txt")
    assert d2.wait(900) == 0, d2.text()[-3000:]
    resume_total_s = time.time() - t_resume

    events = read_jsonl(run / "events.jsonl")
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 9)), [m["step"] for m in metrics]
    step_s = statistics.median(m["step_s"] for m in metrics)
    print(f"\ndemo spec, 8 steps; median step {step_s:.2f} s")
    print(f"{'recovery':44}{'seconds':>10}")
    for e in events:
        if e["event"] == "actor_restarted":
            print(f"  {e['role']} replaced (step {e['step']}){'':{max(0, 22 - len(e['role']))}}{e['restart_s']:10.2f}")
    for e in events:
        if e["event"] == "rolled_back":
            lost = sum(m["step_s"] for m in metrics if e["to_step"] < m["step"] <= e["step"])
            print(f"  learner lost at step {e['step']}: rolled back to {e['to_step']}, steps redone ~{lost:.2f} s")
    for m in metrics:
        if any(e["event"] == "actor_died" and e["step"] == m["step"] for e in events):
            print(f"  step {m['step']} with a death took {m['step_s']:.2f} s (median {step_s:.2f})")
    ck = [e for e in events if e["event"] == "checkpoint"]
    size = sum(f.stat().st_size for f in (run / "checkpoints").rglob("*") if f.is_file()) / \
        max(1, len(list((run / "checkpoints").iterdir())))
    print(f"  checkpoint write (median of {len(ck)})          {statistics.median(e['seconds'] for e in ck):10.3f}"
          f"   ({size / 2**20:.1f} MiB each)")
    pre = next(e for e in events if e["event"] == "preempted")
    print(f"  SIGTERM to checkpoint committed (step {pre['step']})     {pre['time'] - t_term:10.2f}")
    print(f"  SIGTERM to exit (driver, incl. Ray shutdown)   {term_s:10.2f}")
    up = [float(x) for x in re.findall(r"actors up in ([0-9.]+)s", d.text() + d2.text())]
    first = float(re.search(rf"\[\s*(\d+)s\] step\s+{pre['step'] + 1}/8", d2.text()).group(1))
    print(f"  actors up: fresh {up[0]:.1f} s, resumed {up[1]:.1f} s; resumed run's first step at {first:.0f} s "
          f"after its start, whole resumed run {resume_total_s:.1f} s")
    print(f"\nrecords: {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
