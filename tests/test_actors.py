"""The actor classes in-process (no Ray) on a real tiny model: the same code the Ray actors run."""
import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from prorl_actors import batch as B
from prorl_actors.actors.generator import GeneratorActor
from prorl_actors.actors.learner import LearnerActor
from prorl_actors.actors.reference import ReferenceActor
from prorl_actors.actors.verifier import VerifierActor
from prorl_actors.engines.generation import SamplingSpec
from prorl_actors.engines.torch_policy import batched_logp, load_causal_lm, response_logp
from prorl_actors.spec import build_spec
from prorl_actors.tasks import validation_items
from prorl_actors.tinymodel import load_tokenizer
from tests.conftest import prompt_table

G = 4


@pytest.fixture(scope="module")
def parts(small_spec, tiny_model):
    spec = build_spec({**_as_dict(small_spec), "generator": {**_as_dict(small_spec)["generator"], "engine": "hf"}})
    tok = load_tokenizer(tiny_model)
    gen = GeneratorActor(str(tiny_model), "float32", spec.generator, 0)
    items = validation_items(spec.data, 6)
    prompts = prompt_table(tok, items)
    rollouts = gen.generate(prompts, SamplingSpec(n=G, temperature=1.2, top_p=1.0, max_new_tokens=12, seed=0))
    return spec, tok, rollouts


def _as_dict(spec):
    import dataclasses
    return dataclasses.asdict(spec)


def _learner(spec, tiny_model, tok, algo=None, **learner_kw):
    """A learner of the test spec, by default in rows (no token budget, prompts not shared)."""
    plain = {"max_tokens_per_micro_batch": None, "share_prompts": False}
    lspec = build_spec({"learner": {**_as_dict(spec)["learner"], **plain, **learner_kw}}).learner
    return LearnerActor(str(tiny_model), lspec, algo or spec.algorithm, 1.2, G, 12, tok.pad_token_id, 0)


def _with_adv_ref(rollouts, adv, ref: ReferenceActor):
    t = B.with_column(rollouts, B.ADV, adv)
    return ref.logprobs(t)


def test_generator_batch_shape(parts):
    spec, tok, r = parts
    B.check_batch(r)
    assert r.num_rows == 6 * G
    assert r[B.GROUP_ID].to_pylist() == [g for g in range(6) for _ in range(G)]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for ids, trunc in zip(r[B.RESPONSE_IDS].to_pylist(), r[B.TRUNCATED].to_pylist()):
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
    assert rows[B.POLICY_VERSION].to_pylist() == [3] * 2 * G
    assert check_staleness(rows, 3, 0, step=7).tolist() == [0] * 2 * G
    assert check_staleness(rows, 5, 2, step=7).tolist() == [2] * 2 * G
    with pytest.raises(RuntimeError, match=r"step 7: 8 rollouts sampled from policy versions \[3\], outside 4\.\.4 "
                                           r"\(supervisor.max_staleness 0\)"):
        check_staleness(rows, 4, 0, step=7)
    with pytest.raises(RuntimeError, match=r"outside 5\.\.6"):
        check_staleness(rows, 6, 1, step=7)
    with pytest.raises(RuntimeError, match=r"8 rollouts .* versions \[3\], outside 1\.\.2"):   # from the future
        check_staleness(rows, 2, 1, step=7)
    mixed = B.concat([rows, r.slice(0, 1)])                     # one row of version 0 among them
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
    rows = B.with_column(rows, B.POLICY_VERSION_MAX, rows[B.POLICY_VERSION].to_pylist())
    gen.set_weights(weights, 3)                     # newer weights (the same values) between pieces
    pieces = 1
    while True:
        length = np.array([len(r) for r in rows[B.RESPONSE_IDS].to_pylist()])
        open_ = rows[B.TRUNCATED].to_numpy(zero_copy_only=False) & (length < 12)
        if not open_.any():
            break
        more = gen.extend(rows.filter(pa.array(open_)), dataclasses.replace(greedy, max_new_tokens=min(3, 12 - 3 * pieces)))
        out = {i: j for j, i in enumerate(np.flatnonzero(open_))}
        rows = pa.Table.from_pylist([more.slice(out[i], 1).to_pylist()[0] if i in out else rows.slice(i, 1).to_pylist()[0]
                                     for i in range(rows.num_rows)], schema=more.schema)
        pieces += 1
    assert pieces >= 3
    assert rows[B.RESPONSE_IDS].to_pylist() == whole[B.RESPONSE_IDS].to_pylist()
    assert rows[B.RESPONSE_TEXT].to_pylist() == whole[B.RESPONSE_TEXT].to_pylist()
    assert rows[B.TRUNCATED].to_pylist() == whole[B.TRUNCATED].to_pylist()
    for got, want in zip(rows[B.SAMPLE_LOGP].to_pylist(), whole[B.SAMPLE_LOGP].to_pylist()):
        np.testing.assert_allclose(got, want, atol=1e-4)
    extended = [len(r) > 3 for r in rows[B.RESPONSE_IDS].to_pylist()]
    assert rows[B.POLICY_VERSION].to_pylist() == [2] * 4
    assert rows[B.POLICY_VERSION_MAX].to_pylist() == [3 if e else 2 for e in extended]
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
    surplus = r.set_column(r.schema.get_field_index(B.POLICY_VERSION), B.POLICY_VERSION,
                           pa.array([v for v in versions for _ in range(G)], pa.int64()))
    rows, carried, expired = usable_surplus(surplus, 5, 1, G)
    assert (carried, expired) == (4, 2)
    assert rows[B.GROUP_ID].to_pylist() == [g for g in (1, 2, 3, 5) for _ in range(G)]   # in order
    rows, carried, expired = usable_surplus(surplus, 5, 0, G)
    assert (carried, expired) == (2, 4) and rows[B.GROUP_ID].to_pylist() == [g for g in (2, 5) for _ in range(G)]


