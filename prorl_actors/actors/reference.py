"""ReferenceActor: log-probabilities of responses under the reference policy."""
from __future__ import annotations

import pyarrow as pa
import torch

from prorl_actors import batch as B
from prorl_actors.engines.torch_policy import (batched_logp, load_causal_lm, load_policy_weights, pick_device,
                                               response_logp)
from prorl_actors.spec import ReferenceSpec


class ReferenceActor:
    def __init__(self, model_path: str, dtype: str, spec: ReferenceSpec, temperature: float, pad_id: int):
        torch.set_num_threads(spec.num_threads)
        self.device = pick_device(spec.num_gpus)
        self.model = load_causal_lm(model_path, dtype).to(self.device).eval()
        self.spec, self.temperature, self.pad_id, self.dtype = spec, temperature, pad_id, dtype
        self.version = 0

    def logprobs(self, rollouts: pa.Table, temperature: float | None = None) -> pa.Table:
        """REF_LOGP added: each response token's logprob at `temperature` (None: the one set at start)."""
        seq = B.to_tensors(rollouts, self.pad_id)
        t = self.temperature if temperature is None else temperature
        logp = batched_logp(self.model, seq, t, self.spec.micro_batch_size,
                            device=self.device)                                   # (B, T)
        lengths = seq.mask.sum(1).long()
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        values = logp[seq.mask.bool()].numpy()          # row-major: each row's tokens in order
        col = pa.ListArray.from_arrays(pa.array(offsets.numpy(), pa.int32()), pa.array(values, pa.float32()))
        return B.with_column(rollouts, B.REF_LOGP, col)

    @torch.no_grad()
    def entropy(self, rollouts: pa.Table, temperature: float) -> float:
        """The reference's token-mean entropy at `temperature` over the responses' positions."""
        seq = B.to_tensors(rollouts, self.pad_id)
        total, tokens = 0.0, 0.0
        for start in range(0, seq.mask.shape[0], self.spec.micro_batch_size):
            sub = seq.rows(torch.arange(start, min(start + self.spec.micro_batch_size, seq.mask.shape[0])))
            _, ent = response_logp(self.model, sub.to(self.device), temperature, with_entropy=True)  # (b, T)
            total += float(ent.sum())
            tokens += float(sub.mask.sum())
        return total / tokens if tokens else float("nan")

    def reset_to(self, state_dict, version: int) -> int:
        """Reference <- the given policy weights (a ProRL reference reset)."""
        load_policy_weights(self.model, state_dict)
        self.version = version
        return version

    def load(self, path: str, version: int) -> int:
        """Reference <- the weights of an HF model directory (a checkpoint's `reference/`, or the
        base model), as at a rollback."""
        self.model = load_causal_lm(path, self.dtype).to(self.device).eval()
        self.version = version
        return version

    def save(self, path: str) -> None:
        """The reference policy in HF format (a checkpoint's `reference/`)."""
        self.model.save_pretrained(path, safe_serialization=True)

    def ping(self) -> str:
        return "ok"
