"""Training backends behind one protocol: plain torch (one process) and DeepSpeed (ZeRO data
parallelism over the learner's ranks). The learner's update loop is the same for both:

    loss = guard.watch(loss)       # FiniteGuard: records whether the loss is finite
    engine.backward(loss, last)    # once per micro-batch; loss already weighted by its share
    grad_norm = engine.step() if guard.all_finite() else engine.skip_step()
                                   # clip, AdamW step, LR schedule; None = skipped (non-finite)

The guard decides for every engine and precision: it sees each loss and each gradient as backward
makes it, and one all-reduce per mini-batch tells every rank whether any was not finite on any
rank, so a NaN in one rank's micro-batch skips the update on every rank. The engines' own checks
stay behind it (torch: the clipped norm; DeepSpeed: its overflow check, set explicitly in bf16).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Protocol

import torch

from prorl_actors.engines.torch_policy import state_dict_for_sync
from prorl_actors.spec import LearnerSpec


def _optimizer(params, s: LearnerSpec) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=s.lr, betas=tuple(s.betas), eps=s.adam_eps, weight_decay=s.weight_decay)


def _warmup(opt: torch.optim.Optimizer, s: LearnerSpec) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over lr_warmup_steps optimizer steps, then constant (ProRL's lr is constant)."""
    warmup = max(s.lr_warmup_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup))


class TrainEngine(Protocol):
    name: str
    module: torch.nn.Module          # what forward passes call: the TokenScorer (DeepSpeed: its engine)
    opt: torch.optim.Optimizer       # the AdamW whose state a reset clears
    sched: torch.optim.lr_scheduler.LambdaLR

    def backward(self, loss: torch.Tensor, last: bool) -> None: ...
    def step(self) -> float | None: ...
    def skip_step(self) -> None: ...   # the gradients dropped, weights and optimizer state untouched
    def zero_grad(self) -> None: ...
    def reset_optimizer(self) -> None: ...
    def full_state_dict(self) -> dict[str, torch.Tensor] | None: ...
    def save(self, path: Path) -> dict: ...
    def load(self, path: Path, learner_state: dict) -> None: ...


class FiniteGuard:
    """Whether a mini-batch's losses and gradients were all finite, on every rank, whatever the engine.

    A hook on each parameter sees its gradient as backward computes it, before an engine takes it
    (DeepSpeed moves gradients into its ZeRO partitions: `p.grad` is no place to look). A tensor's
    sum is not finite when any element is not (NaN and inf propagate; an overflowing sum of finite
    values also counts, as it would make the gradient norm infinite). The flag stays a tensor on the
    device: no sync per micro-batch, one all-reduce per mini-batch."""

    def __init__(self, params, world_size: int, device: torch.device):
        self.world_size = world_size
        self._ok = torch.ones((), dtype=torch.bool, device=device)
        self._hooks = [p.register_hook(self._see_grad) for p in params if p.requires_grad]

    def _see_grad(self, grad: torch.Tensor) -> None:
        self._ok &= torch.isfinite(grad.sum()).to(self._ok.device)

    def watch(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backward: the same value when finite (times 1.0: bit for bit); when not, NaN
        times it, so that every gradient it reaches is NaN. A NaN in a term without gradient would
        otherwise leave the gradients finite, and DeepSpeed, which sees only those, would step."""
        finite = torch.isfinite(loss.detach())
        self._ok &= finite
        return loss * torch.where(finite, 1.0, float("nan"))

    def all_finite(self) -> bool:
        """Everything seen since the last call was finite on every rank (a collective with more than
        one rank: every rank calls it once per mini-batch). Starts the next mini-batch."""
        ok = self._ok.to(torch.int32)
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        self._ok.fill_(True)
        return bool(ok)


class TorchEngine:
    """One process, fp32 master weights, torch AdamW."""
    name = "torch"

    def __init__(self, model: torch.nn.Module, spec: LearnerSpec):
        """model: a TokenScorer (engines/torch_policy.py), whose `lm` holds the weights."""
        self.module, self.spec = model, spec
        self.opt = _optimizer(model.parameters(), spec)
        self.sched = _warmup(self.opt, spec)

    def backward(self, loss, last):
        loss.backward()

    def step(self) -> float | None:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.spec.max_grad_norm)
        if not torch.isfinite(norm):
            self.zero_grad()
            return None
        self.opt.step()
        self.sched.step()
        return float(norm)      # the gradients stay until the next zero_grad (tests read them)

    def skip_step(self) -> None:
        self.zero_grad()

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def reset_optimizer(self):
        self.opt = _optimizer(self.module.parameters(), self.spec)
        self.sched = _warmup(self.opt, self.spec)

    def full_state_dict(self):
        return {k: v.cpu() for k, v in state_dict_for_sync(self.module.lm).items()}

    def save(self, path: Path) -> dict:
        """-> what goes into learner_state.pt beside the counters and RNG."""
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load(self, path: Path, learner_state: dict) -> None:
        self.opt.load_state_dict(learner_state["optimizer"])
        self.sched.load_state_dict(learner_state["scheduler"])


def init_process_group(dist_url: str, rank: int, world_size: int, backend: str) -> None:
    """The learner ranks' default process group (DeepSpeed reduces gradients over it)."""
    host, port = dist_url.removeprefix("tcp://").rsplit(":", 1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR=host,
                      MASTER_PORT=port)   # Ray gives each GPU actor its own device: local rank 0
    import deepspeed
    if backend == "gloo":   # its shared-memory CPU op compiles for minutes on first use; gloo is enough
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, init_method=dist_url, rank=rank, world_size=world_size)