def test_carried_restored_and_fresh_rows_concatenate(parts, tmp_path):
    """Rows made as the producer makes them (in-flight decoding adds POLICY_VERSION_MAX, then the
    verifier its columns, the producer GENERATE_ERROR and the shaped reward), a surplus of them
    through a checkpoint file and aligned as `_carry` aligns it, and the rows of a failed
    generation: one table, in one column order, with and without in-flight updates."""
    import pyarrow.feather as feather

    from prorl_actors.runtime.rows import failed_generation, with_shaped_rewards
    spec, _, r = parts
    shaping = build_spec({"algorithm": {"reward_shaping": {"stop_properly_coef": 0.0}}}).algorithm.reward_shaping
    prompts = r.select(list(B.PROMPT_COLUMNS)).slice(0, 1)
    for in_flight in (False, True):
        rows = B.with_column(r, B.POLICY_VERSION_MAX, r[B.POLICY_VERSION].to_pylist()) if in_flight else r
        rows = VerifierActor(spec.data).verify(rows)
        rows = with_shaped_rewards(B.with_column(rows, B.GENERATE_ERROR, [False] * rows.num_rows), shaping, 12, 1)
        feather.write_feather(rows.slice(2 * G), tmp_path / "surplus.arrow")
        surplus = B.in_column_order(feather.read_table(tmp_path / "surplus.arrow"))
        failed = with_shaped_rewards(failed_generation(prompts, G, 0, in_flight), shaping, 12, 1)
        both = B.concat([surplus, rows, failed])
        assert both.num_rows == rows.num_rows * 2 - 2 * G + G and both.column_names == rows.column_names


def test_response_logp_matches_unpadded_forward(parts, tiny_model):
    spec, tok, r = parts
    model = load_causal_lm(tiny_model, "float32").eval()
    seq = B.to_tensors(r, tok.pad_token_id)
    with torch.no_grad():
        logp, ent = response_logp(model, seq, temperature=1.2, with_entropy=True)
        for i in (0, 5, 13):
            p, resp = r[B.PROMPT_IDS][i].as_py(), r[B.RESPONSE_IDS][i].as_py()
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
    t0 = ref.logprobs(B.with_column(r, B.ADV, [0.0] * r.num_rows))
    assert [len(x) for x in t0[B.REF_LOGP].to_pylist()] == [len(x) for x in r[B.RESPONSE_IDS].to_pylist()]
    t = _with_adv_ref(r, [1.0, -1, -1, -1] * 6, ref)
    before = B.padded(t[B.REF_LOGP])
    stats = learner.update(t, kl_coef=0.1)
    # one mini-batch: the KL is measured before the only update, against identical weights
    assert abs(stats["kl"]) < 1e-6 and stats["optimizer_steps"] == 1
    ref.reset_to(learner.get_weights(), version=1)
    after = B.padded(ref.logprobs(t)[B.REF_LOGP])
    assert (after - before).abs().max() > 1e-3  # the reference now is the updated policy


