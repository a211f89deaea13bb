"""The GPU paths: the DeepSpeed learner on CUDA (NCCL, bf16) in a real `prorl train`, the NCCL
weight broadcast between GPUs, and vLLM's CUDA graphs after an in-place weight update. Skipped,
with the reason, where torch sees no CUDA device (CI never has one); run them on a GPU machine
with `pytest -m gpu`."""
import dataclasses

import pytest
import torch

from tests.test_scale import batch  # noqa: F401 - the fixture

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")]


def test_train_deepspeed_bf16_on_one_gpu(tiny_model, tmp_path):
    """Learner (DeepSpeed ZeRO-2, bf16, NCCL), HF generator and reference share one GPU."""
    from prorl_actors.metrics import read_jsonl
    from tests.test_integration import _train
    _, run = _train(tiny_model, tmp_path, "hf", (
        "learner.engine=deepspeed", "learner.deepspeed.bf16=true", "learner.num_gpus=0.4",
        "generator.num_gpus=0.3", "reference.num_gpus=0.3", "weight_sync.method=object_store"))
    metrics = read_jsonl(run / "metrics.jsonl")
    trained = [m for m in metrics if m["optimizer_steps"]]
    assert trained and all(m["sampler_logp_gap"] < 0.1 for m in trained)   # bf16 learner vs fp32 sampler


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL cannot broadcast within one GPU)")
def test_nccl_broadcast_reaches_a_generator_on_another_gpu(small_spec, tiny_model, batch):  # noqa: F811 - fixture
    import ray

    from prorl_actors.actors.generator import GeneratorActor
    from prorl_actors.actors.learner import LearnerActor
    from prorl_actors.config import build_spec
    from prorl_actors.group import ActorGroup, LearnerGroup
    from prorl_actors.placement import Placement
    from prorl_actors.roles import Generator, Learner, Role
    from prorl_actors.sync import WeightSync
    d = dataclasses.asdict(small_spec)
    d["learner"].update(engine="deepspeed", num_gpus=1, lr=5e-2)
    d["generator"].update(engine="hf", num_gpus=1)
    d["weight_sync"]["method"] = "broadcast"
    spec = build_spec(d)
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        placement = Placement(spec)
        learner = LearnerGroup.for_role(Role.LEARNER, LearnerActor, 1, num_cpus=0.5, num_gpus=1,
                                        placement=placement.options("learner"),
                                        args=lambda rank: (str(tiny_model), spec.learner, spec.algorithm, 1.2, 4,
                                                           12, batch[1], 0))
        gens = ActorGroup.for_role(Role.GENERATOR, GeneratorActor, 1, num_cpus=0.5, num_gpus=1,
                                   args=lambda rank: (str(tiny_model), "float32", spec.generator, rank))
        import pyarrow as pa

        from prorl_actors import batch as rb
        from prorl_actors.engines.generation import SamplingSpec
        from tests.test_scale import _greedy_hf
        table, _ = batch
        for _ in range(2):      # weights the generator does not have yet
            learner.call_one(Learner.update, table, 0.0)
        w = learner.call_one(Learner.get_weights)
        ids = [[1, 2, 3, 4], [5, 6, 7]]
        sync = WeightSync(spec.weight_sync, learner, gens, workers_per_generator=1, backend="nccl")
        stats = sync.push(1)
        assert stats["sync_mb"] > 0
        prompts = pa.table({rb.PROMPT_IDS: pa.array(ids, pa.list_(pa.int32())), rb.TASK: ["t", "t"],
                            rb.ITEM_INDEX: pa.array([0, 1], pa.int64()), rb.REFERENCE: ["", ""],
                            rb.GROUP_ID: pa.array([0, 1], pa.int64())})
        out = gens.map_table(Generator.generate, prompts, SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=8,
                                                               seed=0))
        assert out[rb.POLICY_VERSION].to_pylist() == [1, 1]
        assert out[rb.RESPONSE_IDS].to_pylist() == _greedy_hf(tiny_model, w, ids, 8)
    finally:
        ray.shutdown()


def test_vllm_with_cuda_graphs_generates_from_the_synced_weights(small_spec, tiny_model, batch,  # noqa: F811
                                                                 monkeypatch):
    """vLLM on the GPU with enforce_eager false captures CUDA graphs at start-up, and they read the
    parameters' storage: after the learner's changed weights are loaded in place (the extension's
    route, engines/vllm_ext.py), greedy decoding is HF transformers' greedy decoding on those weights."""
    from prorl_actors.actors.learner import LearnerActor
    from prorl_actors.engines.generation import SamplingSpec, VLLMEngine
    from prorl_actors.spec import GeneratorSpec, VLLMSpec
    from tests.test_scale import _greedy_hf
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    table, pad = batch
    learner = LearnerActor(str(tiny_model), dataclasses.replace(small_spec.learner, lr=5e-2), small_spec.algorithm,
                           1.2, 4, 12, pad, 0)
    for _ in range(2):      # weights clearly not the checkpoint's
        learner.update(table, 0.0)
    weights = learner.get_weights()
    spec = GeneratorSpec(num_gpus=1, vllm=VLLMSpec(enforce_eager=False, gpu_memory_utilization=0.3))
    engine = VLLMEngine(str(tiny_model), "float32", spec, 256, seed=0)
    ids = [[1, 2, 3, 4], [5, 6, 7]]
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
    before = [o[0].response_ids for o in engine.generate(ids, greedy)]
    engine.load_weights(weights)
    after = [o[0].response_ids for o in engine.generate(ids, greedy)]
    assert after == _greedy_hf(tiny_model, weights, ids, 12)
    assert after != before, "the update did not change a greedy answer: the test would not see stale graphs"
