"""The actor classes in-process (no Ray) on a real tiny model: the same code the Ray actors run."""
import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from prorl_actors import batch as rb
from prorl_actors.actors.generator import GeneratorActor
from prorl_actors.actors.learner import LearnerActor
from prorl_actors.actors.reference import ReferenceActor
from prorl_actors.actors.verifier import VerifierActor
from prorl_actors.config import build_spec
from prorl_actors.engines.generation import SamplingSpec
from prorl_actors.engines.torch_policy import load_causal_lm, response_logp
from prorl_actors.tasks import validation_items
from tests.conftest import prompt_table

G = 4


# the fixture `parts` (the test spec with the HF engine, its tokenizer, and G = 4 rollouts of 6
# prompts from a real generator) is in conftest.py, shared with tests/test_learner.py


def _as_dict(spec):
    import dataclasses
    return dataclasses.asdict(spec)


def _learner(spec, tiny_model, tok, algo=None, **learner_kw):
    """A learner of the test spec, by default in rows (no token budget, prompts not shared)."""
    plain = {"max_tokens_per_micro_batch": None, "share_prompts": False}
    lspec = build_spec({"learner": {**_as_dict(spec)["learner"], **plain, **learner_kw}}).learner
    return LearnerActor(str(tiny_model), lspec, algo or spec.algorithm, 1.2, G, 12, tok.pad_token_id, 0)


def _with_adv_ref(rollouts, adv, ref: ReferenceActor):
    t = rb.with_column(rollouts, rb.ADV, adv)
    return ref.logprobs(t)


def test_generator_batch_shape(parts):
    spec, tok, r = parts
    rb.check_batch(r)
    assert r.num_rows == 6 * G
    assert r[rb.GROUP_ID].to_pylist() == [g for g in range(6) for _ in range(G)]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for ids, trunc in zip(r[rb.RESPONSE_IDS].to_pylist(), r[rb.TRUNCATED].to_pylist()):
        assert trunc == (eos not in ids)
        assert eos not in ids[:-1]  # nothing after the end of a response


def test_rows_outside_the_staleness_bound_are_refused(parts, tiny_model):
    """Every row carries the version its generator held; the supervisor refuses a batch with any
    row sampled more than max_staleness versions before the learner's, or after it (a generator
    that missed a sync, or a schedule bug)."""
    from prorl_actors.runtime.rows import check_staleness
    spec, tok, r = parts
    gen = GeneratorActor(str(tiny_model), "float32", spec.generator, 0)
    assert gen.set_weights(load_causal_lm(tiny_model, "float32").state_dict(), 3) == 3
    prompts = prompt_table(tok, validation_items(spec.data, 2))
    rows = gen.generate(prompts, SamplingSpec(n=G, temperature=1.2, top_p=1.0, max_new_tokens=4, seed=0))
    assert rows[rb.POLICY_VERSION].to_pylist() == [3] * 2 * G
    assert check_staleness(rows, 3, 0, step=7).tolist() == [0] * 2 * G
    assert check_staleness(rows, 5, 2, step=7).tolist() == [2] * 2 * G
    with pytest.raises(RuntimeError, match=r"step 7: 8 rollouts sampled from policy versions \[3\], outside 4\.\.4 "
                                           r"\(supervisor.max_staleness 0\)"):
        check_staleness(rows, 4, 0, step=7)
    with pytest.raises(RuntimeError, match=r"outside 5\.\.6"):
        check_staleness(rows, 6, 1, step=7)
    with pytest.raises(RuntimeError, match=r"8 rollouts .* versions \[3\], outside 1\.\.2"):   # from the future
        check_staleness(rows, 2, 1, step=7)
    mixed = rb.concat([rows, r.slice(0, 1)])                     # one row of version 0 among them
    with pytest.raises(RuntimeError, match=r"1 rollouts .* versions \[0\], outside 2\.\.3"):
        check_staleness(mixed, 3, 1, step=7)


