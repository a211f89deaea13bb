"""LearnerActor: the policy update (torch engine).

One call to `update` trains on one rollout batch:
  1. old_logp <- logprobs of the batch under the current weights (the policy that the
     clipped surrogate's ratio is measured against; recomputed rather than trusting the
     sampler's numbers, which come from another engine and kernel). With one epoch over a
     single mini-batch it equals logp.detach() and costs no extra forward pass.
  2. for each epoch, for each mini-batch of `num_prompts_per_mini_batch` whole groups:
       loss = policy_loss(logp, old_logp, adv)        # DAPO decoupled clipping
            + kl_coef * KL(pi || pi_ref)               # per-token estimator, same aggregation
     accumulated over micro-batches, gradient clipped, one AdamW step.
  A non-finite loss or gradient skips that optimizer step and is counted.
"""
from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import torch

from prorl_actors import batch as B
from prorl_actors.algo import kl_loss_term, kl_penalty, policy_loss
from prorl_actors.engines.torch_policy import batched_logp, load_causal_lm, response_logp, state_dict_for_sync
from prorl_actors.spec import AlgorithmSpec, LearnerSpec


class LearnerActor:
    def __init__(self, model_path: str, dtype: str, spec: LearnerSpec, algo: AlgorithmSpec,
                 temperature: float, group_size: int, pad_id: int, seed: int):
        torch.manual_seed(seed)
        torch.set_num_threads(spec.num_threads)
        self.model = load_causal_lm(model_path, dtype).train()
        self.spec, self.algo = spec, algo
        self.temperature, self.G, self.pad_id = temperature, group_size, pad_id
        self.opt, self.sched = self._new_optimizer()
        self.num_skipped_updates = 0
        self.num_optimizer_steps = 0

    def _new_optimizer(self):
        s = self.spec
        opt = torch.optim.AdamW(self.model.parameters(), lr=s.lr, betas=tuple(s.betas), eps=s.adam_eps,
                                weight_decay=s.weight_decay)
        warmup = max(s.lr_warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup))
        return opt, sched

    def reset_optimizer(self) -> None:
        """Fresh AdamW state (moments and step count) and warm-up, as at a ProRL reference reset."""
        self.opt, self.sched = self._new_optimizer()

    def update(self, rollouts: pa.Table, kl_coef: float) -> dict:
        B.check_batch(rollouts, needs=(B.ADV, B.REF_LOGP))
        s, a, G = self.spec, self.algo, self.G
        seq = B.to_tensors(rollouts, self.pad_id)
        T = seq.mask.shape[1]
        adv = torch.tensor(rollouts[B.ADV].to_numpy(), dtype=torch.float32)     # (B,)
        ref_logp = B.padded(rollouts[B.REF_LOGP], width=T) * seq.mask              # (B, T)
        n_groups = seq.mask.shape[0] // G
        # With one epoch over one mini-batch the policy has not moved when each token's loss is
        # computed, so old_logp IS logp.detach(): skip the extra forward pass (ratio = 1).
        on_policy = s.num_epochs == 1 and n_groups <= s.num_prompts_per_mini_batch
        old_logp = None if on_policy else batched_logp(self.model, seq, self.temperature, s.micro_batch_size,
                                                       s.autocast_bf16)            # (B, T)
        sums = dict(tokens=0.0, entropy=0.0, kl=0.0, pg_loss=0.0, clip_frac_low=0.0,
                    clip_frac_high=0.0, clip_frac=0.0, dual_clip_frac=0.0, approx_kl=0.0)
        grad_norms, steps, skipped = [], 0, 0
        for _ in range(s.num_epochs):
            perm = torch.randperm(n_groups)
            for start in range(0, n_groups, s.num_prompts_per_mini_batch):
                groups = perm[start:start + s.num_prompts_per_mini_batch]
                rows = (groups[:, None] * G + torch.arange(G)).flatten()          # (mb * G,)
                mb_tokens = float(seq.mask[rows].sum())
                mb_seqs = float((seq.mask[rows].sum(1) > 0).sum())
                if mb_tokens == 0:
                    continue
                self.opt.zero_grad(set_to_none=True)
                finite = True
                for m in range(0, len(rows), s.micro_batch_size):
                    idx = rows[m:m + s.micro_batch_size]
                    sub = seq.rows(idx)
                    Tm = sub.mask.shape[1]
                    logp, ent = response_logp(self.model, sub, self.temperature, with_entropy=True,
                                              autocast_bf16=s.autocast_bf16)          # (b, Tm)
                    old = logp.detach() if on_policy else old_logp[idx, :Tm]
                    pg, st = policy_loss(logp, old, adv[idx], sub.mask, eps_low=a.eps_low,
                                         eps_high=a.eps_high, dual_clip_c=a.dual_clip_c, agg=a.loss_agg)
                    kl = kl_loss_term(logp, ref_logp[idx, :Tm], sub.mask, kind=a.kl_estimator, agg=a.loss_agg)
                    loss = pg + kl_coef * kl
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    # weight of this micro-batch in the mini-batch mean: tokens for token-mean,
                    # sequences for the per-sequence modes
                    n_tok = float(sub.mask.sum())
                    share = (n_tok / mb_tokens if a.loss_agg == "token-mean"
                             else float((sub.mask.sum(1) > 0).sum()) / max(mb_seqs, 1.0))
                    (loss * share).backward()
                    with torch.no_grad():
                        sums["tokens"] += n_tok
                        sums["entropy"] += float((ent * sub.mask).sum())
                        sums["kl"] += float((kl_penalty(logp, ref_logp[idx, :Tm], a.kl_estimator) * sub.mask).sum())
                        for k in ("pg_loss", "clip_frac_low", "clip_frac_high", "clip_frac",
                                  "dual_clip_frac", "approx_kl"):
                            sums[k] += st[k] * n_tok
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.max_grad_norm) \
                    if finite else torch.tensor(float("nan"))
                if not finite or not torch.isfinite(grad_norm):
                    self.opt.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                self.opt.step()
                self.sched.step()
                steps += 1
                grad_norms.append(float(grad_norm))
        self.num_skipped_updates += skipped
        self.num_optimizer_steps += steps
        n = max(sums.pop("tokens"), 1.0)
        out = {k: v / n for k, v in sums.items()}
        out.update(lr=self.sched.get_last_lr()[0], optimizer_steps=steps, skipped_updates=skipped,
                   trained_tokens=int(seq.mask.sum()),
                   grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else math.nan)
        return out

    def get_weights(self) -> dict[str, torch.Tensor]:
        return state_dict_for_sync(self.model)

    def save(self, path: str) -> None:
        """Policy weights in HF format (transformers and vLLM load them) + optimizer state."""
        p = Path(path)
        self.model.save_pretrained(p, safe_serialization=True)
        torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "num_optimizer_steps": self.num_optimizer_steps,
                    "num_skipped_updates": self.num_skipped_updates}, p / "learner_state.pt")

    def ping(self) -> str:
        return "ok"
