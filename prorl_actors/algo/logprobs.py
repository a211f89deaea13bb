"""Log-probabilities and entropy of sampled tokens, from the LM's hidden states (pure torch).

Algorithmic choices:
- Only the positions that predict a response token go through the LM head: prompt and pad
  positions never become logits. The caller gathers those positions' hidden states into one
  flat (N, H) tensor, so padding costs nothing here either.
- The policy is softmax(logits / T), T the sampling temperature (as in verl), in float32
  whatever the model's dtype: ``log p = log_softmax(logits / T)``.
- One pass for both figures: the entropy ``H = -sum_v p_v log p_v`` reuses the same
  log_softmax as the token's log-probability (no second softmax over the vocabulary).
- Chunked over positions: at most ``chunk_tokens`` positions' (n, V) float32 logits exist at a
  time. With gradients and more than one chunk, each chunk is recomputed in backward
  (activation checkpointing), so that backward holds one chunk's (n, V) at a time as well:
  8k response tokens x a 152k vocabulary is 5 GB of float32 per copy, which is what kept the
  GPU specs at micro-batches of one sequence.
- The entropy carries a gradient only when it is in the loss (an entropy bonus); reported
  only, it is computed from detached log-probabilities.
- Vocabulary entries with -inf logits (masked tokens) have p = 0 and contribute 0 to H.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logp_entropy(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, tokens: torch.Tensor,
                        temperature: float, with_entropy: bool, entropy_grad: bool):
    logits = head(hidden).float() / temperature                              # (n, V)
    logp_all = torch.log_softmax(logits, dim=-1)                             # (n, V)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)             # (n,)
    if not with_entropy:
        return logp, None
    lp = logp_all if entropy_grad else logp_all.detach()                     # (n, V)
    p = lp.exp()                                                             # (n, V) 0 where the logit is -inf
    ent = -(p * lp.masked_fill(p == 0, 0.0)).sum(-1)                         # (n,)
    return logp, ent


def token_logp_entropy(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, tokens: torch.Tensor,
                       temperature: float, chunk_tokens: int, with_entropy: bool = True,
                       entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token) and the entropy of pi at each position, pi = softmax(head(hidden) / T).

    head:    (n, H) -> (n, V) logits (the LM head; called once per chunk)
    hidden:  (N, H) hidden states of the positions that predict `tokens`
    tokens:  (N,)   long, the tokens whose log-probabilities are wanted
    Returns logp (N,) float32 and entropy (N,) float32 (None without `with_entropy`).
    """
    if hidden.shape[:1] != tokens.shape or hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H) and tokens (N,); got {tuple(hidden.shape)} and {tuple(tokens.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1; got {chunk_tokens}")
    N = tokens.shape[0]
    recompute = torch.is_grad_enabled() and hidden.requires_grad and N > chunk_tokens
    logps, ents = [], []
    for start in range(0, max(N, 1), chunk_tokens):
        h, tok = hidden[start:start + chunk_tokens], tokens[start:start + chunk_tokens]    # (n, H), (n,)
        if recompute:
            lp, ent = checkpoint(_chunk_logp_entropy, head, h, tok, temperature, with_entropy, entropy_grad,
                                 use_reentrant=False)
        else:
            lp, ent = _chunk_logp_entropy(head, h, tok, temperature, with_entropy, entropy_grad)
        logps.append(lp)
        ents.append(ent)
    logp = logps[0] if len(logps) == 1 else torch.cat(logps)                 # (N,)
    if not with_entropy:
        return logp, None
    return logp, ents[0] if len(ents) == 1 else torch.cat(ents)               # (N,)