def test_reference_logprobs_at_a_given_temperature(parts, tiny_model):
    """The supervisor passes the reference's temperature per call (kl.actuator reference_temperature)."""
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    model = load_causal_lm(tiny_model, "float32").eval()
    seq = B.to_tensors(r, tok.pad_token_id)
    with torch.no_grad():
        want = {t: response_logp(model, seq, temperature=t)[0][seq.mask.bool()] for t in (1.2, 1.5)}
    got = {t: torch.tensor([x for row in ref.logprobs(r, t)[B.REF_LOGP].to_pylist() for x in row])
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
    seq = B.to_tensors(t, tok.pad_token_id)
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
    refs = r[B.REFERENCE].to_pylist()
    refs[0] = "{not json"                       # a verifier that throws
    entry = json.loads(refs[1])
    texts = r[B.RESPONSE_TEXT].to_pylist()
    texts[0] = "<answer>1</answer>"             # tagged, so the scorer reads the broken reference
    texts[1] = f"<answer>{entry['answer']}</answer>"  # a correct answer
    r2 = r.set_column(r.column_names.index(B.REFERENCE), B.REFERENCE, pa.array(refs))
    r2 = r2.set_column(r2.column_names.index(B.RESPONSE_TEXT), B.RESPONSE_TEXT, pa.array(texts))
    out = ver.verify(r2)
    assert out[B.REWARD][0].as_py() == 0.0 and out[B.VERIFY_ERROR][0].as_py() is True
    assert out[B.REWARD][1].as_py() == 1.0 and out[B.VERIFY_ERROR][1].as_py() is False
    assert sum(out[B.VERIFY_ERROR].to_pylist()) == 1


LAYOUTS = [dict(micro_batch_size=5), dict(max_tokens_per_micro_batch=60), dict(max_tokens_per_micro_batch=150),
           dict(micro_batch_size=5, share_prompts=True), dict(max_tokens_per_micro_batch=80, share_prompts=True)]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_gradient_does_not_depend_on_micro_batching(parts, tiny_model, agg):
    """micro_batch_size, max_tokens_per_micro_batch and share_prompts are memory and speed knobs
    only: the mini-batch gradient is the one of a single pass over all of its rows."""
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    t = _with_adv_ref(r, [1.5, -0.5, -0.5, -0.5, 0.3, -0.1, -0.1, -0.1] * 3, ref)
    algo = build_spec({"algorithm": {"loss_agg": agg}}).algorithm
    grads, pads = [], []
    for layout in [dict(micro_batch_size=24)] + LAYOUTS:
        learner = _learner(spec, tiny_model, tok, algo=algo, num_prompts_per_mini_batch=6, max_grad_norm=1e9,
                           **layout)
        stats = learner.update(t, kl_coef=0.05, entropy_coef=0.01)
        grads.append(_grads(learner))
        pads.append(stats["pad_frac"])
    assert grads[0].abs().max() > 0
    for g, layout in zip(grads[1:], LAYOUTS):
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7, msg=str(layout))
    assert pads[2] < pads[0]                     # sorted by length within a token budget: less padding


