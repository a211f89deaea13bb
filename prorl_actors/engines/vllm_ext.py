"""vLLM worker extension: in-place weight update from a safetensors blob, and reseeding.

Plain `model.load_weights()` fails on CPU (weights are repacked for CPU kernels);
`reload_weights` runs the loader's post-processing again.
"""
from __future__ import annotations


class WeightSyncExtension:
    def prorl_load_weights(self, blob: bytes) -> None:
        from safetensors.torch import load
        self.reload_weights(weights_iterator=iter(load(blob).items()))

    def prorl_seed(self, seed: int) -> None:
        """The worker's torch RNG, which vLLM's sampler draws from for requests without a seed of
        their own (per-request seeds crash vLLM on CPU)."""
        import torch
        torch.manual_seed(seed)
