"""A causal LM in torch and the one computation both learner and reference need:
per-token log-probabilities (and entropy) of response tokens under temperature T.

The policy being optimised is the sampling distribution softmax(logits / T), the same one
the generator samples from, so logprobs are taken at the sampling temperature (as in verl).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from prorl_actors.algo import entropy_from_logits
from prorl_actors.batch import SeqTensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_causal_lm(path: str | Path, dtype: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])


def pick_device(num_gpus: float) -> torch.device:
    """The GPU Ray gave this actor when its role asks for one, else the CPU."""
    if num_gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("the spec gives this role GPUs but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def response_logp(model, seq: SeqTensors, temperature: float, with_entropy: bool = False,
                  autocast_bf16: bool = False, entropy_grad: bool = True):
    """-> logp (B, T) and entropy (B, T) or None, for the response tokens of `seq`.

    Materialises float32 (B, T, V) logits: fine for small vocabularies and micro-batches;
    long responses with a 150k vocabulary need chunking over T (scale-out issue)."""
    device_type = seq.input_ids.device.type
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if autocast_bf16 else nullcontext()
    with ctx:
        logits = model(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits  # (B, L, V)
    V = logits.shape[-1]
    idx = seq.resp_pos.unsqueeze(-1).expand(-1, -1, V)                   # (B, T, V)
    resp_logits = logits.gather(1, idx).float() / temperature             # (B, T, V)
    logp_all = torch.log_softmax(resp_logits, dim=-1)                     # (B, T, V)
    logp = logp_all.gather(-1, seq.response.unsqueeze(-1)).squeeze(-1)    # (B, T)
    ent = None
    if with_entropy:   # without a graph when it is only reported (its (B, T, V) intermediates are large)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = entropy_from_logits(resp_logits)                        # (B, T)
    return logp * seq.mask, (ent * seq.mask if ent is not None else None)


@torch.no_grad()
def batched_logp(model, seq: SeqTensors, temperature: float, micro_batch_size: int,
                 autocast_bf16: bool = False, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """response_logp over micro-batches, without gradients -> (B, T) on the CPU."""
    out = torch.zeros_like(seq.mask)
    for start in range(0, seq.mask.shape[0], micro_batch_size):
        idx = torch.arange(start, min(start + micro_batch_size, seq.mask.shape[0]))
        logp, _ = response_logp(model, seq.rows(idx).to(device), temperature, autocast_bf16=autocast_bf16)
        out[idx, :logp.shape[1]] = logp.cpu()
    return out


def state_dict_for_sync(model) -> dict[str, torch.Tensor]:
    """Weights to send to generators/reference, under checkpoint names, each its own copy.

    A tied `lm_head.weight` is sent too, on purpose: vLLM on CPU keeps a separately repacked
    copy of the LM head, and an in-place reload that does not name `lm_head.weight` leaves
    that copy stale (generations then silently come from a mix of old and new weights).
    """
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def load_policy_weights(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Strict in-place load of weights from `state_dict_for_sync` (raises on any mismatch)."""
    model.load_state_dict(state_dict, strict=True)
