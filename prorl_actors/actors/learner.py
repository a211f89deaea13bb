"""LearnerActor: the policy update (torch engine).

One call to `update` trains on one rollout batch:
  1. old_logp <- logprobs of the batch under the current weights (the policy that the
     clipped surrogate's ratio is measured against; recomputed rather than trusting the
     sampler's numbers, which come from another engine and kernel). With one epoch over a
     single mini-batch it equals logp.detach() and costs no extra forward pass.
  2. for each epoch, for each mini-batch of `num_prompts_per_mini_batch` whole groups:
       loss = policy_loss(logp, old_logp, adv)        # DAPO decoupled clipping
            + kl_coef * KL(pi || pi_ref)               # per-token estimator, same aggregation
            - entropy_coef * entropy                   # optional bonus (0 in the paper)
     (with overlong mode "mask", truncated responses are left out of every term),
     accumulated over micro-batches, gradient clipped, one AdamW step.
  A non-finite loss or gradient skips that optimizer step and is counted.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pyarrow as pa
import torch

from prorl_actors import batch as B
from prorl_actors.algo import aggregate_loss, kl_penalty, mask_truncated, policy_loss
from prorl_actors.checkpoint import weights_digest
from prorl_actors.engines.torch_policy import (batched_logp, load_causal_lm, pick_device, response_logp,
                                               state_dict_for_sync)
from prorl_actors.spec import AlgorithmSpec, LearnerSpec


class LearnerActor:
    def __init__(self, model_path: str, spec: LearnerSpec, algo: AlgorithmSpec, temperature: float,
                 group_size: int, max_new_tokens: int, pad_id: int, seed: int):
        torch.manual_seed(seed)
        torch.set_num_threads(spec.num_threads)
        self.device = pick_device(spec.num_gpus)
        # master weights stay float32 whatever model.dtype says: bf16 weights would round
        # lr-sized AdamW updates away; compute in bf16 with learner.autocast_bf16
        self.model = load_causal_lm(model_path, "float32").to(self.device).train()
        self.spec, self.algo = spec, algo
        self.temperature, self.G, self.pad_id = temperature, group_size, pad_id
        self.max_new_tokens = max_new_tokens
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

    def _micro_share(self, sub_mask: torch.Tensor, mb_mask: torch.Tensor) -> float:
        """Weight of a micro-batch's aggregated loss in its mini-batch's, so that the sum over
        micro-batches equals the mini-batch aggregate whatever `micro_batch_size` is."""
        mode = self.algo.loss_agg
        if mode == "token-mean":
            return float(sub_mask.sum()) / float(mb_mask.sum())
        if mode == "seq-mean-token-sum-norm":  # every row counts, width is the constant max_new_tokens
            return sub_mask.shape[0] / mb_mask.shape[0]
        return float((sub_mask.sum(1) > 0).sum()) / float((mb_mask.sum(1) > 0).sum())

    def update(self, rollouts: pa.Table, kl_coef: float, entropy_coef: float | None = None) -> dict:
        """One update on a batch; entropy_coef: the bonus's coefficient (None: the spec's)."""
        B.check_batch(rollouts, needs=(B.ADV, B.REF_LOGP))
        s, a, G = self.spec, self.algo, self.G
        ent_coef = a.entropy_coef if entropy_coef is None else entropy_coef
        seq = B.to_tensors(rollouts, self.pad_id)
        if a.overlong.mode == "mask":   # DAPO overlong filtering: truncated responses get no gradient
            truncated = torch.tensor(rollouts[B.TRUNCATED].to_numpy(zero_copy_only=False))     # (B,)
            seq = dataclasses.replace(seq, mask=mask_truncated(seq.mask, truncated))
        T = seq.mask.shape[1]
        adv = torch.tensor(rollouts[B.ADV].to_numpy(), dtype=torch.float32)     # (B,)
        ref_logp = B.padded(rollouts[B.REF_LOGP], width=T) * seq.mask              # (B, T)
        sample_logp = B.padded(rollouts[B.SAMPLE_LOGP], width=T) * seq.mask        # (B, T)
        n_groups = seq.mask.shape[0] // G
        # With one epoch over one mini-batch the policy has not moved when each token's loss is
        # computed, so old_logp IS logp.detach(): skip the extra forward pass (ratio = 1).
        on_policy = s.num_epochs == 1 and n_groups <= s.num_prompts_per_mini_batch
        old_logp = None if on_policy else batched_logp(self.model, seq, self.temperature, s.micro_batch_size,
                                                       s.autocast_bf16, self.device)  # (B, T)
        # Dr.GRPO's mode divides by a constant length, so pad every micro-batch to it
        width = self.max_new_tokens if a.loss_agg == "seq-mean-token-sum-norm" else None
        loss_stats = ("pg_loss", "clip_frac_low", "clip_frac_high", "clip_frac", "dual_clip_frac", "approx_kl")
        keys = ("entropy", "kl", *loss_stats, "sampler_logp_gap")
        sums = dict.fromkeys(("tokens", "gap_tokens") + keys, 0.0)
        tasks = rollouts[B.TASK].to_pylist()                                       # (B,)
        task_ent: dict[str, list[float]] = {}    # task -> [entropy sum, tokens], first epoch
        grad_norms, steps, skipped = [], 0, 0
        for epoch in range(s.num_epochs):
            perm = torch.randperm(n_groups)
            for start in range(0, n_groups, s.num_prompts_per_mini_batch):
                groups = perm[start:start + s.num_prompts_per_mini_batch]
                rows = (groups[:, None] * G + torch.arange(G)).flatten()          # (mb * G,)
                mb_mask = seq.mask[rows]
                if mb_mask.sum() == 0:
                    continue
                self.opt.zero_grad(set_to_none=True)
                mb_sums = dict.fromkeys(sums, 0.0)  # counted only if this optimizer step is taken
                mb_task: dict[str, list[float]] = {}
                finite = True
                for m in range(0, len(rows), s.micro_batch_size):
                    idx = rows[m:m + s.micro_batch_size]
                    sub = seq.rows(idx, width).to(self.device)
                    Tm = sub.mask.shape[1]
                    logp, ent = response_logp(self.model, sub, self.temperature, with_entropy=True,
                                              autocast_bf16=s.autocast_bf16)          # (b, Tm)
                    old = logp.detach() if on_policy else _fit(old_logp[idx], Tm).to(self.device)
                    ref = _fit(ref_logp[idx], Tm).to(self.device)
                    pg, st = policy_loss(logp, old, adv[idx].to(self.device), sub.mask, eps_low=a.eps_low,
                                         eps_high=a.eps_high, dual_clip_c=a.dual_clip_c, agg=a.loss_agg)
                    kl_tok = kl_penalty(logp, ref, a.kl_estimator)                   # (b, Tm)
                    loss = pg + kl_coef * aggregate_loss(kl_tok, sub.mask, a.loss_agg)
                    if ent_coef:   # an entropy bonus (0 in the paper)
                        loss = loss - ent_coef * aggregate_loss(ent, sub.mask, a.loss_agg)
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    (loss * self._micro_share(sub.mask, mb_mask)).backward()
                    with torch.no_grad():
                        n_tok = float(sub.mask.sum())
                        mb_sums["tokens"] += n_tok
                        mb_sums["entropy"] += float((ent * sub.mask).sum())
                        mb_sums["kl"] += float((kl_tok * sub.mask).sum())
                        if epoch == 0:  # per task; the sampler's logprobs vs the learner's, same weights
                            row_ent, row_tok = (ent * sub.mask).sum(1).tolist(), sub.mask.sum(1).tolist()
                            for i, e_sum, n_row in zip(idx.tolist(), row_ent, row_tok):
                                acc = mb_task.setdefault(tasks[i], [0.0, 0.0])
                                acc[0] += e_sum
                                acc[1] += n_row
                            gap = (old - _fit(sample_logp[idx], Tm).to(self.device)).abs()
                            mb_sums["sampler_logp_gap"] += float((gap * sub.mask).sum())
                            mb_sums["gap_tokens"] += n_tok
                        for k in loss_stats:
                            mb_sums[k] += st[k] * n_tok
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
                for k, v in mb_sums.items():
                    sums[k] += v
                for t, (e_sum, n_tok) in mb_task.items():
                    acc = task_ent.setdefault(t, [0.0, 0.0])
                    acc[0] += e_sum
                    acc[1] += n_tok
        self.num_skipped_updates += skipped
        self.num_optimizer_steps += steps
        n, n_gap = sums.pop("tokens"), sums.pop("gap_tokens")
        out = {k: (v / n if n else math.nan) for k, v in sums.items()}
        out["sampler_logp_gap"] = sums["sampler_logp_gap"] / n_gap if n_gap else math.nan
        out.update({f"entropy/{t}": e_sum / n_tok for t, (e_sum, n_tok) in sorted(task_ent.items()) if n_tok})
        out.update(lr=self.sched.get_last_lr()[0], optimizer_steps=steps, skipped_updates=skipped,
                   trained_tokens=int(seq.mask.sum()),
                   grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else math.nan)
        return out

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in state_dict_for_sync(self.model).items()}

    def save(self, path: str) -> str:
        """Policy weights in HF format (transformers and vLLM load them) + everything else a resume
        needs to continue exactly: AdamW moments, LR schedule, RNG states, counters.
        -> the digest of the weights saved."""
        p = Path(path)
        self.model.save_pretrained(p, safe_serialization=True)
        torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "num_optimizer_steps": self.num_optimizer_steps,
                    "num_skipped_updates": self.num_skipped_updates,
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None},
                   p / "learner_state.pt")
        return self.weights_digest()

    def load_state(self, path: str) -> str:
        """After construction from a checkpoint's weights: its optimizer, schedule, RNG and counters.
        -> the digest of the weights now held (to compare with the one recorded at save)."""
        st = torch.load(Path(path) / "learner_state.pt", weights_only=False)
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.num_optimizer_steps, self.num_skipped_updates = st["num_optimizer_steps"], st["num_skipped_updates"]
        torch.set_rng_state(st["torch_rng"])
        if st["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        return self.weights_digest()

    def weights_digest(self) -> str:
        return weights_digest(self.model.state_dict())

    def ping(self) -> str:
        return "ok"


def _fit(x: torch.Tensor, width: int) -> torch.Tensor:
    """(b, T) -> (b, width): cut or zero-pad the token axis."""
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))