class DeepSpeedEngine:
    """ZeRO (stage 1-3) over the ranks of the default process group.

    Gradient accumulation is ours: the accumulation boundary is set on each rank's last micro-batch,
    then one step. ZeRO-1 accumulates locally and reduces the gradients once, at the boundary;
    ZeRO-2 and 3 partition the gradients, so DeepSpeed reduce-scatters them in every micro-batch's
    backward (one reduction per micro-batch: fewer, larger micro-batches by tokens cost fewer).
    DeepSpeed clips by the global norm and skips a step whose gradients are not finite (in bf16
    under ZeRO-2, and ZeRO-1 with offload, only with bf16.check_grad_overflow, whose default has
    changed between releases: set here)."""
    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, spec: LearnerSpec):
        import deepspeed
        self.spec, ds = spec, spec.deepspeed
        zero: dict = {"stage": ds.zero_stage}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu"}
        self.config = {
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,   # we accumulate
            "gradient_clipping": spec.max_grad_norm, "zero_optimization": zero,
            # a bf16 step with non-finite gradients skipped (the ZeRO-1/2 optimizer reads it; bf16
            # ZeRO-1 without offload and ZeRO-3 always skip): its default has changed between
            # DeepSpeed releases (0.19.8's is on)
            "bf16": {"enabled": ds.bf16, "check_grad_overflow": True},
            "steps_per_print": 10**9, "wall_clock_breakdown": False,
        }
        if ds.bf16:   # bf16 compute, but micro-batch gradients summed (and reduced) in fp32, as in the torch engine
            self.config["data_types"] = {"grad_accum_dtype": "fp32"}
            self.config["communication_data_type"] = "fp32"
        if ds.offload_optimizer:   # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam
            self.config["optimizer"] = {"type": "AdamW", "params": {
                "lr": spec.lr, "betas": list(spec.betas), "eps": spec.adam_eps, "weight_decay": spec.weight_decay}}
            optimizer = None
        else:
            optimizer = _optimizer(model.parameters(), spec)
        self.module, self._ds_opt, _, self.sched = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config, lr_scheduler=lambda o: _warmup(o, spec))

    @property
    def opt(self) -> torch.optim.Optimizer:
        """The AdamW inside the ZeRO optimizer (its state is per rank: its partition)."""
        return getattr(self._ds_opt, "optimizer", self._ds_opt)

    def backward(self, loss, last):
        """`last`: the mini-batch's last micro-batch on this rank (every rank has one): ZeRO-1 reduces
        the accumulated gradients across the ranks there; ZeRO-2/3 reduce in every backward."""
        self.module.set_gradient_accumulation_boundary(last)
        self.module.backward(loss, scale_wrt_gas=False)

    def step(self) -> float | None:
        self.module.step()
        if not self.module.was_step_applied():
            return None
        norm = self.module.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def skip_step(self) -> None:
        """A step the guard refused. Only DeepSpeed's own step discards the gradients cleanly (its
        partitions, buffers and accumulation counters, on every rank), and it sees them as the guard
        did: a non-finite gradient on any rank reaches the reduced ones, and the guard made every
        gradient of a non-finite loss NaN; its overflow check then skips the update."""
        self.module.step()
        if self.module.was_step_applied():
            raise RuntimeError("DeepSpeed applied a step whose loss or gradients were not finite (is its overflow "
                               "check off?)")

    def zero_grad(self):
        self.module.zero_grad()

    def reset_optimizer(self):
        """Adam's moments and step counts cleared on every rank (AdamW re-creates them at the next
        step, as for a new optimizer) and the warm-up started again."""
        self.opt.state.clear()
        for group in self.opt.param_groups:
            group["lr"] = self.spec.lr
            group.pop("initial_lr", None)
        self.sched = _warmup(self.opt, self.spec)
        self.module.lr_scheduler = self.sched

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (None on the others). Collective under ZeRO-3:
        every rank must call it (the partitions are gathered)."""
        import deepspeed
        import torch.distributed as dist
        model = self.module.module.lm        # engine -> TokenScorer -> the HF model
        params = list(model.parameters())
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.spec.deepspeed.zero_stage == 3 \
            else contextlib.nullcontext()
        with gather:
            if dist.get_rank() != 0:
                return None
            return {k: v.cpu() for k, v in state_dict_for_sync(model).items()}

    def save(self, path: Path) -> dict:
        """Collective: every rank writes its ZeRO partition (and rank 0 the module and schedule)
        under path/deepspeed/."""
        self.module.save_checkpoint(str(path / "deepspeed"), tag="state", save_latest=False)
        return {}

    def load(self, path: Path, learner_state: dict) -> None:
        self.module.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        self.sched = self.module.lr_scheduler


def make_train_engine(model: torch.nn.Module, spec: LearnerSpec) -> TrainEngine:
    return DeepSpeedEngine(model, spec) if spec.engine == "deepspeed" else TorchEngine(model, spec)