def test_in_flight_pieces_continue_a_response_as_if_decoded_at_once(parts, tiny_model):
    """generator.in_flight_updates decodes in pieces: a greedy response decoded 12 tokens at
    once equals the same decoded 3 tokens at a time (each unfinished row extended with its
    response so far as the prompt), token for token, with the same log-probs; the rows keep the version of their
    first piece and record the newest (taken between pieces), and a token newer than the learner
    is refused."""
    from prorl_actors.runtime.rows import check_staleness
    spec, tok, _ = parts
    gen = GeneratorActor(str(tiny_model), "float32", spec.generator, 0)
    weights = load_causal_lm(tiny_model, "float32").state_dict()
    gen.set_weights(weights, 2)
    prompts = prompt_table(tok, validation_items(spec.data, 4))
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
    whole = gen.generate(prompts, greedy)
    rows = gen.generate(prompts, dataclasses.replace(greedy, max_new_tokens=3))
    rows = rb.with_column(rows, rb.POLICY_VERSION_MAX, rows[rb.POLICY_VERSION].to_pylist())
    gen.set_weights(weights, 3)                     # newer weights (the same values) between pieces
    pieces = 1
    while True:
        length = np.array([len(r) for r in rows[rb.RESPONSE_IDS].to_pylist()])
        open_ = rows[rb.TRUNCATED].to_numpy(zero_copy_only=False) & (length < 12)
        if not open_.any():
            break
        more = gen.extend(rows.filter(pa.array(open_)), dataclasses.replace(greedy, max_new_tokens=min(3, 12 - 3 * pieces)))
        out = {i: j for j, i in enumerate(np.flatnonzero(open_))}
        rows = pa.Table.from_pylist([more.slice(out[i], 1).to_pylist()[0] if i in out else rows.slice(i, 1).to_pylist()[0]
                                     for i in range(rows.num_rows)], schema=more.schema)
        pieces += 1
    assert pieces >= 3
    assert rows[rb.RESPONSE_IDS].to_pylist() == whole[rb.RESPONSE_IDS].to_pylist()
    assert rows[rb.RESPONSE_TEXT].to_pylist() == whole[rb.RESPONSE_TEXT].to_pylist()
    assert rows[rb.TRUNCATED].to_pylist() == whole[rb.TRUNCATED].to_pylist()
    for got, want in zip(rows[rb.SAMPLE_LOGP].to_pylist(), whole[rb.SAMPLE_LOGP].to_pylist()):
        np.testing.assert_allclose(got, want, atol=1e-4)
    extended = [len(r) > 3 for r in rows[rb.RESPONSE_IDS].to_pylist()]
    assert rows[rb.POLICY_VERSION].to_pylist() == [2] * 4
    assert rows[rb.POLICY_VERSION_MAX].to_pylist() == [3 if e else 2 for e in extended]
    assert check_staleness(rows, 3, 1, step=9).tolist() == [1] * 4
    with pytest.raises(RuntimeError, match="outside 1..2"):   # a token from version 3, the learner at 2
        check_staleness(rows, 2, 1, step=9)


def test_surplus_groups_carry_over_only_within_the_bound(parts):
    """The next batch begins with the surplus groups its learner may train on: at step j the
    learner holds at most the newest published version plus one per step still to do (here 5),
    so with max_staleness 1 groups sampled with version 4 or newer carry, older ones expire;
    with 0 only version 5."""
    from prorl_actors.runtime.rows import usable_surplus
    _, _, r = parts                                       # 6 groups of G
    versions = [3, 4, 5, 4, 2, 5]
    surplus = r.set_column(r.schema.get_field_index(rb.POLICY_VERSION), rb.POLICY_VERSION,
                           pa.array([v for v in versions for _ in range(G)], pa.int64()))
    rows, carried, expired = usable_surplus(surplus, 5, 1, G)
    assert (carried, expired) == (4, 2)
    assert rows[rb.GROUP_ID].to_pylist() == [g for g in (1, 2, 3, 5) for _ in range(G)]   # in order
    rows, carried, expired = usable_surplus(surplus, 5, 0, G)
    assert (carried, expired) == (2, 4) and rows[rb.GROUP_ID].to_pylist() == [g for g in (2, 5) for _ in range(G)]


