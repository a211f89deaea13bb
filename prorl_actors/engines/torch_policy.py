"""A causal LM in torch and the one computation both learner and reference need:
per-token log-probabilities (and entropy) of response tokens under temperature T.

The policy being optimised is the sampling distribution softmax(logits / T), the same one
the generator samples from, so logprobs are taken at the sampling temperature (as in verl).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from prorl_actors.algo.logprobs import token_logp_entropy
from prorl_actors.batch import SeqTensors, SharedPrompts, plan_micro_batches, share_prompts

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


class TokenScorer(torch.nn.Module):
    """A causal LM as the learner and the reference run it: the log-probability (and entropy) at
    temperature T of the response tokens of a micro-batch, laid out padded (`SeqTensors`) or
    with each prompt run once for its group (`SharedPrompts`), with the LM head applied to the
    response positions only, in chunks (algo/logprobs.py). It owns no weights: `lm` is the HF
    model. The training engines wrap this module, so that DeepSpeed's forward runs all of it
    (ZeRO-3 gathers the head's weights inside)."""

    def __init__(self, lm, chunk_tokens: int = 4096):
        super().__init__()
        self.lm, self.chunk_tokens = lm, chunk_tokens

    def forward(self, batch: SeqTensors | SharedPrompts, temperature: float, with_entropy: bool = False,
                entropy_grad: bool = False):
        """-> logp (N,) float32, entropy (N,) float32 or None, over the N real response tokens in
        row-major order."""
        rows, t = batch.mask.bool().nonzero(as_tuple=True)                             # (N,), (N,)
        hidden = self._shared_hidden(batch, rows, t) if isinstance(batch, SharedPrompts) else \
            self._padded_hidden(batch, rows, t)                                         # (N, H)
        return token_logp_entropy(self.lm.get_output_embeddings(), hidden, batch.response[rows, t], temperature,
                                  self.chunk_tokens, with_entropy, entropy_grad)

    def _padded_hidden(self, seq: SeqTensors, rows, t):
        hidden = self.lm.get_decoder()(input_ids=seq.input_ids, attention_mask=seq.attention_mask,
                                       use_cache=False).last_hidden_state               # (b, L, H)
        return hidden[rows, seq.resp_pos[rows, t]]                                      # (N, H)

    def _shared_hidden(self, sp: SharedPrompts, rows, t):
        """The prompts once (their keys and values kept, with their graph), then every response
        row against its prompt's: the cache is indexed by row, which is differentiable."""
        dec = self.lm.get_decoder()
        g, P = sp.prompt_ids.shape
        pos = torch.arange(P, device=sp.prompt_ids.device).expand(g, P)                # (g, P)
        out = dec(input_ids=sp.prompt_ids, attention_mask=sp.prompt_mask, position_ids=pos, use_cache=True)
        last = out.last_hidden_state[torch.arange(g, device=pos.device), sp.prompt_len - 1]    # (g, H)
        first = last[sp.group[rows]]                                                    # (N, H) predicts token 0
        R = sp.resp_in.shape[1]
        if R == 0:
            return first
        cache = out.past_key_values
        cache.batch_select_indices(sp.group)                                            # (b, kv, P, d) per layer
        r_pos = sp.prompt_len[sp.group][:, None] + torch.arange(R, device=pos.device)   # (b, R)
        hidden = dec(input_ids=sp.resp_in, attention_mask=torch.cat([sp.prompt_mask[sp.group], sp.resp_in_mask], 1),
                     position_ids=r_pos, past_key_values=cache, use_cache=True).last_hidden_state   # (b, R, H)
        later = hidden[rows, (t - 1).clamp(min=0)]                                      # (N, H) predicts token t > 0
        return torch.where((t == 0)[:, None], first, later)


def chunk_tokens(lm, max_logits_mib: float) -> int:
    """Positions per LM-head chunk so that its float32 logits take at most max_logits_mib MiB."""
    return max(1, int(max_logits_mib * 2 ** 20 // (4 * lm.config.vocab_size)))


def as_scorer(model) -> torch.nn.Module:
    """A TokenScorer, or a training engine wrapping one, as is; an HF causal LM wrapped."""
    inner = getattr(model, "module", model)          # DeepSpeed's engine keeps the module it wraps here
    return model if isinstance(inner, TokenScorer) else TokenScorer(model)


def score_tokens(model, batch: SeqTensors | SharedPrompts, temperature: float, with_entropy: bool = False,
                 autocast_bf16: bool = False, entropy_grad: bool = False):
    """-> logp (N,), entropy (N,) or None, over the N real response tokens of `batch`, in row-major
    order (row 0's tokens, then row 1's, ...)."""
    ctx = torch.autocast(batch.mask.device.type, dtype=torch.bfloat16) if autocast_bf16 else nullcontext()
    with ctx:
        return as_scorer(model)(batch, temperature, with_entropy, entropy_grad)


def response_logp(model, seq: SeqTensors, temperature: float, with_entropy: bool = False,
                  autocast_bf16: bool = False, entropy_grad: bool = True):
    """-> logp (B, T) and entropy (B, T) or None, for the response tokens of `seq` (0 where masked)."""
    logp, ent = score_tokens(model, seq, temperature, with_entropy, autocast_bf16,
                             entropy_grad and torch.is_grad_enabled())                    # (N,), (N,)
    mask = seq.mask.bool()
    out = torch.zeros(mask.shape, dtype=logp.dtype, device=logp.device).masked_scatter(mask, logp)    # (B, T)
    if ent is None:
        return out, None
    return out, torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device).masked_scatter(mask, ent)


@torch.no_grad()
def batched_logp(model, seq: SeqTensors, temperature: float, micro_batch_size: int,
                 autocast_bf16: bool = False, device: torch.device = torch.device("cpu"),
                 max_tokens: int | None = None, with_entropy: bool = False, group_ids: np.ndarray | None = None):
    """Log-probs of every response token, without gradients, over micro-batches of
    `micro_batch_size` rows (or, with `max_tokens`, of at most that many positions, rows sorted
    by length); with `group_ids` (B,), the rows of a group share one prompt pass -> (B, T) on the
    CPU (and the (B, T) entropy with `with_entropy`)."""
    B = seq.mask.shape[0]
    share = group_ids is not None
    gid = group_ids if share else np.zeros(B, np.int64)
    plen, rlen = seq.prompt_len.numpy(), seq.mask.sum(1).long().numpy()
    (plan,) = plan_micro_batches(np.arange(B), gid, plen, rlen, 1, max_tokens, micro_batch_size, share)
    out = torch.zeros_like(seq.mask)
    ent_out = torch.zeros_like(seq.mask) if with_entropy else None
    for units in plan:
        idx = torch.from_numpy(np.concatenate(units))
        sub = share_prompts(seq, units) if share else seq.rows(idx)
        logp, ent = score_tokens(model, sub.to(device), temperature, with_entropy, autocast_bf16)    # (n,)
        m = seq.mask[idx].bool()                                                    # (b, T)
        out[idx] = torch.zeros(m.shape).masked_scatter(m, logp.float().cpu())
        if with_entropy:
            ent_out[idx] = torch.zeros(m.shape).masked_scatter(m, ent.float().cpu())
    return (out, ent_out) if with_entropy else out


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
