"""LearnerActor: the policy update, on one process (engine torch) or as one of
learner.num_actors data-parallel ranks (engine deepspeed, ZeRO).

One call to `update` trains on one rollout batch. Every per-token figure is a flat (N,)
tensor over the batch's N real response tokens (no padding):
  1. the batch's groups, in a random order, are cut into ceil(groups / num_prompts_per_mini_batch)
     mini-batches of equal size (within one group) per epoch: one optimizer step each;
  2. old_logp (what the clipped surrogate's ratio is measured against) <- the log-probs of the
     weights before the update. The first mini-batch's rows are trained before any step, so
     theirs is logp.detach() (ratio 1, no extra pass); only the other rows get a forward pass
     without gradients, first. (Recomputed rather than the sampler's numbers, which come from
     another engine and kernel; their gap is reported as sampler_logp_gap.)
  3. per mini-batch, over micro-batches (learner.max_tokens_per_micro_batch: rows sorted by
     length, bounded by tokens; or micro_batch_size rows):
       loss = sum_tokens w * ( clipped_surrogate(logp, old_logp, adv)   # DAPO decoupled clipping
                             + kl_coef * KL(pi || pi_ref)               # per-token estimator, k3 capped
                             - entropy_coef * entropy )                 # optional bonus (0 in the paper)
     with w the per-row weights of `loss_row_scale`, computed over the whole mini-batch, so that
     the loss of any split of its rows into micro-batches (and ranks) is the aggregate
     (algorithm.loss_agg) of the mini-batch's; gradient clipped, one AdamW step. With overlong
     mode "mask", truncated responses are left out of every term. A non-finite loss or gradient
     on any rank skips that optimizer step on every rank and is counted (engines/train.py FiniteGuard).
  Figures stay tensors until one sync per update.

Data parallel: every rank gets the whole batch (zero-copy from the object store) and the same
mini-batch order; the rows of each mini-batch are shared out with equal token loads (or equal
row counts without a token budget), and each rank's loss is multiplied by the world size, since
DeepSpeed averages the ranks' gradients: the update is the one-process one within float
rounding. Every rank runs the same number of forward passes (ZeRO-3 gathers parameters in each).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from prorl_actors import batch as rb
from prorl_actors.algo import loss_row_scale, mask_truncated, token_objective, token_weights
from prorl_actors.checkpoint import weights_digest
from prorl_actors.engines import weight_sync as ws
from prorl_actors.engines.torch_policy import (DTYPES, TokenScorer, chunk_tokens, load_causal_lm, pick_device,
                                               score_tokens)
from prorl_actors.engines.train import FiniteGuard, init_process_group, make_train_engine
from prorl_actors.quiet import quiet_known_noise
from prorl_actors.roles import RoleActor
from prorl_actors.spec import AlgorithmSpec, LearnerSpec


class LearnerActor(RoleActor):
    def __init__(self, model_path: str, spec: LearnerSpec, algo: AlgorithmSpec, temperature: float,
                 group_size: int, max_new_tokens: int, pad_id: int, seed: int, rank: int = 0,
                 world_size: int = 1, dist_url: str | None = None):
        """rank, world_size, dist_url (tcp://host:port of rank 0): the data-parallel group (deepspeed)."""
        quiet_known_noise()
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
        # what the engines wrap and train: the LM, scoring response tokens (its weights are the LM's)
        self.engine = make_train_engine(TokenScorer(self.model, chunk_tokens(self.model, spec.max_logits_mib)), spec)
        self.guard = FiniteGuard(self.model.parameters(), world_size, self.device)
        self.spec, self.algo = spec, algo
        self.temperature, self.G, self.pad_id = temperature, group_size, pad_id
        self.max_new_tokens = max_new_tokens
        self.num_skipped_updates = 0
        self.num_optimizer_steps = 0
        self._sync_store, self._sync_pg = None, None
        self._pushed = None

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.engine.opt

    @property
    def sched(self):
        return self.engine.sched

    def reset_optimizer(self) -> None:
        """Fresh AdamW state (moments and step count) and warm-up, as at a ProRL reference reset."""
        self.engine.reset_optimizer()

    def update(self, rollouts: pa.Table, kl_coef: float, entropy_coef: float | None = None) -> dict:
        """One update on a batch; entropy_coef: the bonus's coefficient (None: the spec's).
        Every rank is called with the same batch and returns the same figures (all ranks').
        Without REF_LOGP (the supervisor skips the reference when nothing reads the KL) kl_coef
        must be 0 and the KL figures are NaN."""
        s, a = self.spec, self.algo
        rb.check_batch(rollouts, needs=(rb.ADV, rb.REF_LOGP) if kl_coef else (rb.ADV,))
        ent_coef = a.entropy_coef if entropy_coef is None else entropy_coef
        has_ref = rb.REF_LOGP in rollouts.column_names
        seq = rb.to_tensors(rollouts, self.pad_id)                                     # (B, L), (B, T)
        if a.overlong.mode == "mask":   # DAPO overlong filtering: truncated responses get no gradient
            truncated = torch.tensor(rollouts[rb.TRUNCATED].to_numpy(zero_copy_only=False))     # (B,)
            seq = dataclasses.replace(seq, mask=mask_truncated(seq.mask, truncated))
        T, mask = seq.mask.shape[1], seq.mask.bool()                                  # (B, T)
        # every per-token figure is flat over the N real response tokens, row-major
        tok_len = mask.sum(1)                                                         # (B,)
        tok_off = torch.cat([torch.zeros(1, dtype=torch.long), tok_len.cumsum(0)])    # (B + 1,)
        tok_row = torch.repeat_interleave(torch.arange(len(tok_len)), tok_len)        # (N,)
        adv_tok = torch.tensor(rollouts[rb.ADV].to_numpy(), dtype=torch.float32)[tok_row]      # (N,)
        ref_tok = rb.padded(rollouts[rb.REF_LOGP], width=T)[mask] if has_ref else None         # (N,)
        sample_tok = rb.padded(rollouts[rb.SAMPLE_LOGP], width=T)[mask]                          # (N,)
        gid = rollouts[rb.GROUP_ID].to_numpy()                                         # (B,)
        plen, rlen = seq.prompt_len.numpy(), tok_len.numpy()                          # (B,), (B,)
        bounds = rb.group_bounds(rollouts)                                             # (groups + 1,)
        n_groups = len(bounds) - 1
        schedule = [self._mini_batches(n_groups) for _ in range(s.num_epochs)]       # [epoch][mb] -> groups
        rows_of = lambda groups: np.concatenate([np.arange(bounds[g], bounds[g + 1]) for g in groups]) \
            if len(groups) else np.zeros(0, np.int64)                                 # noqa: E731
        # the first mini-batch's rows are trained on before any step: their old_logp is logp.detach()
        # (ratio 1). Every other row needs the log-probs of the weights before this update.
        first = np.zeros(len(tok_len), dtype=bool)                                    # (B,)
        first[rows_of(schedule[0][0]) if n_groups else []] = True
        later = np.flatnonzero(~first)
        old_tok = self._old_logp(seq, later, gid, tok_off)                            # (N,) 0 on `first`
        first_old = torch.zeros_like(old_tok)                    # (N,) filled by the first mini-batch
        stats = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=self.device)
        row_ent = torch.zeros(len(tok_len), dtype=torch.float64, device=self.device)  # (B,) epoch 0 entropy sums
        grad_norms, steps, skipped, model = [], 0, 0, self.engine.module
        opc = a.off_policy_correction
        gap_max = torch.zeros((), dtype=torch.float64, device=self.device)       # max |old - sample| over tokens
        for epoch, mini_batches in enumerate(schedule):
            if epoch == 1:   # the first mini-batch's rows are off-policy from now on: their old_logp
                old_tok = torch.where(torch.from_numpy(first)[tok_row], self._sum_ranks(first_old), old_tok)
            for k, groups in enumerate(mini_batches):
                rows = rows_of(groups)
                if tok_len[rows].sum() == 0:
                    continue
                on_policy = epoch == 0 and k == 0
                scale = loss_row_scale(tok_len[rows], a.loss_agg, self.max_new_tokens)        # (mb rows,)
                row_scale = torch.zeros(len(tok_len))
                row_scale[rows] = scale * self.world_size   # DeepSpeed averages the ranks' gradients
                self.engine.zero_grad()
                mb_stats, mb_ent = torch.zeros_like(stats), torch.zeros_like(row_ent)
                mb_max = torch.zeros((), dtype=torch.float64, device=self.device)
                micro = rb.plan_micro_batches(rows, gid, plen, rlen, self.world_size, s.max_tokens_per_micro_batch,
                                             s.micro_batch_size, s.share_prompts)[self.rank]
                for m, units in enumerate(micro):
                    real = len(units) > 0
                    units = units if real else [rows[:1]]   # a pass with weight 0 (see plan_micro_batches)
                    sub, idx, tok = self._micro_batch(seq, units, tok_off)
                    logp, ent = score_tokens(model, sub.to(self.device), self.temperature, with_entropy=True,
                                             autocast_bf16=s.autocast_bf16, entropy_grad=bool(ent_coef))   # (n,)
                    if on_policy:          # the weights the rows were sampled with: ratio 1
                        old = logp.detach()                                                                  # (n,)
                        if real:
                            first_old[tok] = old.float().cpu()
                    else:
                        old = old_tok[tok].to(self.device)                                                   # (n,)
                    w = row_scale[tok_row[tok]].to(self.device) * float(real)                                # (n,)
                    sample = sample_tok[tok].to(self.device)                                                 # (n,)
                    # the sampler's tokens, weighted towards the proximal policy's (decoupled PPO)
                    is_w, gap = token_weights(old, sample, tok_row[tok].to(self.device), opc.mode, opc.low,
                                              opc.high)                                                      # (n,)
                    loss, terms = token_objective(
                        logp, old, adv_tok[tok].to(self.device), w,
                        ref_tok[tok].to(self.device) if has_ref else None, ent,
                        is_w if opc.mode != "none" else None, eps_low=a.eps_low,
                        eps_high=a.eps_high, dual_clip_c=a.dual_clip_c, kl_coef=kl_coef, kl_estimator=a.kl_estimator,
                        k3_cap=a.k3_cap, entropy_coef=ent_coef)
                    # the guard records a non-finite loss (and makes its gradients NaN) and sees
                    # every gradient: the step below is skipped on every rank if any was not finite
                    self.engine.backward(self.guard.watch(loss), last=m == len(micro) - 1)
                    if not real:
                        continue
                    with torch.no_grad():
                        figures = self._figures(terms, w, ent, units, plen, rlen)
                        if epoch == 0:   # per task; the sampler's logprobs vs the learner's, same weights
                            mb_ent.index_add_(0, tok_row[tok].to(self.device), ent.detach().double())
                            figures["sampler_logp_gap"] = (old - sample).abs().sum()
                            figures["gap_tokens"] = len(tok)
                            figures.update({k: gap[k] for k in GAP_SUMS})
                            mb_max = torch.maximum(mb_max, gap["logp_gap_max"].double())
                        mb_stats += _stat_vector(figures, self.device)
                grad_norm = self.engine.step() if self.guard.all_finite() else self.engine.skip_step()
                if grad_norm is None:                  # skipped: by the guard, or by the engine's own check
                    skipped += 1
                    continue
                steps += 1
                grad_norms.append(grad_norm)
                stats += mb_stats
                row_ent += mb_ent
                gap_max = torch.maximum(gap_max, mb_max)
        stats, row_ent = self._all_ranks(stats, row_ent)
        gap_max = self._max_ranks(gap_max)
        self.num_skipped_updates += skipped
        self.num_optimizer_steps += steps
        st = dict(zip(STAT_KEYS, stats.tolist()))
        n, n_kl, n_gap = st.pop("tokens"), st.pop("kl_tokens"), st.pop("gap_tokens")
        pos, real_pos = st.pop("positions"), st.pop("real_positions")
        pg_sum = st.pop("pg_loss")
        gap = {name: st.pop(k) for k, name in GAP_SUMS.items()}
        out = {k: (v / n if n else math.nan) for k, v in st.items()}
        for k in ("kl", "kl_capped_frac"):
            out[k] = st[k] / n_kl if n_kl else math.nan
        out["sampler_logp_gap"] = st["sampler_logp_gap"] / n_gap if n_gap else math.nan
        out.update({name: v / n_gap if n_gap else math.nan for name, v in gap.items()})
        out["logp_gap_max"] = float(gap_max) if n_gap else math.nan
        out["pg_loss"] = pg_sum / steps if steps else math.nan     # the aggregated loss, mean over the steps
        tasks = np.array(rollouts[rb.TASK].to_pylist())
        row_tok = tok_len.numpy()
        ent_rows = row_ent.numpy()
        for t in sorted(set(tasks.tolist())):
            n_t = row_tok[tasks == t].sum()
            if n_t and steps:
                out[f"entropy/{t}"] = float(ent_rows[tasks == t].sum() / n_t)
        out.update(lr=self.sched.get_last_lr()[0], optimizer_steps=steps, skipped_updates=skipped,
                   trained_tokens=int(mask.sum()), pad_frac=1.0 - real_pos / pos if pos else math.nan,
                   grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else math.nan)
        return out

    def _figures(self, terms: dict, w: torch.Tensor, ent: torch.Tensor, units, plen, rlen) -> dict:
        """A micro-batch's sums of the figures an update reports (tensors; see STAT_KEYS)."""
        low, high = terms["clip_low"], terms["clip_high"]
        computed, real_pos = rb.pass_positions(units, plen, rlen, self.spec.share_prompts)
        figures = {"tokens": len(w), "pg_loss": (w * terms["pg"].detach()).sum() / self.world_size,
                   "entropy": ent.sum(), "clip_frac_low": low.sum(), "clip_frac_high": high.sum(),
                   "clip_frac": (low | high).sum(), "dual_clip_frac": terms["dual_clip"].sum(),
                   "approx_kl": (terms["ratio"].detach() - 1.0 - terms["log_ratio"]).sum(),
                   "positions": computed, "real_positions": real_pos}
        if "kl" in terms:
            figures["kl"], figures["kl_tokens"] = terms["kl"].sum(), len(w)
            if self.algo.kl_estimator == "k3" and self.algo.k3_cap is not None:
                figures["kl_capped_frac"] = (terms["kl"] >= self.algo.k3_cap).sum()
        return figures

    def _mini_batches(self, n_groups: int) -> list[np.ndarray]:
        """One epoch's mini-batches of group indices: a random order (rank 0's, on every rank) cut
        into ceil(n / num_prompts_per_mini_batch) mini-batches of equal size, within one group."""
        perm = self._same_on_every_rank(torch.randperm(n_groups)).numpy()
        k = max(1, math.ceil(n_groups / self.spec.num_prompts_per_mini_batch))
        return [p for p in np.array_split(perm, k) if len(p)]

    # ------------------------------------------------------------------ data parallel
    def _same_on_every_rank(self, perm: torch.Tensor) -> torch.Tensor:
        """Rank 0's mini-batch order, on every rank."""
        if self.world_size > 1:
            import torch.distributed as dist
            perm = perm.to(self.device)
            dist.broadcast(perm, 0)
            perm = perm.cpu()
        return perm

    def _all_ranks(self, stats: torch.Tensor, row_ent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each rank's sums of figures (and per-row entropy sums) -> the sums over all ranks, on the CPU."""
        both = self._sum_ranks(torch.cat([stats, row_ent]))
        return both[:len(stats)], both[len(stats):]

    def _max_ranks(self, x: torch.Tensor) -> float:
        """Each rank's 0-dim `x` -> the largest over the ranks."""
        if self.world_size > 1:
            import torch.distributed as dist
            x = x.to(self.device)
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return float(x)

    def _sum_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank's `x` -> the sum over the ranks, on the CPU (one all-reduce)."""
        if self.world_size > 1:
            import torch.distributed as dist
            x = x.to(self.device)
            dist.all_reduce(x)
        return x.cpu()

    def _micro_batch(self, seq: rb.SeqTensors, units: list[np.ndarray], tok_off: torch.Tensor):
        """A micro-batch's units -> (its tensors on the device, its rows (b,), the flat indices
        (n,) of its tokens among the batch's N, in the order the scorer returns them)."""
        idx = torch.from_numpy(np.concatenate(units))                                  # (b,)
        sub = rb.share_prompts(seq, units) if self.spec.share_prompts else seq.rows(idx)
        tok = _token_index(tok_off, idx)                                               # (n,)
        return sub.to(self.device), idx, tok

    def _old_logp(self, seq, rows: np.ndarray, gid: np.ndarray, tok_off: torch.Tensor) -> torch.Tensor:
        """Log-probs of the response tokens of `rows` under the current weights -> (N,) flat over
        every row's tokens (0 for the rows not asked), on the CPU; each rank scores its share of
        the rows and the shares are summed."""
        s = self.spec
        out = torch.zeros(int(tok_off[-1]), dtype=torch.float32)                     # (N,)
        if not len(rows):
            return out
        plen, rlen = seq.prompt_len.numpy(), seq.mask.sum(1).long().numpy()
        plan = rb.plan_micro_batches(rows, gid, plen, rlen, self.world_size, s.max_tokens_per_micro_batch,
                                    s.micro_batch_size, s.share_prompts)[self.rank]
        with torch.no_grad():
            for units in plan:
                sub, _, tok = self._micro_batch(seq, units or [rows[:1]], tok_off)
                logp, _ = score_tokens(self.engine.module, sub, self.temperature, autocast_bf16=s.autocast_bf16)
                if units:   # (a pass with weight 0 keeps the ranks' passes equal: ZeRO-3 gathers in each)
                    out[tok] = logp.float().cpu()
        return self._sum_ranks(out)      # each row is scored by exactly one rank; the others add zeros

    def get_weights(self, dtype: str | None = None) -> dict[str, torch.Tensor] | None:
        """The policy's weights under checkpoint names, on the CPU, in `dtype` (the generators' and
        the reference's model.dtype; None: the master weights' float32), rank 0; None on the
        others. A tied `lm_head.weight` is included on purpose: vLLM on CPU keeps a repacked copy
        of the LM head that an update not naming it would leave stale. Collective under ZeRO-3."""
        return _cast(self.engine.full_state_dict(), dtype)

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

    def weights_meta(self, dtype: str | None = None) -> ws.Meta | None:
        sd = self.get_weights(dtype)
        return ws.weights_meta(sd) if sd is not None else None

    def push_weights(self, meta: ws.Meta, bucket_bytes: int, dtype: str | None = None, keep: bool = False) -> None:
        """Broadcast the current weights, in `dtype`, to the group (rank 0 sends; under ZeRO-3
        every rank takes part in gathering them). keep: rank 0 keeps a copy of what it sent
        (`pushed_weights`), for a generator that replaces a dead one while this learner has moved
        on to newer weights (rollouts made ahead, supervisor.max_staleness > 0)."""
        sd = self.get_weights(dtype)
        if sd is not None:
            ws.broadcast_weights(self._sync_pg, meta, sd, self.device, bucket_bytes)
            self._pushed = {k: v.clone() for k, v in sd.items()} if keep else None

    def pushed_weights(self) -> dict[str, torch.Tensor] | None:
        """Rank 0: the weights of the last broadcast made with keep=True."""
        return self._pushed

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



def _token_index(tok_off: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tok_off (B + 1,) each row's first token among the batch's N; idx (b,) rows -> (n,) the
    indices of those rows' tokens, row after row."""
    start, n = tok_off[idx], tok_off[idx + 1] - tok_off[idx]                        # (b,), (b,)
    return torch.repeat_interleave(start - n.cumsum(0) + n, n) + torch.arange(int(n.sum()))


def _cast(sd: dict[str, torch.Tensor] | None, dtype: str | None) -> dict[str, torch.Tensor] | None:
    if sd is None or dtype is None:
        return sd
    return {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}


# the figures an update sums over its tokens and micro-batches (one vector, one all-reduce)
STAT_KEYS = ("tokens", "pg_loss", "entropy", "clip_frac_low", "clip_frac_high", "clip_frac", "dual_clip_frac",
             "approx_kl", "kl", "kl_tokens", "kl_capped_frac", "sampler_logp_gap", "gap_tokens", "positions",
             "real_positions", "is_weight_sum", "is_masked_sum", "logp_mismatch_k3_sum", "logp_gap_over_log2_sum")
# the off-policy figures summed over the first epoch's tokens (offpolicy.token_weights) -> their means
GAP_SUMS = {"is_weight_sum": "is_weight_mean", "is_masked_sum": "is_masked_frac",
            "logp_mismatch_k3_sum": "logp_mismatch_k3", "logp_gap_over_log2_sum": "logp_gap_over_log2_frac"}


def _stat_vector(figures: dict, device: torch.device) -> torch.Tensor:
    """{figure: tensor or number} -> (len(STAT_KEYS),) float64 on `device` (0 for those absent)."""
    return torch.stack([torch.as_tensor(figures.get(k, 0.0), dtype=torch.float64, device=device) for k in STAT_KEYS])
