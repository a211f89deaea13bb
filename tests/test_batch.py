import numpy as np
import pyarrow as pa
import pytest
import torch

from prorl_actors import batch as B


def _rollouts():
    return B.make_rollouts(
        prompt_ids=[[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]], response_ids=[[7, 8], [9], [10, 11, 12], []],
        sample_logp=[[-0.1, -0.2], [-0.3], [-0.4, -0.5, -0.6], []], response_text=["a", "b", "c", ""],
        task=["t"] * 4, item_index=[0, 0, 1, 1], reference=["{}"] * 4, group_id=[0, 0, 1, 1],
        truncated=[False, False, True, True], policy_version=[3] * 4)


def test_schema_and_checks():
    t = _rollouts()
    assert t.schema == B.ROLLOUT_SCHEMA
    B.check_batch(t)
    with pytest.raises(B.BatchSchemaError, match="missing column reward"):
        B.check_batch(t, needs=(B.REWARD,))
    bad = t.set_column(t.column_names.index(B.SAMPLE_LOGP), B.SAMPLE_LOGP,
                       pa.array([[-0.1], [-0.3], [-0.4, -0.5, -0.6], []], pa.list_(pa.float32())))
    with pytest.raises(B.BatchSchemaError, match="not as long as"):
        B.check_batch(bad)
    with pytest.raises(B.BatchSchemaError, match="missing column task"):
        B.check_batch(t.drop_columns([B.TASK]))


def test_added_columns_have_declared_types():
    t = B.with_column(_rollouts(), B.REWARD, [1, 0, 0.5, 0])
    t = B.with_column(t, B.REWARD, [0, 0, 0, 1])  # replace, not duplicate
    assert t.column_names.count(B.REWARD) == 1 and t.schema.field(B.REWARD).type == pa.float32()
    assert t[B.REWARD].to_pylist() == [0, 0, 0, 1]


def test_to_tensors_layout():
    seq = B.to_tensors(_rollouts(), pad_id=0)
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
    sub = seq.rows(torch.tensor([0, 1]))
    assert sub.input_ids.shape == (2, 5) and sub.mask.shape == (2, 2)


def test_padded_list_column():
    t = _rollouts()
    x = B.padded(t[B.SAMPLE_LOGP], width=4)
    torch.testing.assert_close(x, torch.tensor([[-0.1, -0.2, 0, 0], [-0.3, 0, 0, 0], [-0.4, -0.5, -0.6, 0],
                                                [0, 0, 0, 0]]))
    # a sliced table (non-zero offsets) pads the right rows
    torch.testing.assert_close(B.padded(t.slice(2, 2)[B.SAMPLE_LOGP]), torch.tensor([[-0.4, -0.5, -0.6],
                                                                                      [0, 0, 0]]))


def test_select_and_concat():
    t = _rollouts()
    kept = B.select_rows(t, np.array([False, False, True, True]))
    assert kept[B.GROUP_ID].to_pylist() == [1, 1]
    assert B.concat([kept, kept]).num_rows == 4
