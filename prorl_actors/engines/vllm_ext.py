"""vLLM worker extension: in-place weight update (from a safetensors blob, or received over the
weight-broadcast group, one rank per worker), and reseeding.

Plain `model.load_weights()` fails on CPU (weights are repacked for CPU kernels);
`reload_weights` runs the loader's post-processing again.
"""
from __future__ import annotations


class WeightSyncExtension:
    def prorl_load_weights(self, blob: bytes) -> None:
        from safetensors.torch import load
        self.reload_weights(weights_iterator=iter(load(blob).items()))

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
        self.reload_weights(weights_iterator=iter(weights.items()))

    def prorl_seed(self, seed: int) -> None:
        """The worker's torch RNG, which vLLM's sampler draws from for requests without a seed of
        their own (per-request seeds crash vLLM on CPU)."""
        import torch
        torch.manual_seed(seed)
