import numpy as np
import pyarrow as pa
import pytest
import torch

from prorl_actors import batch as rb


def _rollouts():
    return rb.make_rollouts(
        prompt_ids=[[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]], response_ids=[[7, 8], [9], [10, 11, 12], []],
        sample_logp=[[-0.1, -0.2], [-0.3], [-0.4, -0.5, -0.6], []], response_text=["a", "b", "c", ""],
        task=["t"] * 4, item_index=[0, 0, 1, 1], reference=["{}"] * 4, group_id=[0, 0, 1, 1],
        truncated=[False, False, True, True], policy_version=[3] * 4)


def test_schema_and_checks():
    t = _rollouts()
    assert t.schema == rb.ROLLOUT_SCHEMA
    rb.check_batch(t)
    with pytest.raises(rb.BatchSchemaError, match="missing column reward"):
        rb.check_batch(t, needs=(rb.REWARD,))
    bad = t.set_column(t.column_names.index(rb.SAMPLE_LOGP), rb.SAMPLE_LOGP,
                       pa.array([[-0.1], [-0.3], [-0.4, -0.5, -0.6], []], pa.list_(pa.float32())))
    with pytest.raises(rb.BatchSchemaError, match="not as long as"):
        rb.check_batch(bad)
    with pytest.raises(rb.BatchSchemaError, match="missing column task"):
        rb.check_batch(t.drop_columns([rb.TASK]))


def test_added_columns_have_declared_types():
    t = rb.with_column(_rollouts(), rb.REWARD, [1, 0, 0.5, 0])
    t = rb.with_column(t, rb.REWARD, [0, 0, 0, 1])  # replace, not duplicate
    assert t.column_names.count(rb.REWARD) == 1 and t.schema.field(rb.REWARD).type == pa.float32()
    assert t[rb.REWARD].to_pylist() == [0, 0, 0, 1]


def test_to_tensors_layout():
    seq = rb.to_tensors(_rollouts(), pad_id=0)
    assert seq.input_ids.tolist() == [[1, 2, 3, 7, 8], [1, 2, 3, 9, 0], [4, 5, 10, 11, 12], [4, 5, 0, 0, 0]]
    assert seq.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert seq.response.tolist() == [[7, 8, 0], [9, 0, 0], [10, 11, 12], [0, 0, 0]]
    # logits at position p predict token p + 1
    assert seq.resp_pos.tolist() == [[2, 3, 0], [2, 0, 0], [1, 2, 3], [0, 0, 0]]
    assert seq.mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]
    for i in range(4):  # the response token really sits right after its predicting position
        for t in range(3):
            if seq.mask[i, t]:
                assert seq.input_ids[i, seq.resp_pos[i, t] + 1] == seq.response[i, t]
    assert seq.prompt_len.tolist() == [3, 3, 2, 2]
    sub = seq.rows(torch.tensor([0, 1]))
    assert sub.input_ids.shape == (2, 5) and sub.mask.shape == (2, 2)
    assert rb.group_bounds(_rollouts()).tolist() == [0, 2, 4]
    assert rb.group_bounds(rb.select_rows(_rollouts(), np.array([True, False, True, True]))).tolist() == [0, 1, 3]


