"""The rollout batch: one Arrow table that travels generator -> verifier -> supervisor ->
reference -> learner through the Ray object store (pyarrow buffers are shared, not copied).

Rows are samples; the G samples of one prompt are consecutive rows sharing `group_id`.
Columns are named constants, so no code indexes a batch by a magic string twice. The
generator fills the sampling columns, the verifier adds `reward`, the supervisor adds
`adv` and the reference adds `ref_logp`. `to_tensors` turns a table into padded torch
tensors for the learner and the reference.

Imported as `rb` ("rollout batch": `rb.REWARD`, `rb.to_tensors`), never as `B`, which is the
batch dimension in the shape comments.
"""
from __future__ import annotations

import dataclasses
import math
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
POLICY_VERSION = "policy_version"  # int64        weights version the sample came from (in-flight updates:
                                   #              the oldest of its tokens')
POLICY_VERSION_MAX = "policy_version_max"   # int64 in-flight updates: the newest version of its tokens
REWARD = "reward"                  # float32      verifier reward in [0, 1]
VERIFY_ERROR = "verify_error"      # bool         the verifier raised (reward set to 0)
VERIFY_TIMEOUT = "verify_timeout"  # bool         the verifier ran past its limit (reward set to 0)
FORMATTED = "formatted"            # bool         the response gave an answer in its family's format
GENERATE_ERROR = "generate_error"  # bool         its generation failed (no response; not verified)
ADV = "adv"                        # float32      group-relative advantage
REF_LOGP = "ref_logp"              # list<float32> reference policy logprob per response token
SHAPED_REWARD = "shaped_reward"    # float32      the reward after algorithm.reward_shaping (only when it is on):
                                   #              what the filter and the baselines read

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
# columns added downstream, with their types, in the order a producer's rows get them (in-flight
# decoding adds POLICY_VERSION_MAX before verification): `in_column_order` aligns carried or
# restored rows with fresh ones, which concatenate only in the same order
ADDED_COLUMNS = {
    POLICY_VERSION_MAX: pa.int64(),
    REWARD: pa.float32(),
    VERIFY_ERROR: pa.bool_(),
    VERIFY_TIMEOUT: pa.bool_(),
    FORMATTED: pa.bool_(),
    ADV: pa.float32(),
    REF_LOGP: pa.list_(pa.float32()),
    GENERATE_ERROR: pa.bool_(),
    SHAPED_REWARD: pa.float32(),
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


def in_column_order(table: pa.Table) -> pa.Table:
    """`table`'s columns in the declared order (the schema's, then the added ones'), so that
    tables made apart concatenate."""
    order = [f.name for f in ROLLOUT_SCHEMA] + list(ADDED_COLUMNS)
    names = [c for c in order if c in table.column_names] + [c for c in table.column_names if c not in order]
    return table.select(names) if names != table.column_names else table


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
    prompt_len: torch.Tensor | None = None   # (B,) long

    def rows(self, idx: torch.Tensor) -> "SeqTensors":
        """A sub-batch, trimmed to its own longest sequence and longest response."""
        L = int(self.attention_mask[idx].sum(1).max())
        T = max(int(self.mask[idx].sum(1).max()), 1)
        plen = self.prompt_len[idx] if self.prompt_len is not None else None
        return SeqTensors(self.input_ids[idx, :L], self.attention_mask[idx, :L], self.response[idx, :T],
                          self.resp_pos[idx, :T], self.mask[idx, :T], plen)

    def to(self, device: torch.device) -> "SeqTensors":
        return SeqTensors(*(t.to(device) if t is not None else None for t in (
            self.input_ids, self.attention_mask, self.response, self.resp_pos, self.mask, self.prompt_len)))


@dataclass
class SharedPrompts:
    """Rows laid out so that each prompt goes through the model once for all of its responses
    (the G samples of a GRPO group share their prompt): a prompt pass over the distinct prompts,
    whose keys and values every response row then attends to. Response token 0 is predicted by
    its prompt's last position, token t > 0 by response position t - 1, so a row's last token is
    never an input. Scores the same tokens as the `SeqTensors` of the same rows, in the same
    row-major order; on the demo (prompts of ~73 tokens, responses of ~6, G = 8) it runs about
    a fifth of the positions."""
    prompt_ids: torch.Tensor      # (g, P) long, right-padded
    prompt_mask: torch.Tensor     # (g, P) long
    prompt_len: torch.Tensor      # (g,) long
    resp_in: torch.Tensor         # (b, R) long: each row's response tokens but its last, right-padded
    resp_in_mask: torch.Tensor    # (b, R) long
    group: torch.Tensor           # (b,) long: the prompt of each row
    response: torch.Tensor        # (b, T) long: the tokens scored
    mask: torch.Tensor            # (b, T) float

    def to(self, device: torch.device) -> "SharedPrompts":
        return SharedPrompts(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def share_prompts(seq: SeqTensors, units: list[np.ndarray]) -> SharedPrompts:
    """The rows of `units` (arrays of row indices; the rows of one unit share their prompt) in
    the shared-prompt layout, rows in the order of the units."""
    rows = torch.from_numpy(np.concatenate(units))                                  # (b,)
    first = torch.from_numpy(np.array([u[0] for u in units], dtype=np.int64))      # (g,)
    plen = seq.prompt_len[first]                                                    # (g,)
    P = int(plen.max())
    pmask = (torch.arange(P) < plen[:, None]).long()                                # (g, P)
    prompt_ids = seq.input_ids[first, :P] * pmask
    rlen = seq.mask[rows].sum(1).long()                                             # (b,)
    T = max(int(rlen.max()), 1)
    R = max(T - 1, 0)
    rmask = (torch.arange(R) < (rlen - 1)[:, None]).long()                          # (b, R)
    group = torch.from_numpy(np.repeat(np.arange(len(units)), [len(u) for u in units]))
    return SharedPrompts(prompt_ids, pmask, plen, seq.response[rows, :R] * rmask, rmask, group,
                         seq.response[rows, :T], seq.mask[rows, :T])


def to_tensors(table: pa.Table, pad_id: int) -> SeqTensors:
    """The batch as right-padded [prompt | response | pad] rows (no Python loop over rows)."""
    p_vals, p_off = _lists(table[PROMPT_IDS])
    r_vals, r_off = _lists(table[RESPONSE_IDS])
    p_len, r_len = np.diff(p_off), np.diff(r_off)                                   # (B,), (B,)
    B, L, T = len(p_len), int((p_len + r_len).max(initial=1)), max(int(r_len.max(initial=1)), 1)
    rows_p = np.repeat(np.arange(B), p_len)                                         # (sum p_len,)
    cols_p = np.arange(len(p_vals)) - np.repeat(p_off[:-1], p_len)                  # position in the prompt
    rows_r = np.repeat(np.arange(B), r_len)                                         # (sum r_len,)
    cols_r = np.arange(len(r_vals)) - np.repeat(r_off[:-1], r_len)                  # position in the response
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    input_ids[rows_p, cols_p] = torch.from_numpy(p_vals.astype(np.int64))
    input_ids[rows_r, cols_r + p_len[rows_r]] = torch.from_numpy(r_vals.astype(np.int64))
    attn = (torch.arange(L) < torch.from_numpy(p_len + r_len)[:, None]).long()      # (B, L)
    mask = (torch.arange(T) < torch.from_numpy(r_len)[:, None])                     # (B, T) bool
    response = torch.zeros((B, T), dtype=torch.long)
    response[rows_r, cols_r] = torch.from_numpy(r_vals.astype(np.int64))
    resp_pos = (torch.from_numpy(p_len - 1)[:, None] + torch.arange(T)) * mask      # (B, T)
    return SeqTensors(input_ids, attn, response, resp_pos.long(), mask.float(), torch.from_numpy(p_len.astype(np.int64)))


def group_bounds(table: pa.Table) -> np.ndarray:
    """(groups + 1,) row offsets of the groups: runs of consecutive rows sharing GROUP_ID (G rows
    each as generated; fewer where rows were left out, e.g. truncated ones under overlong mask)."""
    gid = table[GROUP_ID].to_numpy()
    starts = np.flatnonzero(np.diff(gid)) + 1
    return np.concatenate([[0], starts, [len(gid)]]).astype(np.int64) if len(gid) else np.zeros(1, np.int64)


# ------------------------------------------------------------------ micro-batches
# A micro-batch is a list of units: arrays of row indices whose rows share one prompt pass (the
# rows of one group, or a fragment of them, with prompts shared; else one row each). What a pass
# costs is the positions it computes, padding included:
#   rows alone:      rows x longest (prompt + response)
#   prompts shared:  prompts x longest prompt + rows x (longest response - 1)

def prompt_units(group_ids: np.ndarray, rows: np.ndarray, share: bool) -> list[np.ndarray]:
    """`rows` (global indices, in order) -> units: runs of consecutive rows of one group when
    prompts are shared, else one row each."""
    if not share:
        return [rows[i:i + 1] for i in range(len(rows))]
    cuts = np.flatnonzero(np.diff(group_ids[rows])) + 1
    return [u for u in np.split(rows, cuts) if len(u)]


class _Pass:
    """Positions of a growing micro-batch, padding included (see above)."""

    def __init__(self, share: bool):
        self.share, self.units, self.rows, self.max_p, self.max_r, self.max_l = share, 0, 0, 0, 0, 0

    @property
    def cost(self) -> int:
        return self.units * self.max_p + self.rows * self.max_r if self.share else self.rows * self.max_l

    def add(self, p: int, r: np.ndarray) -> "_Pass":
        """One more unit: prompt length p, response lengths r."""
        self.units, self.rows = self.units + 1, self.rows + len(r)
        self.max_p, self.max_r = max(self.max_p, p), max(self.max_r, int(r.max()) - 1, 0)
        self.max_l = max(self.max_l, p + int(r.max()))
        return self


def pass_positions(units: list[np.ndarray], prompt_len: np.ndarray, resp_len: np.ndarray,
                   share: bool) -> tuple[int, int]:
    """-> (positions a pass over `units` computes, padding included; positions of real tokens)."""
    pas = _Pass(share)
    for u in units:
        pas.add(int(prompt_len[u[0]]), resp_len[u])
    real = sum(_unit_size(u, prompt_len, np.maximum(resp_len - 1, 0) if share else resp_len, share) for u in units)
    return pas.cost, real


def _unit_size(u: np.ndarray, prompt_len: np.ndarray, resp_len: np.ndarray, share: bool) -> int:
    """Real positions of a unit (what a rank's share is balanced on)."""
    return int(prompt_len[u[0]]) * (1 if share else len(u)) + int(resp_len[u].sum())


def _fit_units(units: list[np.ndarray], prompt_len, resp_len, max_tokens: int, share: bool) -> list[np.ndarray]:
    """Units whose rows exceed the budget together cut into fragments that fit (each fragment
    runs the prompt once); a single row longer than the budget stays whole (it cannot be cut)."""
    out = []
    for u in units:
        p, start = int(prompt_len[u[0]]), 0
        while start < len(u):
            end = start + 1
            while end < len(u) and _Pass(share).add(p, resp_len[u[start:end + 1]]).cost <= max_tokens:
                end += 1
            out.append(u[start:end])
            start = end
    return out


PASS_OVERHEAD = 64   # positions one more pass costs beside its own (launches, Python): a little padding is cheaper


def token_budget_micro_batches(units: list[np.ndarray], prompt_len: np.ndarray, resp_len: np.ndarray,
                               max_tokens: int, share: bool) -> list[list[np.ndarray]]:
    """Units (each within the budget, or a single row: `_fit_units`) -> micro-batches of at most
    `max_tokens` positions each (padding included): the units sorted by size, longest first, then
    cut into consecutive runs so that the positions computed (padding included) plus PASS_OVERHEAD
    per pass are the fewest (dynamic programming over the cut points)."""
    if not units:
        return []
    P = np.array([int(prompt_len[u[0]]) for u in units])                          # (U,)
    R = np.array([int(resp_len[u].max()) for u in units])                         # (U,) longest response
    n_rows = np.array([len(u) for u in units])
    order = np.lexsort((-R, -P)) if share else np.argsort(-(P + R), kind="stable")
    P, R, n_rows = P[order], R[order], n_rows[order]
    rows_before = np.concatenate([[0], np.cumsum(n_rows)])                        # (U + 1,)
    U = len(units)
    best = np.full(U + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(U + 1, dtype=np.int64)
    for j in range(1, U + 1):                 # the best plan of units[:j]; its last pass is units[i:j]
        i = np.arange(j - 1, -1, -1)                                              # candidates, nearest first
        if share:   # prompts sorted longest first: the longest prompt of units[i:j] is unit i's
            max_r = np.maximum.accumulate(np.maximum(R[i] - 1, 0))
            cost = (j - i) * P[i] + (rows_before[j] - rows_before[i]) * max_r
        else:       # rows sorted longest first
            cost = (j - i) * (P[i] + R[i])
        fits = cost <= max_tokens                    # the cost grows with j - i: the ones that fit come first
        fits[0] = True                                                            # one unit always fits
        ok = np.flatnonzero(fits)
        total = best[i[ok]] + cost[ok] + PASS_OVERHEAD
        k = int(np.argmin(total))
        best[j], cut[j] = total[k], i[ok][k]
    passes, j = [], U
    while j > 0:
        passes.append([units[order[k]] for k in range(cut[j], j)])
        j = cut[j]
    return passes[::-1]


def token_balanced_shares(sizes: list[int], num_shares: int) -> list[list[int]]:
    """Items of the given sizes -> `num_shares` shares (item indices, ascending) with loads as
    equal as can be: the largest item first, each to the share with the smallest load so far (LPT)."""
    loads, shares = [0] * num_shares, [[] for _ in range(num_shares)]
    for i in sorted(range(len(sizes)), key=lambda k: -sizes[k]):
        k = min(range(num_shares), key=lambda j: (loads[j], len(shares[j])))
        loads[k] += sizes[i]
        shares[k].append(i)
    return [sorted(sh) for sh in shares]


def plan_micro_batches(rows: np.ndarray, group_ids: np.ndarray, prompt_len: np.ndarray, resp_len: np.ndarray,
                       world_size: int, max_tokens: int | None, max_rows: int,
                       share: bool) -> list[list[list[np.ndarray]]]:
    """One mini-batch's `rows` (global indices) -> for each rank, its micro-batches, each a list of
    units (see above): every row on exactly one rank, once; the same number of micro-batches on
    every rank (ZeRO-3 gathers parameters in each pass); an empty micro-batch is a pass with
    weight 0 for a rank left with fewer rows than passes.

    max_tokens None: the rows in order, cut into world_size x n pieces of at most `max_rows`
    rows (rank r takes pieces r*n .. r*n+n-1). Otherwise the units are shared out with equal
    token loads and each rank cuts its share by `token_budget_micro_batches`."""
    if max_tokens is None:
        n = max(1, math.ceil(len(rows) / (world_size * max_rows)))
        pieces = np.array_split(rows, world_size * n)
        plans = [[prompt_units(group_ids, p, share) for p in pieces[r * n:(r + 1) * n]] for r in range(world_size)]
    else:
        units = _fit_units(prompt_units(group_ids, rows, share), prompt_len, resp_len, max_tokens, share)
        sizes = [_unit_size(u, prompt_len, resp_len, share) for u in units]
        plans = [token_budget_micro_batches([units[i] for i in sh], prompt_len, resp_len, max_tokens, share)
                 for sh in token_balanced_shares(sizes, world_size)]
    passes = max(1, max(len(p) for p in plans))
    for plan in plans:     # fewer passes than another rank: split its largest micro-batch
        plan[:] = [m for m in plan if m]
        while len(plan) < passes:
            big = max(range(len(plan)), key=lambda k: sum(len(u) for u in plan[k]), default=None)
            if big is None or sum(len(u) for u in plan[big]) < 2:
                plan.append([])
                continue
            m = plan.pop(big)
            if len(m) == 1:     # one unit of several rows: two fragments
                m = [m[0][:len(m[0]) // 2], m[0][len(m[0]) // 2:]]
            plan[big:big] = [m[:len(m) // 2], m[len(m) // 2:]]
    return plans
