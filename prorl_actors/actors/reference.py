"""ReferenceActor: log-probabilities of responses under the reference policy."""
from __future__ import annotations

import pyarrow as pa
import torch

from prorl_actors import batch as rb
from prorl_actors.engines.torch_policy import (TokenScorer, batched_logp, chunk_tokens, load_causal_lm,
                                               load_policy_weights, pick_device)
from prorl_actors.quiet import quiet_known_noise
from prorl_actors.roles import RoleActor
from prorl_actors.spec import ReferenceSpec


class ReferenceActor(RoleActor):
    def __init__(self, model_path: str, dtype: str, spec: ReferenceSpec, temperature: float, pad_id: int):
        quiet_known_noise()
        torch.set_num_threads(spec.num_threads)
        self.device = pick_device(spec.num_gpus)
        self.spec, self.temperature, self.pad_id, self.dtype = spec, temperature, pad_id, dtype
        self._load(model_path)
        self.version = 0

    def logprobs(self, rollouts: pa.Table, temperature: float | None = None) -> pa.Table:
        """REF_LOGP added: each response token's logprob at `temperature` (None: the one set at start)."""
        seq = rb.to_tensors(rollouts, self.pad_id)
        t = self.temperature if temperature is None else temperature
        logp = batched_logp(self.scorer, seq, t, self.spec.micro_batch_size, device=self.device,
                            max_tokens=self.spec.max_tokens_per_micro_batch, group_ids=self._groups(rollouts))  # (B, T)
        lengths = seq.mask.sum(1).long()
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        values = logp[seq.mask.bool()].numpy()          # row-major: each row's tokens in order
        col = pa.ListArray.from_arrays(pa.array(offsets.numpy(), pa.int32()), pa.array(values, pa.float32()))
        return rb.with_column(rollouts, rb.REF_LOGP, col)

    @torch.no_grad()
    def entropy(self, rollouts: pa.Table, temperature: float) -> float:
        """The reference's token-mean entropy at `temperature` over the responses' positions."""
        seq = rb.to_tensors(rollouts, self.pad_id)
        _, ent = batched_logp(self.scorer, seq, temperature, self.spec.micro_batch_size, device=self.device,
                              max_tokens=self.spec.max_tokens_per_micro_batch, with_entropy=True,
                              group_ids=self._groups(rollouts))                                   # (B, T)
        tokens = float(seq.mask.sum())
        return float(ent.sum()) / tokens if tokens else float("nan")

    def _groups(self, rollouts: pa.Table):
        """(B,) group ids when prompts are shared (rows of a group share one prompt pass), else None."""
        return rollouts[rb.GROUP_ID].to_numpy() if self.spec.share_prompts else None

    def reset_to(self, state_dict, version: int) -> int:
        """Reference <- the given policy weights (a ProRL reference reset)."""
        load_policy_weights(self.model, state_dict)
        self.version = version
        return version

    def load(self, path: str, version: int) -> int:
        """Reference <- the weights of an HF model directory (a checkpoint's `reference/`, or the
        base model), as at a rollback."""
        self._load(path)
        self.version = version
        return version

    def _load(self, path: str) -> None:
        self.model = load_causal_lm(path, self.dtype).to(self.device).eval()
        self.scorer = TokenScorer(self.model, chunk_tokens(self.model, self.spec.max_logits_mib))

    def save(self, path: str) -> None:
        """The reference policy in HF format (a checkpoint's `reference/`)."""
        self.model.save_pretrained(path, safe_serialization=True)