def test_shared_prompt_layout():
    """Each prompt once; the responses' inputs are their tokens but the last (the prompt's last
    position predicts token 0)."""
    seq = rb.to_tensors(_rollouts(), pad_id=0)
    sp = rb.share_prompts(seq, [np.array([0, 1]), np.array([2, 3])])
    assert sp.prompt_ids.tolist() == [[1, 2, 3], [4, 5, 0]] and sp.prompt_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert sp.prompt_len.tolist() == [3, 2] and sp.group.tolist() == [0, 0, 1, 1]
    assert sp.resp_in.tolist() == [[7, 0], [0, 0], [10, 11], [0, 0]]
    assert sp.resp_in_mask.tolist() == [[1, 0], [0, 0], [1, 1], [0, 0]]
    assert sp.response.tolist() == seq.response.tolist() and sp.mask.tolist() == seq.mask.tolist()
    # units in another order: rows follow the units
    sp = rb.share_prompts(seq, [np.array([2]), np.array([0, 1])])
    assert sp.group.tolist() == [0, 1, 1] and sp.prompt_ids.tolist() == [[4, 5, 0], [1, 2, 3]]


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("max_tokens", [None, 40, 150, 10_000])
def test_micro_batch_plans(share, world, max_tokens):
    """Every row on one rank, once; as many passes on every rank; each pass within the budget
    (unless one row alone exceeds it); with prompts shared, a unit is rows of one group; the
    ranks' token loads are balanced."""
    rng = np.random.default_rng(world)
    gid = np.repeat(np.arange(9), 4)
    plen = np.repeat(rng.integers(10, 40, 9), 4)
    rlen = rng.integers(0, 20, 36)
    rows = np.arange(2, 34)                                          # a mini-batch's rows
    plans = rb.plan_micro_batches(rows, gid, plen, rlen, world, max_tokens, 5, share)
    assert len(plans) == world and len({len(p) for p in plans}) == 1
    got = sorted(int(i) for p in plans for m in p for u in m for i in u)
    assert got == rows.tolist()
    for plan in plans:
        for m in plan:
            for u in m:
                assert len(set(gid[u])) == 1 if share else len(u) == 1
            if m and max_tokens is not None:
                computed, real = rb.pass_positions(m, plen, rlen, share)
                assert real <= computed
                big = max(int(plen[u[0]] + rlen[u].max()) for u in m)
                assert computed <= max_tokens or (sum(len(u) for u in m) == 1 and big > max_tokens)
            if max_tokens is None and m:
                assert sum(len(u) for u in m) <= 5
    if max_tokens == 10_000 and world > 1:                         # one pass per rank: loads within a unit
        loads = [rb.pass_positions(p[0], plen, rlen, share)[1] if p[0] else 0 for p in plans]
        assert max(loads) - min(loads) <= max(plen) + max(rlen) * (4 if share else 1)


def test_token_budget_cuts_padding():
    """Rows sorted by length: a budget leaves little padding where rows in order leave much."""
    rng = np.random.default_rng(0)
    plen, rlen = rng.integers(20, 80, 64), rng.integers(1, 16, 64)
    rows, gid = np.arange(64), np.arange(64)
    by_rows = rb.plan_micro_batches(rows, gid, plen, rlen, 1, None, 16, False)[0]
    by_tokens = rb.plan_micro_batches(rows, gid, plen, rlen, 1, 16 * 95, 16, False)[0]
    pad = lambda plan: 1 - sum(rb.pass_positions(m, plen, rlen, False)[1] for m in plan) / \
        sum(rb.pass_positions(m, plen, rlen, False)[0] for m in plan)                      # noqa: E731
    assert pad(by_tokens) < 0.5 * pad(by_rows) and pad(by_tokens) < 0.1


def test_padded_list_column():
    t = _rollouts()
    x = rb.padded(t[rb.SAMPLE_LOGP], width=4)
    torch.testing.assert_close(x, torch.tensor([[-0.1, -0.2, 0, 0], [-0.3, 0, 0, 0], [-0.4, -0.5, -0.6, 0],
                                                [0, 0, 0, 0]]))
    # a sliced table (non-zero offsets) pads the right rows
    torch.testing.assert_close(rb.padded(t.slice(2, 2)[rb.SAMPLE_LOGP]), torch.tensor([[-0.4, -0.5, -0.6],
                                                                                      [0, 0, 0]]))


def test_select_and_concat():
    t = _rollouts()
    kept = rb.select_rows(t, np.array([False, False, True, True]))
    assert kept[rb.GROUP_ID].to_pylist() == [1, 1]
    assert rb.concat([kept, kept]).num_rows == 4
