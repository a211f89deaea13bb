"""LearnerActor: the policy update, on one process (engine torch) or as one of
learner.num_actors data-parallel ranks (engine deepspeed, ZeRO).

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

Data parallel: every rank gets the whole batch (zero-copy from the object store) and the same
mini-batch order; each takes its share of each mini-batch's rows, weighted by that share of the
mini-batch's aggregate, so that the summed (DeepSpeed: averaged, hence x world size) gradient
is the one-process gradient and the update the same within float rounding. Every rank runs the
same number of forward passes (ZeRO-3 gathers parameters in each).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from prorl_actors import batch as B
from prorl_actors.algo import aggregate_loss, kl_penalty, mask_truncated, policy_loss
from prorl_actors.checkpoint import weights_digest
from prorl_actors.engines import weight_sync as ws
from prorl_actors.engines.torch_policy import batched_logp, load_causal_lm, pick_device, response_logp
from prorl_actors.engines.train import init_process_group, make_train_engine
from prorl_actors.spec import AlgorithmSpec, LearnerSpec


class LearnerActor:
    def __init__(self, model_path: str, spec: LearnerSpec, algo: AlgorithmSpec, temperature: float,
                 group_size: int, max_new_tokens: int, pad_id: int, seed: int, rank: int = 0,
                 world_size: int = 1, dist_url: str | None = None):
        """rank, world_size, dist_url (tcp://host:port of rank 0): the data-parallel group (deepspeed)."""
        torch.manual_seed(seed)
        torch.set_num_threads(spec.num_threads)
        self.device = pick_device(spec.num_gpus)
        self.rank, self.world_size = rank, world_size
        if spec.engine == "deepspeed":
            init_process_group(dist_url or "tcp://127.0.0.1:29500", rank, world_size,
                               "nccl" if self.device.type == "cuda" else "gloo")
        # master weights stay float32 whatever model.dtype says: bf16 weights would round
        # lr-sized AdamW updates away; compute in bf16 with learner.autocast_bf16 (torch) or
        # learner.deepspeed.bf16 (fp32 master weights inside the ZeRO optimizer)
        self.model = load_causal_lm(model_path, "float32").to(self.device).train()
        if spec.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False
        self.engine = make_train_engine(self.model, spec)
        self.spec, self.algo = spec, algo
        self.temperature, self.G, self.pad_id = temperature, group_size, pad_id
        self.max_new_tokens = max_new_tokens
        self.num_skipped_updates = 0
        self.num_optimizer_steps = 0
        self._sync_store, self._sync_pg = None, None

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.engine.opt

    @property
    def sched(self):
        return self.engine.sched

    def reset_optimizer(self) -> None:
        """Fresh AdamW state (moments and step count) and warm-up, as at a ProRL reference reset."""
        self.engine.reset_optimizer()

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
        """One update on a batch; entropy_coef: the bonus's coefficient (None: the spec's).
        Every rank is called with the same batch and returns the same figures (all ranks')."""
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
        old_logp = None if on_policy else self._old_logp(seq)                     # (B, T)
        # Dr.GRPO's mode divides by a constant length, so pad every micro-batch to it
        width = self.max_new_tokens if a.loss_agg == "seq-mean-token-sum-norm" else None
        loss_stats = ("pg_loss", "clip_frac_low", "clip_frac_high", "clip_frac", "dual_clip_frac", "approx_kl")
        keys = ("entropy", "kl", *loss_stats, "sampler_logp_gap")
        sums = dict.fromkeys(("tokens", "gap_tokens") + keys, 0.0)
        tasks = rollouts[B.TASK].to_pylist()                                       # (B,)
        task_ent: dict[str, list[float]] = {}    # task -> [entropy sum, tokens], first epoch
        grad_norms, steps, skipped = [], 0, 0
        model = self.engine.module
        for epoch in range(s.num_epochs):
            perm = self._same_on_every_rank(torch.randperm(n_groups))
            for start in range(0, n_groups, s.num_prompts_per_mini_batch):
                groups = perm[start:start + s.num_prompts_per_mini_batch]
                rows = (groups[:, None] * G + torch.arange(G)).flatten()          # (mb * G,)
                mb_mask = seq.mask[rows]
                if mb_mask.sum() == 0:
                    continue
                self.engine.zero_grad()
                mb_sums = dict.fromkeys(sums, 0.0)  # counted only if this optimizer step is taken
                mb_task: dict[str, list[float]] = {}
                micro = self._my_micro_batches(rows)
                for m, (idx, weight) in enumerate(micro):
                    sub = seq.rows(idx, width).to(self.device)
                    Tm = sub.mask.shape[1]
                    logp, ent = response_logp(model, sub, self.temperature, with_entropy=True,
                                              autocast_bf16=s.autocast_bf16, entropy_grad=bool(ent_coef))  # (b, Tm)
                    old = logp.detach() if on_policy else _fit(old_logp[idx], Tm).to(self.device)
                    ref = _fit(ref_logp[idx], Tm).to(self.device)
                    pg, st = policy_loss(logp, old, adv[idx].to(self.device), sub.mask, eps_low=a.eps_low,
                                         eps_high=a.eps_high, dual_clip_c=a.dual_clip_c, agg=a.loss_agg)
                    kl_tok = kl_penalty(logp, ref, a.kl_estimator)                   # (b, Tm)
                    loss = pg + kl_coef * aggregate_loss(kl_tok, sub.mask, a.loss_agg)
                    if ent_coef:   # an entropy bonus (0 in the paper)
                        loss = loss - ent_coef * aggregate_loss(ent, sub.mask, a.loss_agg)
                    # a non-finite loss makes non-finite gradients: the step below is skipped on
                    # every rank (the engines check the global gradient norm)
                    share = self._micro_share(sub.mask, mb_mask) * weight * self.world_size
                    self.engine.backward(loss * share, last=m == len(micro) - 1)
                    if not weight:
                        continue
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
                grad_norm = self.engine.step()
                if grad_norm is None:
                    skipped += 1
                    continue
                steps += 1
                grad_norms.append(grad_norm)
                for k, v in mb_sums.items():
                    sums[k] += v
                _add_tasks(task_ent, mb_task)
        sums, task_ent = self._all_ranks(sums, task_ent)
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

    # ------------------------------------------------------------------ data parallel
    def _my_micro_batches(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
        """This rank's micro-batches of a mini-batch's rows -> [(row indices, weight)]. The rows are
        cut into world_size x n pieces (n the same on every rank); rank r takes pieces r*n..r*n+n-1.
        A rank left without rows (fewer rows than ranks) runs one row with weight 0, so that every
        rank runs the same passes."""
        W = self.world_size
        n = max(1, math.ceil(len(rows) / (W * self.spec.micro_batch_size)))
        pieces = np.array_split(np.arange(len(rows)), W * n)[self.rank * n:(self.rank + 1) * n]
        return [(rows[p], 1.0) if len(p) else (rows[:1], 0.0) for p in pieces]

    def _same_on_every_rank(self, perm: torch.Tensor) -> torch.Tensor:
        """Rank 0's mini-batch order, on every rank."""
        if self.world_size > 1:
            import torch.distributed as dist
            perm = perm.to(self.device)
            dist.broadcast(perm, 0)
            perm = perm.cpu()
        return perm

    def _all_ranks(self, sums: dict, task_ent: dict) -> tuple[dict, dict]:
        """Each rank's sums of figures -> the sums over all ranks."""
        if self.world_size == 1:
            return sums, task_ent
        import torch.distributed as dist
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, (sums, task_ent))
        total = dict.fromkeys(sums, 0.0)
        tasks: dict[str, list[float]] = {}
        for part_sums, part_tasks in parts:
            for k, v in part_sums.items():
                total[k] += v
            _add_tasks(tasks, part_tasks)
        return total, tasks

    def _old_logp(self, seq) -> torch.Tensor:
        """Logprobs of every row under the current weights -> (B, T) on the CPU; each rank scores
        its share of the rows (in the same number of passes) and the shares are gathered."""
        model, s = self.engine.module, self.spec
        if self.world_size == 1:
            return batched_logp(model, seq, self.temperature, s.micro_batch_size, s.autocast_bf16, self.device)
        import torch.distributed as dist
        mine = torch.zeros_like(seq.mask)                                        # (B, T)
        with torch.no_grad():
            for idx, weight in self._my_micro_batches(torch.arange(seq.mask.shape[0])):
                logp, _ = response_logp(model, seq.rows(idx).to(self.device), self.temperature,
                                        autocast_bf16=s.autocast_bf16)
                if weight:
                    mine[idx, :logp.shape[1]] = logp.float().cpu()
        mine = mine.to(self.device)
        dist.all_reduce(mine)          # each row is scored by exactly one rank; the others add zeros
        return mine.cpu()

    def get_weights(self) -> dict[str, torch.Tensor] | None:
        """The policy's weights under checkpoint names, on the CPU (rank 0; None on the others). A
        tied `lm_head.weight` is included on purpose: vLLM on CPU keeps a repacked copy of the LM
        head that an update not naming it would leave stale. Collective under ZeRO-3."""
        return self.engine.full_state_dict()

    # ------------------------------------------------------------------ weight broadcast
    def open_sync_group(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Rank 0: host a new weight-broadcast group's store -> (host, port) for its members."""
        self._sync_pg = None
        self._sync_store = ws.open_store(world_size, timeout_s)
        return ws.node_ip(), self._sync_store.port

    def join_sync_group(self, world_size: int, timeout_s: float) -> bool:
        """Rank 0 joins as the group's rank 0 (blocks until every member has joined)."""
        self._sync_pg = ws.join_group(self._sync_store, 0, 0, world_size,
                                      "nccl" if self.device.type == "cuda" else "gloo", timeout_s)
        return True

    def weights_meta(self) -> ws.Meta | None:
        sd = self.engine.full_state_dict()
        return ws.weights_meta(sd) if sd is not None else None

    def push_weights(self, meta: ws.Meta, bucket_bytes: int) -> None:
        """Broadcast the current weights to the group (rank 0 sends; under ZeRO-3 every rank takes
        part in gathering them)."""
        sd = self.engine.full_state_dict()
        if sd is not None:
            ws.broadcast_weights(self._sync_pg, meta, sd, self.device, bucket_bytes)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str) -> str | None:
        """Policy weights in HF format (transformers and vLLM load them) + everything else a resume
        needs to continue exactly: AdamW moments (DeepSpeed: each rank's partition under
        deepspeed/), LR schedule, RNG states, counters. -> the digest of the weights saved (rank 0).
        Every rank must call it."""
        p = Path(path)
        sd = self.engine.full_state_dict()
        extra = self.engine.save(p)
        rng = {"torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}
        if self.rank > 0:
            torch.save(rng, p / f"learner_rng_rank{self.rank}.pt")
            return None
        self.model.save_pretrained(p, state_dict=sd, safe_serialization=True)
        engine, world, ds = self._layout()
        torch.save({**extra, **rng, "engine": engine, "world_size": world, "deepspeed": ds,
                    "num_optimizer_steps": self.num_optimizer_steps, "num_skipped_updates": self.num_skipped_updates},
                   p / "learner_state.pt")
        return weights_digest(sd)

    def load_state(self, path: str) -> str | None:
        """After construction from a checkpoint's weights: its optimizer, schedule, RNG and counters.
        -> the digest of the weights now held (rank 0), to compare with the one recorded at save."""
        p = Path(path)
        st = torch.load(p / "learner_state.pt", weights_only=False)
        saved = (st.get("engine", "torch"), st.get("world_size", 1), st.get("deepspeed"))
        if saved != self._layout():
            raise ValueError(f"{path}: saved by learner engine {saved[0]} with {saved[1]} rank(s) ({saved[2]}); this "
                             f"run has {self._layout()} (optimizer state cannot be carried across)")
        self.engine.load(p, st)
        self.num_optimizer_steps, self.num_skipped_updates = st["num_optimizer_steps"], st["num_skipped_updates"]
        rng = st if self.rank == 0 else torch.load(p / f"learner_rng_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch_rng"])
        if rng["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda_rng"])
        return self.weights_digest()

    def _layout(self) -> tuple[str, int, dict | None]:
        """What a checkpoint's optimizer state depends on: engine, ranks, ZeRO settings."""
        ds = dataclasses.asdict(self.spec.deepspeed) if self.engine.name == "deepspeed" else None
        return self.engine.name, self.world_size, ds

    def weights_digest(self) -> str | None:
        sd = self.engine.full_state_dict()
        return weights_digest(sd) if sd is not None else None

    def ping(self) -> str:
        return "ok"


def _add_tasks(into: dict[str, list[float]], more: dict[str, list[float]]) -> None:
    """task -> [entropy sum, tokens]: `more` added into `into`."""
    for t, (e_sum, n_tok) in more.items():
        acc = into.setdefault(t, [0.0, 0.0])
        acc[0] += e_sum
        acc[1] += n_tok


def _fit(x: torch.Tensor, width: int) -> torch.Tensor:
    """(b, T) -> (b, width): cut or zero-pad the token axis."""
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))
