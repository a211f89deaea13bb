"""vLLM worker extension: in-place weight update from a safetensors blob.

Plain `model.load_weights()` fails on CPU (weights are repacked for CPU kernels);
`reload_weights` runs the loader's post-processing again.
"""
from __future__ import annotations


class WeightSyncExtension:
    def prorl_load_weights(self, blob: bytes) -> None:
        from safetensors.torch import load
        self.reload_weights(weights_iterator=iter(load(blob).items()))
