"""VerifierActor: scores each response with its task's verifier.

A verifier that raises gives reward 0 and the row is flagged (`verify_error`), so one bad
response or one buggy verifier never stops a run and is never silent."""
from __future__ import annotations

import pyarrow as pa

from prorl_actors import batch as B
from prorl_actors.spec import DataSpec
from prorl_actors.tasks import Scorer


class VerifierActor:
    def __init__(self, data: DataSpec):
        self.scorer = Scorer(data)

    def verify(self, rollouts: pa.Table) -> pa.Table:
        rewards, errors = [], []
        for task, text, ref in zip(rollouts[B.TASK].to_pylist(), rollouts[B.RESPONSE_TEXT].to_pylist(),
                                   rollouts[B.REFERENCE].to_pylist()):
            try:
                r = float(self.scorer.score(task, text, ref))
                if not 0.0 <= r <= 1.0:  # NaN fails this too
                    raise ValueError(f"reward {r} outside [0, 1]")
                rewards.append(r)
                errors.append(False)
            except Exception:
                rewards.append(0.0)
                errors.append(True)
        out = B.with_column(rollouts, B.REWARD, rewards)
        return B.with_column(out, B.VERIFY_ERROR, errors)

    def ping(self) -> str:
        return "ok"
