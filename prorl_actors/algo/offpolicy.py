"""Off-policy correction: the sampler's distribution is not the learner's (pure torch).

Three policies meet in one update (decoupled PPO, as AReaL names them):
- the *behaviour* policy that sampled the tokens: the generator's log-probs (`sample_logp`), from
  another engine (vLLM's kernels, bf16) and, with asynchronous rollouts, older weights;
- the *proximal* policy: the learner's weights before this update (`old_logp`), which the PPO
  ratio is measured against and clipped around;
- the policy being trained (`logp`).
The PPO ratio pi / pi_prox stays as it is; each token's policy-gradient term is multiplied by a
detached weight built from r = pi_prox / pi_behaviour = exp(old_logp - sample_logp), so that the
gradient is (nearly) the one of samples drawn from the proximal policy.

Modes (`low`, `high` the bounds):
- none          1 everywhere (the sampler is taken to be the learner: today's on-policy PPO);
- tis           min(r, high): truncated importance sampling (Yao et al. 2025; verl, NeMo-RL),
                unbiased up to the truncation, variance bounded by `high`;
- icepop        r where low <= r <= high, 0 elsewhere (ICE-POP): tokens the two engines disagree
                on too much give no gradient at all;
- seq_mask_tis  min(r, high) per token, but 0 for every token of a sequence whose geometric-mean
                ratio exp(mean_t log r_t) leaves [low, high] (NeMo-RL's ProRL v2 configs): a
                sequence the sampler drifted away on is dropped whole.
The statistics say how far apart the two engines are: `logp_mismatch_k3` is the k3 estimate of
KL(behaviour || proximal) over the sampled tokens, `logp_gap_max` the largest |old - sample| and
`logp_gap_over_log2_frac` the share of tokens whose probabilities differ by more than 2x.
"""
from __future__ import annotations

import math

import torch

from prorl_actors.algo.losses import k3_of_log_ratio

OFF_POLICY_MODES = ("none", "tis", "icepop", "seq_mask_tis")
LOG_R_CLAMP = 20.0   # |log r| bound before exp (exp(20) ~ 4.9e8 is finite in float32)


def off_policy_weights(old_logp: torch.Tensor, sample_logp: torch.Tensor, mask: torch.Tensor, mode: str = "none",
                       low: float = 0.5, high: float = 5.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """old_logp, sample_logp, mask: (B, T) (mask 1 on real response tokens).

    Returns (weights (B, T), detached, 0 on masked-out positions; stats: 0-dim tensors over the
    real tokens, see `token_weights`)."""
    if not (old_logp.shape == sample_logp.shape == mask.shape) or old_logp.dim() != 2:
        raise ValueError(f"old_logp, sample_logp and mask must all be (B, T); got {tuple(old_logp.shape)}, "
                         f"{tuple(sample_logp.shape)}, {tuple(mask.shape)}")
    m = mask.bool()                                                                     # (B, T)
    rows = m.nonzero()[:, 0]                                                            # (n,) row of each real token
    w_tok, stats = token_weights(old_logp[m], sample_logp[m], rows, mode, low, high)   # (n,)
    w = torch.zeros(old_logp.shape, dtype=w_tok.dtype, device=w_tok.device)            # (B, T)
    w[m] = w_tok
    return w, stats


def token_weights(old_logp: torch.Tensor, sample_logp: torch.Tensor, rows: torch.Tensor, mode: str = "none",
                  low: float = 0.5, high: float = 5.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same on flat tokens, as the learner holds them: old_logp, sample_logp (n,) and `rows`
    (n,) the sequence of each token (whole sequences; any ids) -> (weights (n,), stats).

    stats (0-dim tensors): tokens; is_weight_mean, is_masked_frac (tokens given weight 0);
    logp_mismatch_k3 (k3 of KL(behaviour || proximal): r - 1 - log r), logp_gap_max (max |log r|),
    logp_gap_over_log2_frac (share of |log r| > log 2); and the sums behind the means (`*_sum`),
    so that micro-batches add up exactly."""
    if mode not in OFF_POLICY_MODES:
        raise ValueError(f"unknown off-policy correction {mode!r}; valid: {list(OFF_POLICY_MODES)}")
    if not 0.0 <= low <= 1.0 <= high:
        raise ValueError(f"need 0 <= low <= 1 <= high; got low={low}, high={high}")
    with torch.no_grad():
        dtype = torch.promote_types(old_logp.dtype, torch.float32)
        log_r = (old_logp.to(dtype) - sample_logp.to(dtype)).clamp(-LOG_R_CLAMP, LOG_R_CLAMP)   # (n,)
        r = log_r.exp()                                                                 # (n,)
        if mode == "none":
            w = torch.ones_like(r)
        elif mode == "tis":
            w = r.clamp(max=high)
        elif mode == "icepop":
            w = torch.where((r >= low) & (r <= high), r, torch.zeros_like(r))
        else:                                                                           # seq_mask_tis
            ids, seq = torch.unique(rows, return_inverse=True)                          # seq: (n,) in 0..S-1
            total = torch.zeros(len(ids), dtype=dtype, device=r.device).index_add_(0, seq, log_r)      # (S,)
            count = torch.zeros(len(ids), dtype=dtype, device=r.device).index_add_(0, seq, torch.ones_like(r))
            seq_r = (total / count).exp()                                               # (S,) geometric means
            w = r.clamp(max=high) * ((seq_r >= low) & (seq_r <= high))[seq]
        n = torch.tensor(float(len(r)), dtype=dtype, device=r.device)
        stats = {"tokens": n, "is_weight_sum": w.sum(), "is_masked_sum": (w == 0).sum().to(dtype),
                 "logp_mismatch_k3_sum": k3_of_log_ratio(log_r).sum(),
                 "logp_gap_over_log2_sum": (log_r.abs() > math.log(2)).sum().to(dtype),
                 "logp_gap_max": log_r.abs().max() if len(r) else torch.zeros((), dtype=dtype, device=r.device)}
        d = n.clamp(min=1)
        stats.update(is_weight_mean=stats["is_weight_sum"] / d, is_masked_frac=stats["is_masked_sum"] / d,
                     logp_mismatch_k3=stats["logp_mismatch_k3_sum"] / d,
                     logp_gap_over_log2_frac=stats["logp_gap_over_log2_sum"] / d)
    return w, stats