def test_carried_restored_and_fresh_rows_concatenate(parts, tmp_path):
    """Rows made as the producer makes them (in-flight decoding adds POLICY_VERSION_MAX, then the
    verifier its columns, the producer GENERATE_ERROR and the shaped reward), a surplus of them
    through a checkpoint file and aligned as `_carry` aligns it, and the rows of a failed
    generation: one table, in one column order, with and without in-flight updates."""
    import pyarrow.feather as feather

    from prorl_actors.runtime.rows import failed_generation, with_shaped_rewards
    spec, _, r = parts
    shaping = build_spec({"algorithm": {"reward_shaping": {"stop_properly_coef": 0.0}}}).algorithm.reward_shaping
    prompts = r.select(list(rb.PROMPT_COLUMNS)).slice(0, 1)
    for in_flight in (False, True):
        rows = rb.with_column(r, rb.POLICY_VERSION_MAX, r[rb.POLICY_VERSION].to_pylist()) if in_flight else r
        rows = VerifierActor(spec.data).verify(rows)
        rows = with_shaped_rewards(rb.with_column(rows, rb.GENERATE_ERROR, [False] * rows.num_rows), shaping, 12, 1)
        feather.write_feather(rows.slice(2 * G), tmp_path / "surplus.arrow")
        surplus = rb.in_column_order(feather.read_table(tmp_path / "surplus.arrow"))
        failed = with_shaped_rewards(failed_generation(prompts, G, 0, in_flight), shaping, 12, 1)
        both = rb.concat([surplus, rows, failed])
        assert both.num_rows == rows.num_rows * 2 - 2 * G + G and both.column_names == rows.column_names


def test_response_logp_matches_unpadded_forward(parts, tiny_model):
    spec, tok, r = parts
    model = load_causal_lm(tiny_model, "float32").eval()
    seq = rb.to_tensors(r, tok.pad_token_id)
    with torch.no_grad():
        logp, ent = response_logp(model, seq, temperature=1.2, with_entropy=True)
        for i in (0, 5, 13):
            p, resp = r[rb.PROMPT_IDS][i].as_py(), r[rb.RESPONSE_IDS][i].as_py()
            logits = model(torch.tensor([p + resp])).logits[0, len(p) - 1:-1] / 1.2   # (n, V)
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]
            torch.testing.assert_close(logp[i, :len(resp)], want, atol=1e-5, rtol=1e-5)
            assert torch.all(logp[i, len(resp):] == 0) and torch.all(ent[i, :len(resp)] > 0)


def test_reference_matches_learner_and_resets(parts, tiny_model):
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    # a small step (3e-3 overshoots on some samples: the tiny model's responses share most tokens)
    learner = _learner(spec, tiny_model, tok, num_prompts_per_mini_batch=6, lr=1e-3)
    # the reference's ragged column holds exactly each response's tokens, in order
    t0 = ref.logprobs(rb.with_column(r, rb.ADV, [0.0] * r.num_rows))
    assert [len(x) for x in t0[rb.REF_LOGP].to_pylist()] == [len(x) for x in r[rb.RESPONSE_IDS].to_pylist()]
    t = _with_adv_ref(r, [1.0, -1, -1, -1] * 6, ref)
    before = rb.padded(t[rb.REF_LOGP])
    stats = learner.update(t, kl_coef=0.1)
    # one mini-batch: the KL is measured before the only update, against identical weights
    assert abs(stats["kl"]) < 1e-6 and stats["optimizer_steps"] == 1
    ref.reset_to(learner.get_weights(), version=1)
    after = rb.padded(ref.logprobs(t)[rb.REF_LOGP])
    assert (after - before).abs().max() > 1e-3  # the reference now is the updated policy