@pytest.mark.parametrize("temperature", [1.2, 0.7])
def test_shared_prompts_score_what_the_padded_layout_scores(parts, tiny_model, temperature):
    """The reference and the learner's scorer with each prompt run once: the log-probs and
    entropies of the padded layout, for every row (groups cut into fragments too)."""
    spec, tok, r = parts
    model = load_causal_lm(tiny_model, "float32").eval()
    seq = B.to_tensors(r, tok.pad_token_id)
    gid = r[B.GROUP_ID].to_numpy()
    with torch.no_grad():
        want, want_ent = response_logp(model, seq, temperature, with_entropy=True)
        for micro, budget in ((64, None), (3, None), (64, 70)):
            got, ent = batched_logp(model, seq, temperature, micro, max_tokens=budget, with_entropy=True,
                                    group_ids=gid)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(ent, want_ent, atol=2e-5, rtol=1e-5)
    shared = dataclasses.replace(spec.reference, share_prompts=True, max_tokens_per_micro_batch=100)
    rows = dataclasses.replace(spec.reference, share_prompts=False, max_tokens_per_micro_batch=None)
    plain = ReferenceActor(str(tiny_model), "float32", rows, temperature, tok.pad_token_id).logprobs(r)
    fast = ReferenceActor(str(tiny_model), "float32", shared, temperature, tok.pad_token_id).logprobs(r)
    torch.testing.assert_close(B.padded(fast[B.REF_LOGP]), B.padded(plain[B.REF_LOGP]), atol=2e-5, rtol=1e-5)


def test_old_logp_is_computed_only_for_rows_not_in_the_first_mini_batch(parts, tiny_model):
    """The first mini-batch is trained before any step: its ratio is 1 without a pass. Skipping
    that pass changes nothing, over two epochs too (its old_logp is kept for the second)."""
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    t = _with_adv_ref(r, [1.5, -0.5, -0.5, -0.5, 0.3, -0.1, -0.1, -0.1] * 3, ref)
    kw = dict(lr=3e-3, num_prompts_per_mini_batch=3, num_epochs=2, max_tokens_per_micro_batch=120)
    scored = []

    class EveryRow(LearnerActor):        # the plain way: every row scored before the update
        def _old_logp(self, seq, rows, gid, tok_off):
            return super()._old_logp(seq, np.arange(seq.mask.shape[0]), gid, tok_off)

    class Counting(LearnerActor):
        def _old_logp(self, seq, rows, gid, tok_off):
            scored.append(len(rows))
            return super()._old_logp(seq, rows, gid, tok_off)

    stats, weights = [], []
    for cls in (EveryRow, Counting):
        torch.manual_seed(0)
        lspec = build_spec({"learner": {**_as_dict(spec)["learner"], "share_prompts": False, **kw}}).learner
        learner = cls(str(tiny_model), lspec, spec.algorithm, 1.2, G, 12, tok.pad_token_id, 0)
        stats.append(learner.update(t, kl_coef=0.05))
        weights.append(learner.get_weights())
    assert scored == [3 * G]                                   # 6 groups in 2 mini-batches: half the rows
    for k in ("pg_loss", "clip_frac", "approx_kl", "kl", "entropy", "sampler_logp_gap"):
        assert stats[1][k] == pytest.approx(stats[0][k], rel=1e-4, abs=1e-6), k
    assert max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0]) < 1e-6


def test_clip_fractions_are_non_zero_when_the_policy_moves(parts, tiny_model):
    """From the second mini-batch of a step on, the policy has moved since the rows were sampled:
    ratios leave 1 and some are clipped (low for negative advantages, high for positive ones)."""
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    t = _with_adv_ref(r, [1.5, -0.5, -0.5, -0.5, -1.5, 0.5, 0.5, 0.5] * 3, ref)
    one = _learner(spec, tiny_model, tok, lr=2e-2, num_prompts_per_mini_batch=6).update(t, kl_coef=0.0)
    assert one["clip_frac"] == 0.0 and one["approx_kl"] == pytest.approx(0.0, abs=1e-7)   # on-policy: ratio 1
    two = _learner(spec, tiny_model, tok, lr=2e-2, num_prompts_per_mini_batch=3).update(t, kl_coef=0.0)
    assert two["optimizer_steps"] == 2 and two["approx_kl"] > 0
    assert two["clip_frac_low"] > 0 and two["clip_frac_high"] > 0
    assert two["clip_frac"] == pytest.approx(two["clip_frac_low"] + two["clip_frac_high"])


