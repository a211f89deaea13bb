"""The learner's guard against non-finite steps (engines/train.py FiniteGuard): on its own, and
through `LearnerActor.update` on every engine and precision this machine runs (torch fp32, torch
with bf16 autocast, DeepSpeed fp32 and bf16, one rank in this process): a batch with one NaN
advantage leaves the weights exactly as they were and counts a skipped update; a finite batch
then trains."""
import math
import socket

import numpy as np
import pytest
import torch

from prorl_actors import batch as rb
from prorl_actors.actors.learner import LearnerActor
from prorl_actors.engines.train import FiniteGuard
from prorl_actors.spec import DeepSpeedSpec, LearnerSpec
from prorl_actors.tinymodel import load_tokenizer

G, GROUPS = 4, 3


def _linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_guard_sees_a_nan_gradient_under_a_finite_loss():
    """torch.where's trap: the branch not taken has a NaN gradient, the loss is finite."""
    lin = _linear()
    guard = FiniteGuard(lin.parameters(), 1, torch.device("cpu"))
    y = lin(torch.ones(1, 3))                                                     # (1, 2)
    shifted = y - y.detach().max() - 1.0                                          # < 0 everywhere
    loss = torch.where(shifted > 0, shifted.sqrt(), shifted).sum()
    guard.watch(loss).backward()
    assert torch.isfinite(loss) and not torch.isfinite(lin.weight.grad).all()
    assert not guard.all_finite()
    lin.zero_grad()
    guard.watch(lin(torch.ones(1, 3)).sum()).backward()
    assert guard.all_finite()                    # all_finite started a new mini-batch


def test_guard_makes_a_nan_loss_poison_its_gradients_and_leaves_a_finite_one_bit_for_bit():
    """A NaN in a term without gradient: plain backward would leave the gradients finite (DeepSpeed
    would step); through watch they are NaN. A finite loss gives exactly the gradients it gives alone."""
    lin = _linear()
    x = torch.randn(4, 3)
    lin(x).pow(2).sum().backward()
    plain = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    guard = FiniteGuard(lin.parameters(), 1, torch.device("cpu"))
    guard.watch(lin(x).pow(2).sum()).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, lin.parameters()))
    assert guard.all_finite()
    lin.zero_grad()
    guard.watch(lin(x).pow(2).sum() + torch.tensor(math.nan)).backward()
    assert all(torch.isnan(p.grad).all() for p in lin.parameters())
    assert not guard.all_finite()


def _rollouts(vocab: int, adv: list[float]):
    """GROUPS prompts x G responses of random tokens, the given advantages (one per row)."""
    rng = np.random.default_rng(0)
    n = GROUPS * G
    responses = [rng.integers(3, vocab, int(rng.integers(3, 9))).tolist() for _ in range(n)]
    t = rb.make_rollouts(prompt_ids=[rng.integers(3, vocab, 6).tolist() for _ in range(n)], response_ids=responses,
                        sample_logp=[[-1.0] * len(r) for r in responses], response_text=[""] * n, task=["t"] * n,
                        item_index=[i // G for i in range(n)], reference=[""] * n,
                        group_id=[i // G for i in range(n)], truncated=[False] * n, policy_version=[0] * n)
    return rb.with_column(t, rb.ADV, adv)


@pytest.fixture
def dist_url(monkeypatch):
    """tcp://127.0.0.1:<free port> for a one-rank DeepSpeed learner in this process; its process
    group and the variables it sets are gone afterwards."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)        # restored on teardown, whatever init_process_group sets
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"tcp://127.0.0.1:{port}"
    if torch.distributed.is_initialized():
        import deepspeed.comm
        deepspeed.comm.destroy_process_group()       # DeepSpeed's cached groups go with it


@pytest.mark.parametrize("engine,bf16", [("torch", False), ("torch", True), ("deepspeed", False),
                                         ("deepspeed", True)])
def test_a_nan_advantage_skips_the_update_on_every_engine(tiny_model, small_spec, dist_url, engine, bf16):
    spec = LearnerSpec(engine=engine, lr=1e-2, num_prompts_per_mini_batch=GROUPS, micro_batch_size=5,
                       autocast_bf16=bf16 and engine == "torch", deepspeed=DeepSpeedSpec(bf16=bf16))
    pad = load_tokenizer(tiny_model).pad_token_id
    learner = LearnerActor(str(tiny_model), spec, small_spec.algorithm, 1.2, G, 8, pad, 0, dist_url=dist_url)
    vocab = learner.model.config.vocab_size
    adv = [1.5, -0.5, -0.5, -0.5] * GROUPS
    w0 = learner.get_weights()
    # one mini-batch in 3 micro-batches; one row's advantage is NaN
    stats = learner.update(_rollouts(vocab, adv[:-1] + [math.nan]), kl_coef=0.0)
    assert (stats["skipped_updates"], stats["optimizer_steps"], learner.num_skipped_updates) == (1, 0, 1)
    assert all(torch.equal(w0[k], v) for k, v in learner.get_weights().items())
    stats = learner.update(_rollouts(vocab, adv), kl_coef=0.0)
    assert (stats["skipped_updates"], stats["optimizer_steps"], learner.num_optimizer_steps) == (0, 1, 1)
    w1 = learner.get_weights()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0) and all(torch.isfinite(v).all() for v in w1.values())
