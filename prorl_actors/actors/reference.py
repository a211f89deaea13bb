"""ReferenceActor: log-probabilities of responses under the reference policy."""
from __future__ import annotations

import pyarrow as pa
import torch

from prorl_actors import batch as B
from prorl_actors.engines.torch_policy import batched_logp, load_causal_lm, load_policy_weights, pick_device
from prorl_actors.spec import ReferenceSpec


class ReferenceActor:
    def __init__(self, model_path: str, dtype: str, spec: ReferenceSpec, temperature: float, pad_id: int):
        torch.set_num_threads(spec.num_threads)
        self.device = pick_device(spec.num_gpus)
        self.model = load_causal_lm(model_path, dtype).to(self.device).eval()
        self.spec, self.temperature, self.pad_id = spec, temperature, pad_id
        self.version = 0

    def logprobs(self, rollouts: pa.Table) -> pa.Table:
        seq = B.to_tensors(rollouts, self.pad_id)
        logp = batched_logp(self.model, seq, self.temperature, self.spec.micro_batch_size,
                            device=self.device)                                   # (B, T)
        lengths = seq.mask.sum(1).long()
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        values = logp[seq.mask.bool()].numpy()          # row-major: each row's tokens in order
        col = pa.ListArray.from_arrays(pa.array(offsets.numpy(), pa.int32()), pa.array(values, pa.float32()))
        return B.with_column(rollouts, B.REF_LOGP, col)

    def reset_to(self, state_dict, version: int) -> int:
        """Reference <- the given policy weights (a ProRL reference reset)."""
        load_policy_weights(self.model, state_dict)
        self.version = version
        return version

    def ping(self) -> str:
        return "ok"