def test_k3_capped_share_and_an_update_without_the_reference(parts, tiny_model):
    spec, tok, r = parts
    t = B.with_column(r, B.ADV, [1.0, -1.0, 0.0, 0.0] * 6)
    n = sum(len(x) for x in r[B.RESPONSE_IDS].to_pylist())
    ref = r[B.SAMPLE_LOGP].to_pylist()           # a reference that is the sampler: k3 about 0 ...
    ref[0] = [-30.0] * len(ref[0])               # ... but one row it never says: k3 = e^d - d - 1 ~ 29 > 10
    tf = B.with_column(t, B.REF_LOGP, pa.array(ref, pa.list_(pa.float32())))
    stats = _learner(spec, tiny_model, tok, num_prompts_per_mini_batch=6).update(tf, kl_coef=0.05)
    assert stats["kl_capped_frac"] == pytest.approx(len(ref[0]) / n)
    # beta 0 and nothing reading the KL: the supervisor skips the reference, the learner trains without it
    stats = _learner(spec, tiny_model, tok, num_prompts_per_mini_batch=6).update(t, kl_coef=0.0)
    assert stats["optimizer_steps"] == 1 and math.isnan(stats["kl"]) and math.isnan(stats["kl_capped_frac"])
    with pytest.raises(B.BatchSchemaError, match="ref_logp"):
        _learner(spec, tiny_model, tok).update(t, kl_coef=0.1)


def test_hf_engine_log_probs_are_those_of_the_sampling_distribution(parts, tiny_model):
    """The HF engine keeps each sampled token's log-prob step by step: at top_p 1 it is the
    learner's log softmax(logits / T); with top_p < 1 the renormalised nucleus gives each kept
    token more."""
    spec, tok, r = parts
    items = validation_items(spec.data, 4)
    prompts = prompt_table(tok, items)
    model = load_causal_lm(tiny_model, "float32").eval()
    gen = GeneratorActor(str(tiny_model), "float32", spec.generator, 0)
    for top_p in (1.0, 0.8):
        out = gen.generate(prompts, SamplingSpec(n=3, temperature=1.3, top_p=top_p, max_new_tokens=10, seed=1))
        seq = B.to_tensors(out, tok.pad_token_id)
        with torch.no_grad():
            learner_logp = response_logp(model, seq, 1.3)[0][seq.mask.bool()]
        sampler = torch.tensor([x for row in out[B.SAMPLE_LOGP].to_pylist() for x in row])
        if top_p == 1.0:
            torch.testing.assert_close(sampler, learner_logp, atol=2e-5, rtol=1e-5)
        else:
            assert (sampler >= learner_logp - 1e-5).all() and (sampler > learner_logp + 1e-3).any()


def test_gradient_checkpointing_gives_the_same_gradient(parts, tiny_model):
    """learner.gradient_checkpointing trades compute for memory: the gradient is the same."""
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    t = _with_adv_ref(r, [1.5, -0.5, -0.5, -0.5, 0.3, -0.1, -0.1, -0.1] * 3, ref)
    grads = []
    for ckpt in (False, True):
        learner = _learner(spec, tiny_model, tok, num_prompts_per_mini_batch=6, max_grad_norm=1e9,
                           gradient_checkpointing=ckpt)
        assert learner.model.is_gradient_checkpointing == ckpt
        learner.update(t, kl_coef=0.05)
        grads.append(_grads(learner))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def _grads(learner):
    return torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None])


