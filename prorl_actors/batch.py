"""The rollout batch: one Arrow table that travels generator -> verifier -> supervisor ->
reference -> learner through the Ray object store (pyarrow buffers are shared, not copied).

Rows are samples; the G samples of one prompt are consecutive rows sharing `group_id`.
Columns are named constants, so no code indexes a batch by a magic string twice. The
generator fills the sampling columns, the verifier adds `reward`, the supervisor adds
`adv` and the reference adds `ref_logp`. `to_tensors` turns a table into padded torch
tensors for the learner and the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

# --- column names
PROMPT_IDS = "prompt_ids"          # list<int32>  the tokenized chat prompt
RESPONSE_IDS = "response_ids"      # list<int32>  sampled tokens (eos included when it stopped)
SAMPLE_LOGP = "sample_logp"        # list<float32> per-token logprob reported by the sampler
RESPONSE_TEXT = "response_text"    # string       decoded response (what verifiers read)
TASK = "task"                      # string       task name in the run
ITEM_INDEX = "item_index"          # int64        item index in the task's stream
REFERENCE = "reference"            # string       JSON the task's verifier needs
GROUP_ID = "group_id"              # int64        one id per prompt within a step
TRUNCATED = "truncated"            # bool         stopped by max_new_tokens, not eos
POLICY_VERSION = "policy_version"  # int64        weights version the sample came from
REWARD = "reward"                  # float32      verifier reward in [0, 1]
VERIFY_ERROR = "verify_error"      # bool         the verifier raised (reward set to 0)
VERIFY_TIMEOUT = "verify_timeout"  # bool         the verifier ran past its limit (reward set to 0)
FORMATTED = "formatted"            # bool         the response gave an answer in its family's format
ADV = "adv"                        # float32      group-relative advantage
REF_LOGP = "ref_logp"              # list<float32> reference policy logprob per response token

ROLLOUT_SCHEMA = pa.schema([
    (PROMPT_IDS, pa.list_(pa.int32())),
    (RESPONSE_IDS, pa.list_(pa.int32())),
    (SAMPLE_LOGP, pa.list_(pa.float32())),
    (RESPONSE_TEXT, pa.string()),
    (TASK, pa.string()),
    (ITEM_INDEX, pa.int64()),
    (REFERENCE, pa.string()),
    (GROUP_ID, pa.int64()),
    (TRUNCATED, pa.bool_()),
    (POLICY_VERSION, pa.int64()),
])
# columns added downstream, with their types
ADDED_COLUMNS = {
    REWARD: pa.float32(),
    VERIFY_ERROR: pa.bool_(),
    VERIFY_TIMEOUT: pa.bool_(),
    FORMATTED: pa.bool_(),
    ADV: pa.float32(),
    REF_LOGP: pa.list_(pa.float32()),
}


class BatchSchemaError(ValueError):
    pass


def check_batch(table: pa.Table, needs: tuple[str, ...] = ()) -> None:
    """Raise BatchSchemaError unless `table` has the rollout columns (+ `needs`) with the
    right types and per-token lists as long as the responses."""
    problems = []
    for f in ROLLOUT_SCHEMA:
        if f.name not in table.column_names:
            problems.append(f"missing column {f.name}")
        elif table.schema.field(f.name).type != f.type:
            problems.append(f"column {f.name} is {table.schema.field(f.name).type}, expected {f.type}")
    for name in needs:
        if name not in table.column_names:
            problems.append(f"missing column {name}")
        elif table.schema.field(name).type != ADDED_COLUMNS[name]:
            problems.append(f"column {name} is {table.schema.field(name).type}, expected {ADDED_COLUMNS[name]}")
    if not problems:
        n_resp = pc.list_value_length(table[RESPONSE_IDS])
        for name in (SAMPLE_LOGP, REF_LOGP):
            if name in table.column_names and not pc.all(
                    pc.equal(pc.list_value_length(table[name]), n_resp)).as_py():
                problems.append(f"column {name} is not as long as {RESPONSE_IDS} in every row")
    if problems:
        raise BatchSchemaError("; ".join(problems))


def make_rollouts(*, prompt_ids, response_ids, sample_logp, response_text, task, item_index,
                  reference, group_id, truncated, policy_version) -> pa.Table:
    """Build a rollout table from python lists (one entry per sample)."""
    cols = dict(prompt_ids=prompt_ids, response_ids=response_ids, sample_logp=sample_logp,
                response_text=response_text, task=task, item_index=item_index, reference=reference,
                group_id=group_id, truncated=truncated, policy_version=policy_version)
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in ROLLOUT_SCHEMA})


PROMPT_COLUMNS = (PROMPT_IDS, TASK, ITEM_INDEX, REFERENCE, GROUP_ID)


def make_prompts(items, tokenizer, max_prompt_tokens: int, first_group_id: int) -> tuple[pa.Table, list]:
    """Task items (tasks.Item) -> (prompt table: one row per prompt, group ids counted from
    `first_group_id`; [(item, why)] for each prompt longer than `max_prompt_tokens`)."""
    rows, rejected = {c: [] for c in PROMPT_COLUMNS}, []
    for it in items:
        text = tokenizer.apply_chat_template(it.messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            rejected.append((it, f"{len(ids)} tokens > {max_prompt_tokens}"))
            continue
        for c, v in zip(PROMPT_COLUMNS, (ids, it.task, it.index, it.reference, first_group_id + len(rows[GROUP_ID]))):
            rows[c].append(v)
    types = {f.name: f.type for f in ROLLOUT_SCHEMA}
    return pa.table({c: pa.array(rows[c], types[c]) for c in PROMPT_COLUMNS}), rejected


def with_column(table: pa.Table, name: str, values) -> pa.Table:
    """Add (or replace) one of the downstream columns with its declared type."""
    arr = values if isinstance(values, pa.Array) else pa.array(values, type=ADDED_COLUMNS[name])
    if arr.type != ADDED_COLUMNS[name]:
        raise BatchSchemaError(f"column {name} must be {ADDED_COLUMNS[name]}, got {arr.type}")
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(pa.field(name, ADDED_COLUMNS[name]), arr)


def select_rows(table: pa.Table, keep: np.ndarray | torch.Tensor) -> pa.Table:
    """Rows where the (B,) bool mask `keep` is true."""
    keep = np.asarray(keep, dtype=bool)
    return table.filter(pa.array(keep))


def concat(tables: list[pa.Table]) -> pa.Table | None:
    return pa.concat_tables(tables, promote_options="none") if tables else None


def _lists(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets (B+1,)) of a list column, zero-copy where Arrow allows."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def padded(col: pa.ChunkedArray, width: int | None = None, fill=0, dtype=torch.float32) -> torch.Tensor:
    """A list column as a right-padded (B, width) tensor."""
    values, offsets = _lists(col)
    lengths = np.diff(offsets)
    width = int(lengths.max(initial=0)) if width is None else width
    out = torch.full((len(lengths), width), fill, dtype=dtype)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
    out[torch.from_numpy(rows), torch.from_numpy(cols)] = torch.as_tensor(np.array(values), dtype=dtype)
    return out


@dataclass
class SeqTensors:
    """A batch laid out for a causal LM: [prompt | response | pad] per row.

    Logits at position p predict token p+1; `resp_pos[i, t]` is the position whose logits
    predict response token t of row i, so `logp[i, t] = log_softmax(logits[i, resp_pos[i, t]])
    [response[i, t]]`.
    """
    input_ids: torch.Tensor       # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    response: torch.Tensor        # (B, T) long, response tokens (0 where masked)
    resp_pos: torch.Tensor        # (B, T) long
    mask: torch.Tensor            # (B, T) float, 1 on real response tokens

    def rows(self, idx: torch.Tensor, width: int | None = None) -> "SeqTensors":
        """A sub-batch, trimmed to its own longest sequence; with `width`, its token axis is
        exactly `width` (zero-padded, mask 0) whatever the lengths."""
        L = int(self.attention_mask[idx].sum(1).max())
        T = max(int(self.mask[idx].sum(1).max()), 1)
        sub = SeqTensors(self.input_ids[idx, :L], self.attention_mask[idx, :L], self.response[idx, :T],
                         self.resp_pos[idx, :T], self.mask[idx, :T])
        if width is None:
            return sub
        if width < T:
            raise ValueError(f"responses of {T} tokens do not fit width {width}")
        pad = lambda x: torch.nn.functional.pad(x, (0, width - T))  # noqa: E731
        return SeqTensors(sub.input_ids, sub.attention_mask, pad(sub.response), pad(sub.resp_pos), pad(sub.mask))

    def to(self, device: torch.device) -> "SeqTensors":
        return SeqTensors(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.response,
                                                    self.resp_pos, self.mask)))


def to_tensors(table: pa.Table, pad_id: int) -> SeqTensors:
    p_vals, p_off = _lists(table[PROMPT_IDS])
    r_vals, r_off = _lists(table[RESPONSE_IDS])
    p_len, r_len = np.diff(p_off), np.diff(r_off)
    B, L, T = len(p_len), int((p_len + r_len).max(initial=1)), int(r_len.max(initial=1))
    T = max(T, 1)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    response = torch.zeros((B, T), dtype=torch.long)
    resp_pos = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T))
    for i in range(B):
        p = p_vals[p_off[i]:p_off[i + 1]]
        r = r_vals[r_off[i]:r_off[i + 1]]
        n_p, n_r = len(p), len(r)
        input_ids[i, :n_p] = torch.from_numpy(p.astype(np.int64))
        input_ids[i, n_p:n_p + n_r] = torch.from_numpy(r.astype(np.int64))
        attn[i, :n_p + n_r] = 1
        response[i, :n_r] = torch.from_numpy(r.astype(np.int64))
        resp_pos[i, :n_r] = torch.arange(n_p - 1, n_p - 1 + n_r)
        mask[i, :n_r] = 1.0
    return SeqTensors(input_ids, attn, response, resp_pos, mask)
