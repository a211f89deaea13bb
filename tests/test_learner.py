"""The learner in-process (no Ray) on a real tiny model: gradients independent of micro-batching
and of the prompt layout, old log-probs, clip fractions, the capped k3, the HF engine's
log-probs, gradient checkpointing, overlong masking, the entropy bonus and per-task entropy,
and its state through a checkpoint (the other actors: tests/test_actors.py)."""
import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from prorl_actors import batch as rb
from prorl_actors.actors.generator import GeneratorActor
from prorl_actors.actors.learner import LearnerActor
from prorl_actors.actors.reference import ReferenceActor
from prorl_actors.config import build_spec
from prorl_actors.engines.generation import SamplingSpec
from prorl_actors.engines.torch_policy import batched_logp, load_causal_lm, response_logp
from prorl_actors.tasks import validation_items
from tests.conftest import prompt_table
from tests.test_actors import G, _as_dict, _learner, _with_adv_ref

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
    seq = rb.to_tensors(r, tok.pad_token_id)
    gid = r[rb.GROUP_ID].to_numpy()
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
    torch.testing.assert_close(rb.padded(fast[rb.REF_LOGP]), rb.padded(plain[rb.REF_LOGP]), atol=2e-5, rtol=1e-5)


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
    t = rb.with_column(r, rb.ADV, [1.0, -1.0, 0.0, 0.0] * 6)
    n = sum(len(x) for x in r[rb.RESPONSE_IDS].to_pylist())
    ref = r[rb.SAMPLE_LOGP].to_pylist()           # a reference that is the sampler: k3 about 0 ...
    ref[0] = [-30.0] * len(ref[0])               # ... but one row it never says: k3 = e^d - d - 1 ~ 29 > 10
    tf = rb.with_column(t, rb.REF_LOGP, pa.array(ref, pa.list_(pa.float32())))
    stats = _learner(spec, tiny_model, tok, num_prompts_per_mini_batch=6).update(tf, kl_coef=0.05)
    assert stats["kl_capped_frac"] == pytest.approx(len(ref[0]) / n)
    # beta 0 and nothing reading the KL: the supervisor skips the reference, the learner trains without it
    stats = _learner(spec, tiny_model, tok, num_prompts_per_mini_batch=6).update(t, kl_coef=0.0)
    assert stats["optimizer_steps"] == 1 and math.isnan(stats["kl"]) and math.isnan(stats["kl_capped_frac"])
    with pytest.raises(rb.BatchSchemaError, match="ref_logp"):
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
        seq = rb.to_tensors(out, tok.pad_token_id)
        with torch.no_grad():
            learner_logp = response_logp(model, seq, 1.3)[0][seq.mask.bool()]
        sampler = torch.tensor([x for row in out[rb.SAMPLE_LOGP].to_pylist() for x in row])
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
    t = t.set_column(t.column_names.index(rb.TRUNCATED), rb.TRUNCATED, pa.array(trunc))
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
    r = r.set_column(r.schema.get_field_index(rb.TASK), rb.TASK, pa.array(names))
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    t = _with_adv_ref(r, [0.0] * r.num_rows, ref)
    stats = _learner(spec, tiny_model, tok, lr=1e-9, num_prompts_per_mini_batch=6).update(t, kl_coef=0.0)
    model = load_causal_lm(tiny_model, "float32").eval()
    seq = rb.to_tensors(r, tok.pad_token_id)
    with torch.no_grad():
        _, ent = response_logp(model, seq, temperature=1.2, with_entropy=True)       # (B, T)
    tasks = r[rb.TASK].to_pylist()
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
