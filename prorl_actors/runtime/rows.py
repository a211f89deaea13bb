"""Rows of rollouts, as the producer and the consumer judge them (pure functions on Arrow
tables): which rows have a reward, the rewards trained on (shaped), the rows of a failed
generation, the surplus a batch may begin with, and the staleness bound."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from prorl_actors import batch as rb
from prorl_actors.algo.shaping import length_penalized, length_penalty_on, stop_properly
from prorl_actors.spec import RewardShapingSpec


def shaping_on(rs: RewardShapingSpec) -> bool:
    return rs.stop_properly_coef is not None or rs.length_penalty.mode != "none"


def with_shaped_rewards(rollouts: pa.Table, rs: RewardShapingSpec, max_new_tokens: int, step: int) -> pa.Table:
    """Verified rows made for training step `step` -> the same with SHAPED_REWARD (the verifier's
    reward after the stop-properly and the scheduled length penalty); unchanged when shaping is off."""
    if not shaping_on(rs):
        return rollouts
    r = torch.from_numpy(rollouts[rb.REWARD].to_numpy().astype(np.float32))                      # (B,)
    if rs.stop_properly_coef is not None:
        r = stop_properly(r, torch.tensor(rollouts[rb.TRUNCATED].to_numpy(zero_copy_only=False)),
                          rs.stop_properly_coef)
    lp = rs.length_penalty
    if lp.mode == "cosine":
        lengths = torch.tensor(pc.list_value_length(rollouts[rb.RESPONSE_IDS]).to_numpy())         # (B,)
        r = length_penalized(r, lengths, length_penalty_on(step, lp.period_steps, lp.on_steps), max_new_tokens,
                             lp.min_scale, lp.free_tokens)
    return rb.with_column(rollouts, rb.SHAPED_REWARD, r.numpy())


def train_rewards(rollouts: pa.Table, rs: RewardShapingSpec) -> torch.Tensor:
    """(B,) float32: the rewards the filter and the baselines read: shaped when shaping is on (the
    rows must have been shaped), the verifier's when it is off (a shaped column left by rows made
    before a resume that turned it off is not read)."""
    if shaping_on(rs) and rb.SHAPED_REWARD not in rollouts.column_names:
        raise ValueError("rows without their shaped rewards (with_shaped_rewards) while algorithm.reward_shaping is on")
    col = rb.SHAPED_REWARD if shaping_on(rs) else rb.REWARD
    return torch.tensor(rollouts[col].to_numpy(), dtype=torch.float32)


def usable_surplus(surplus: pa.Table, newest: int, max_staleness: int, G: int) -> tuple[pa.Table, int, int]:
    """Surplus groups (G rows each, POLICY_VERSION the oldest token's) for a step whose learner
    holds at most version `newest` -> (the rows within the bound, groups carried, groups expired)."""
    ok = surplus[rb.POLICY_VERSION].to_numpy() >= newest - max_staleness                # (rows,)
    return rb.select_rows(surplus, ok), int(ok.sum()) // G, int((~ok).sum()) // G


def valid_rows(rollouts: pa.Table) -> torch.Tensor:
    """(B,) bool: the rows whose verification gave a reward (it neither raised nor timed out, and
    their generation did not fail)."""
    bad = rollouts[rb.VERIFY_ERROR].to_numpy(zero_copy_only=False) | rollouts[rb.VERIFY_TIMEOUT].to_numpy(zero_copy_only=False)
    if rb.GENERATE_ERROR in rollouts.column_names:
        bad = bad | rollouts[rb.GENERATE_ERROR].to_numpy(zero_copy_only=False)
    return torch.from_numpy(~bad)


def failed_generation(prompts: pa.Table, G: int, version: int, in_flight: bool = False) -> pa.Table:
    """The rows of prompts whose generation failed: G per prompt, no response, no reward
    (GENERATE_ERROR; left out of baselines, filter and loss like a failed verification), with
    the columns of the verified rows beside them (in_flight: POLICY_VERSION_MAX too)."""
    rep = lambda col: [v for v in prompts[col].to_pylist() for _ in range(G)]  # noqa: E731
    n = prompts.num_rows * G
    t = rb.make_rollouts(prompt_ids=rep(rb.PROMPT_IDS), response_ids=[[]] * n, sample_logp=[[]] * n,
                        response_text=[""] * n, task=rep(rb.TASK), item_index=rep(rb.ITEM_INDEX),
                        reference=rep(rb.REFERENCE), group_id=rep(rb.GROUP_ID), truncated=[False] * n,
                        policy_version=[version] * n)
    if in_flight:
        t = rb.with_column(t, rb.POLICY_VERSION_MAX, [version] * n)
    for col, value in ((rb.REWARD, 0.0), (rb.VERIFY_ERROR, False), (rb.VERIFY_TIMEOUT, False), (rb.FORMATTED, False),
                       (rb.GENERATE_ERROR, True)):
        t = rb.with_column(t, col, [value] * n)
    return t


def check_staleness(rollouts: pa.Table, version: int, max_staleness: int, step: int) -> np.ndarray:
    """Raise if a row was sampled from a version newer than the learner's `version` or more than
    `max_staleness` versions older (a bug: the schedule never allows it) -> (B,) staleness."""
    stale = version - rollouts[rb.POLICY_VERSION].to_numpy()                                       # (B,)
    bad = (stale < 0) | (stale > max_staleness)
    if rb.POLICY_VERSION_MAX in rollouts.column_names:    # in-flight updates: no token newer than the learner
        bad |= rollouts[rb.POLICY_VERSION_MAX].to_numpy() > version
    if bad.any():
        raise RuntimeError(f"step {step}: {int(bad.sum())} rollouts sampled from policy versions "
                           f"{sorted(set(rollouts[rb.POLICY_VERSION].to_numpy()[bad].tolist()))}, outside "
                           f"{max(0, version - max_staleness)}..{version} (supervisor.max_staleness {max_staleness})")
    return stale