def test_overlong_mask_drops_truncated_responses_from_the_loss(parts, tiny_model):
    """Masking the truncated responses of one group gives the gradient of the batch without them."""
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    t = _with_adv_ref(r, [1.5, -0.5, -0.5, -0.5, 0.3, -0.1, -0.1, -0.1] * 3, ref)
    trunc = [G <= i < 2 * G for i in range(t.num_rows)]                 # group 1 "ran out of tokens"
    t = t.set_column(t.column_names.index(B.TRUNCATED), B.TRUNCATED, pa.array(trunc))
    masked = build_spec({"algorithm": {"overlong": {"mode": "mask"}}}).algorithm
    a = _learner(spec, tiny_model, tok, algo=masked, num_prompts_per_mini_batch=6, max_grad_norm=1e9)
    a.update(t, kl_coef=0.05)
    without = t.filter(pa.array([not x for x in trunc]))
    b = _learner(spec, tiny_model, tok, num_prompts_per_mini_batch=6, max_grad_norm=1e9)
    b.update(without, kl_coef=0.05)
    c = _learner(spec, tiny_model, tok, num_prompts_per_mini_batch=6, max_grad_norm=1e9)
    c.update(t, kl_coef=0.05)                                            # mode none: they count
    torch.testing.assert_close(_grads(a), _grads(b), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(_grads(a), _grads(c), rtol=1e-3, atol=1e-6)


def test_entropy_bonus_raises_entropy(parts, tiny_model):
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    t = _with_adv_ref(r, [0.0] * r.num_rows, ref)                        # no policy-gradient signal at all
    plain = _learner(spec, tiny_model, tok, lr=1e-3, num_prompts_per_mini_batch=6)
    assert plain.update(t, kl_coef=0.0)["optimizer_steps"] == 1 and _grads(plain).abs().max() == 0
    bonus = build_spec({"algorithm": {"entropy_coef": 0.1}}).algorithm
    learner = _learner(spec, tiny_model, tok, algo=bonus, lr=1e-3, num_prompts_per_mini_batch=6)
    entropies = [learner.update(t, kl_coef=0.0)["entropy"] for _ in range(4)]
    assert entropies[-1] > entropies[0] + 1e-3, entropies


def test_entropy_per_task_is_each_tasks_token_mean(parts, tiny_model):
    """entropy/<task>: the token-mean entropy of each task's responses (their token-weighted
    mean is the batch's entropy), so a batch's task mix can be told apart from the policy."""
    spec, tok, r = parts
    names = [("even", "odd")[(i // G) % 2] for i in range(r.num_rows)]          # two tasks, by group
    r = r.set_column(r.schema.get_field_index(B.TASK), B.TASK, pa.array(names))
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    t = _with_adv_ref(r, [0.0] * r.num_rows, ref)
    stats = _learner(spec, tiny_model, tok, lr=1e-9, num_prompts_per_mini_batch=6).update(t, kl_coef=0.0)
    model = load_causal_lm(tiny_model, "float32").eval()
    seq = B.to_tensors(r, tok.pad_token_id)
    with torch.no_grad():
        _, ent = response_logp(model, seq, temperature=1.2, with_entropy=True)       # (B, T)
    tasks = r[B.TASK].to_pylist()
    total, tokens = 0.0, 0.0
    for name in set(tasks):
        rows = torch.tensor([x == name for x in tasks])
        want = float((ent[rows] * seq.mask[rows]).sum() / seq.mask[rows].sum())
        assert stats[f"entropy/{name}"] == pytest.approx(want, rel=1e-4)
        total, tokens = total + want * float(seq.mask[rows].sum()), tokens + float(seq.mask[rows].sum())
    assert stats["entropy"] == pytest.approx(total / tokens, rel=1e-4)


def test_learner_state_round_trips_through_a_checkpoint(parts, tiny_model, tmp_path):
    """A learner rebuilt from a checkpoint (weights, AdamW moments, LR schedule, RNG) takes the
    next update exactly like the one that saved it: the same weights, bit for bit."""
    from prorl_actors.checkpoint import save_checkpoint, verify_checkpoint
    spec, tok, r = parts
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    batch = _with_adv_ref(r, [1.0, -1, 0.5, -0.5] * 6, ref)
    kw = dict(lr=1e-3, lr_warmup_steps=4, num_prompts_per_mini_batch=3)   # 2 shuffled mini-batches: RNG matters
    a = _learner(spec, tiny_model, tok, **kw)
    a.update(batch, kl_coef=0.01)
    ckpt = save_checkpoint(tmp_path, 1, a.save, ref.save, {"step": 1}, 2, tiny_model)
    saved = verify_checkpoint(ckpt)
    assert saved["step"] == 1
    # both learners share this process's torch RNG (each has its own process under Ray): every
    # load_state puts back the RNG state of the save, so each update starts from it
    b = _learner(spec, ckpt, tok, **kw)
    assert b.load_state(str(ckpt)) == saved["weights_sha256"]
    sa = a.update(batch, kl_coef=0.01)
    b.load_state(str(ckpt))
    sb = b.update(batch, kl_coef=0.01)
    assert a.weights_digest() == b.weights_digest()
    assert sa["lr"] == sb["lr"] and sa["pg_loss"] == sb["pg_loss"]
    c = _learner(spec, ckpt, tok, **kw)           # the same weights without the optimizer state: not the same step
    b.load_state(str(ckpt))
    c.update(batch, kl_coef=0.01)
    assert c.weights_digest() != a.weights_digest()