def test_reference_logprobs_at_a_given_temperature(parts, tiny_model):
    """The supervisor passes the reference's temperature per call (kl.actuator reference_temperature)."""
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    model = load_causal_lm(tiny_model, "float32").eval()
    seq = rb.to_tensors(r, tok.pad_token_id)
    with torch.no_grad():
        want = {t: response_logp(model, seq, temperature=t)[0][seq.mask.bool()] for t in (1.2, 1.5)}
    got = {t: torch.tensor([x for row in ref.logprobs(r, t)[rb.REF_LOGP].to_pylist() for x in row])
           for t in (None, 1.5)}
    torch.testing.assert_close(got[None], want[1.2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1.5], want[1.5], atol=1e-5, rtol=1e-5)
    assert (want[1.5] - want[1.2]).abs().max() > 1e-2


def test_update_moves_probability_towards_positive_advantage(parts, tiny_model):
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    # a small step (3e-3 overshoots on some samples: the tiny model's responses share most tokens)
    learner = _learner(spec, tiny_model, tok, num_prompts_per_mini_batch=6, lr=1e-3)
    adv = [1.5, -0.5, -0.5, -0.5] * 6
    t = _with_adv_ref(r, adv, ref)
    seq = rb.to_tensors(t, tok.pad_token_id)
    with torch.no_grad():
        lp0, _ = response_logp(learner.model, seq, 1.2)
    learner.update(t, kl_coef=0.0)
    with torch.no_grad():
        lp1, _ = response_logp(learner.model, seq, 1.2)
    seq_delta = ((lp1 - lp0) * seq.mask).sum(1).view(6, G)                      # (groups, G)
    assert seq_delta[:, 0].mean() > 0 > seq_delta[:, 1:].mean()
    assert float((torch.tensor(adv).view(6, G) * seq_delta).sum()) > 0          # the surrogate went up


def test_non_finite_loss_skips_update_and_counts(parts, tiny_model):
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    learner = _learner(spec, tiny_model, tok, num_prompts_per_mini_batch=3)
    w0 = {k: v.clone() for k, v in learner.get_weights().items()}
    t = _with_adv_ref(r, [math.nan] * (6 * G), ref)
    stats = learner.update(t, kl_coef=0.0)
    assert stats["skipped_updates"] == 2 and stats["optimizer_steps"] == 0
    assert learner.num_skipped_updates == 2
    assert all(torch.equal(w0[k], v) for k, v in learner.get_weights().items())


def test_reset_optimizer_clears_state(parts, tiny_model):
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    learner = _learner(spec, tiny_model, tok, lr=1e-3, lr_warmup_steps=4, num_prompts_per_mini_batch=3)
    learner.update(_with_adv_ref(r, [1.0, -1, 0, 0] * 6, ref), kl_coef=0.0)  # 2 optimizer steps
    assert len(learner.opt.state) > 0 and learner.sched.get_last_lr()[0] == pytest.approx(1e-3 * 3 / 4)
    learner.reset_optimizer()
    assert len(learner.opt.state) == 0 and learner.sched.get_last_lr()[0] == pytest.approx(1e-3 / 4)


def test_verifier_errors_give_zero_and_are_flagged(parts):
    spec, tok, r = parts
    ver = VerifierActor(spec.data)
    refs = r[rb.REFERENCE].to_pylist()
    refs[0] = "{not json"                       # a verifier that throws
    entry = json.loads(refs[1])
    texts = r[rb.RESPONSE_TEXT].to_pylist()
    texts[0] = "<answer>1</answer>"             # tagged, so the scorer reads the broken reference
    texts[1] = f"<answer>{entry['answer']}</answer>"  # a correct answer
    r2 = r.set_column(r.column_names.index(rb.REFERENCE), rb.REFERENCE, pa.array(refs))
    r2 = r2.set_column(r2.column_names.index(rb.RESPONSE_TEXT), rb.RESPONSE_TEXT, pa.array(texts))
    out = ver.verify(r2)
    assert out[rb.REWARD][0].as_py() == 0.0 and out[rb.VERIFY_ERROR][0].as_py() is True
    assert out[rb.REWARD][1].as_py() == 1.0 and out[rb.VERIFY_ERROR][1].as_py() is False
    assert sum(out[rb.VERIFY_ERROR].to_pylist()) == 1
