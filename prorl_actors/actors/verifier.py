"""VerifierActor: scores each response with its task family's verifier.

Responses are scored `num_threads` at a time (code runs in the sandbox's worker processes,
math-verify in its own child process). A verifier that raises, or runs past `timeout_s`,
gives reward 0 and flags the row (`verify_error` / `verify_timeout`), and the actor counts
both per task: one bad response or one buggy verifier never stops a run and is never silent.
A scoring thread stuck past its limit cannot be killed; it is abandoned and counted
(`stuck_threads`) and the pool gets a fresh thread for the next batch.
"""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import pyarrow as pa

from prorl_actors import batch as rb
from prorl_actors.quiet import quiet_known_noise
from prorl_actors.roles import RoleActor
from prorl_actors.spec import DataSpec, TaskSpec, VerifierSpec
from prorl_actors.tasks import Scorer
from prorl_actors.tasks.mathcheck import CheckTimeout


class VerifierActor(RoleActor):
    def __init__(self, data: DataSpec, verifier: VerifierSpec | None = None, extra_tasks: list[TaskSpec] = ()):
        quiet_known_noise()
        self.spec = verifier or VerifierSpec()
        self.scorer = Scorer(data, self.spec, extra_tasks)
        self.pool = ThreadPoolExecutor(self.spec.num_threads, thread_name_prefix="verify")
        self.counts = {"errors": Counter(), "timeouts": Counter(), "scored": Counter()}
        self.last_errors: list[str] = []   # the latest few, for people
        self.stuck_threads = 0

    def _score_one(self, task: str, text: str, ref: str) -> tuple[float, str]:
        """-> (reward, "ok" | "error" | "timeout"); never raises."""
        try:
            r = float(self.scorer.score(task, text, ref))
            if not 0.0 <= r <= 1.0:  # NaN fails this too
                raise ValueError(f"reward {r} outside [0, 1]")
            return r, "ok"
        except CheckTimeout:
            return 0.0, "timeout"
        except Exception as e:  # noqa: BLE001 - any verifier failure is reward 0, counted
            self.last_errors = (self.last_errors + [f"{task}: {type(e).__name__}: {e}"[:300]])[-5:]
            return 0.0, "error"

    def _timed(self, started: list, task: str, text: str, ref: str) -> tuple[float, str]:
        started.append(time.monotonic())
        return self._score_one(task, text, ref)

    def _result(self, future, started: list) -> tuple[float, str]:
        """The future's result, or a timeout `timeout_s` after it *started* (a response queued
        behind others is not charged for their time)."""
        while True:
            remaining = (started[0] + self.spec.timeout_s - time.monotonic()) if started else 0.5
            try:
                return future.result(timeout=max(remaining, 0.0))
            except FutureTimeout:
                if started and time.monotonic() >= started[0] + self.spec.timeout_s:
                    self.stuck_threads += 1
                    return 0.0, "timeout"

    def verify(self, rollouts: pa.Table) -> pa.Table:
        tasks = rollouts[rb.TASK].to_pylist()
        texts = rollouts[rb.RESPONSE_TEXT].to_pylist()
        refs = rollouts[rb.REFERENCE].to_pylist()
        starts = [[] for _ in tasks]
        futures = [self.pool.submit(self._timed, st, t, x, r) for st, t, x, r in zip(starts, tasks, texts, refs)]
        rewards, status = [], []
        for f, st in zip(futures, starts):
            r, s = self._result(f, st)
            rewards.append(r)
            status.append(s)
        if any(s == "timeout" and not f.done() for s, f in zip(status, futures)):
            self._fresh_pool()
        for t, s in zip(tasks, status):
            self.counts["scored"][t] += 1
            if s != "ok":
                self.counts["errors" if s == "error" else "timeouts"][t] += 1
        formatted = [self._formatted(t, x) for t, x in zip(tasks, texts)]
        out = rb.with_column(rollouts, rb.REWARD, rewards)
        out = rb.with_column(out, rb.VERIFY_ERROR, [s == "error" for s in status])
        out = rb.with_column(out, rb.VERIFY_TIMEOUT, [s == "timeout" for s in status])
        return rb.with_column(out, rb.FORMATTED, formatted)

    def _formatted(self, task: str, text: str) -> bool:
        try:
            return bool(self.scorer.formatted(task, text))
        except Exception:  # noqa: BLE001 - a format check is a statistic, never a failure
            return False

    def _fresh_pool(self) -> None:
        """Leave stuck threads behind (they finish or not; their results are ignored)."""
        old, self.pool = self.pool, ThreadPoolExecutor(self.spec.num_threads, thread_name_prefix="verify")
        old.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict:
        """Counts per task since the actor started, and the latest errors."""
        return {k: dict(v) for k, v in self.counts.items()} | {"stuck_threads": self.stuck_threads,
                                                                 "last_errors": list(self.last_errors)}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.scorer.close()
