"""Checks per second of each family's verifier, one at a time and through a VerifierActor's
thread pool (in-process: the same code a Ray verifier actor runs).

Items come from the built-in generators (logic: reasoning-gym's aiw and knights_knaves);
half of the responses are the reference answer in the family's format and half are wrong
(the right answer of another item), so both paths of every verifier are timed. Run:

    .venv/bin/python benchmarks/verifiers.py [--items 200] [--threads 4] [--allow-weaker]
"""
from __future__ import annotations

import argparse
import time

import pyarrow as pa

from prorl_actors import batch as rb
from prorl_actors.actors.verifier import VerifierActor
from prorl_actors.config import build_spec
from prorl_actors.tasks import Scorer, validation_items

TASKS = {
    "math": [{"name": "math-arithmetic", "family": "math", "dataset": "arithmetic"},
             {"name": "math-fraction_sum", "family": "math", "dataset": "fraction_sum"}],
    "code": [{"name": "code-stdio", "family": "code", "dataset": "stdio"},
             {"name": "code-function", "family": "code", "dataset": "function"}],
    "stem": [{"name": "stem-elements", "family": "stem", "dataset": "element_symbols"},
             {"name": "stem-kinematics", "family": "stem", "dataset": "kinematics"}],
    "logic": [{"name": "logic-aiw", "family": "logic", "dataset": "aiw"},
              {"name": "logic-knights_knaves", "family": "logic", "dataset": "knights_knaves"}],
    "ifeval": [{"name": "ifeval-short_writing", "family": "ifeval", "dataset": "short_writing"}],
}


def _responses(scorer: Scorer, items):
    rows = []
    for i, it in enumerate(items):
        donor = items[(i + 1) % len(items)] if i % 2 else it   # every other response answers another item
        rows.append((it.task, scorer.completion(donor) or "", it.reference))
    return rows


def _table(rows):
    n = len(rows)
    return pa.table({
        rb.PROMPT_IDS: pa.array([[1]] * n, pa.list_(pa.int32())),
        rb.RESPONSE_IDS: pa.array([[2]] * n, pa.list_(pa.int32())),
        rb.SAMPLE_LOGP: pa.array([[0.0]] * n, pa.list_(pa.float32())),
        rb.RESPONSE_TEXT: [r[1] for r in rows], rb.TASK: [r[0] for r in rows],
        rb.ITEM_INDEX: pa.array(range(n), pa.int64()), rb.REFERENCE: [r[2] for r in rows],
        rb.GROUP_ID: pa.array(range(n), pa.int64()), rb.TRUNCATED: [False] * n,
        rb.POLICY_VERSION: pa.array([0] * n, pa.int64())})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200, help="responses per family")
    ap.add_argument("--threads", type=int, default=4, help="the verifier actor's num_threads")
    ap.add_argument("--allow-weaker", action="store_true",
                    help="the code family's sandbox runs even if an isolation layer is missing here (logged)")
    args = ap.parse_args()
    print(f"{'family':8}{'checks':>8}{'1 thread/s':>12}{f'{args.threads} threads/s':>13}{'reward mean':>13}"
          f"{'errors':>8}")
    for family, tasks in TASKS.items():
        spec = build_spec({"data": {"tasks": tasks}, "verifier": {"num_threads": args.threads,
                                                                 "code": {"allow_weaker": args.allow_weaker}}})
        items = validation_items(spec.data, args.items // len(tasks))
        actor = VerifierActor(spec.data, spec.verifier)
        rows = _responses(actor.scorer, items)
        # warm-up: start the helper processes (math-verify's child, the sandbox's workers)
        for task in {t for t, _, _ in rows}:
            first = next(r for r in rows if r[0] == task)
            actor.scorer.score(*first)
        t0 = time.perf_counter()
        for task, text, ref in rows:
            actor._score_one(task, text, ref)
        serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = actor.verify(_table(rows))
        pooled = time.perf_counter() - t0
        errors = sum(out[rb.VERIFY_ERROR].to_pylist()) + sum(out[rb.VERIFY_TIMEOUT].to_pylist())
        reward = sum(out[rb.REWARD].to_pylist()) / len(rows)
        print(f"{family:8}{len(rows):8d}{len(rows) / serial:12.0f}{len(rows) / pooled:13.0f}{reward:13.2f}"
              f"{errors:8d}", flush=True)
        actor.close()


if __name__ == "__main__":
    main()
