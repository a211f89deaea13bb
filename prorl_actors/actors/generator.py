"""GeneratorActor: samples G responses per prompt and returns them as an Arrow batch."""
from __future__ import annotations

import dataclasses
import zlib

import pyarrow as pa

from prorl_actors import batch as rb
from prorl_actors.engines.generation import SamplingSpec, make_engine
from prorl_actors.quiet import quiet_known_noise
from prorl_actors.roles import RoleActor
from prorl_actors.spec import GeneratorSpec

# the actor's process environment (the vLLM engine sets its own VLLM_* variables before importing vllm)
GENERATOR_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class GeneratorActor(RoleActor):
    def __init__(self, model_path: str, dtype: str, spec: GeneratorSpec, seed: int):
        quiet_known_noise()
        self.engine = make_engine(model_path, dtype, spec, seed)
        self.version = 0

    def generate(self, prompts: pa.Table, sp: SamplingSpec) -> pa.Table:
        """prompts: one row per prompt with PROMPT_IDS, TASK, ITEM_INDEX, REFERENCE, GROUP_ID
        -> rollouts: G consecutive rows per prompt (ROLLOUT_SCHEMA)."""
        prompt_ids = prompts[rb.PROMPT_IDS].to_pylist()
        # the seed of this shard: the call's and its first prompt's item (shards of one call draw
        # different noise; the same shard sent again, to a replacement, draws the same)
        first = zlib.crc32(f"{prompts[rb.TASK][0]}:{prompts[rb.ITEM_INDEX][0]}".encode()) if prompts.num_rows else 0
        sp = dataclasses.replace(sp, seed=(sp.seed * 1_000_003 + first) % 2**31)
        samples = self.engine.generate(prompt_ids, sp)
        rep = lambda col: [v for v in prompts[col].to_pylist() for _ in range(sp.n)]  # noqa: E731
        flat = [s for group in samples for s in group]
        return rb.make_rollouts(
            prompt_ids=rep(rb.PROMPT_IDS), response_ids=[s.response_ids for s in flat],
            sample_logp=[s.logp for s in flat], response_text=[s.text for s in flat],
            task=rep(rb.TASK), item_index=rep(rb.ITEM_INDEX), reference=rep(rb.REFERENCE),
            group_id=rep(rb.GROUP_ID), truncated=[s.truncated for s in flat],
            policy_version=[self.version] * len(flat))

    def extend(self, rows: pa.Table, sp: SamplingSpec) -> pa.Table:
        """In-flight weight updates (generator.in_flight_updates): unfinished rollouts (their
        responses so far) -> the same rows, each response continued by up to sp.max_new_tokens
        tokens with the weights held now (one sample per row; sp.n is ignored); TRUNCATED says
        whether this piece ended without EOS, POLICY_VERSION_MAX becomes this generator's version.
        The other columns pass through."""
        prompt_ids, so_far = rows[rb.PROMPT_IDS].to_pylist(), rows[rb.RESPONSE_IDS].to_pylist()
        first = zlib.crc32(f"{rows[rb.TASK][0]}:{rows[rb.ITEM_INDEX][0]}:{len(so_far[0])}".encode()) if rows.num_rows else 0
        sp = dataclasses.replace(sp, n=1, seed=(sp.seed * 1_000_003 + first) % 2**31)
        samples = [g[0] for g in self.engine.generate([p + r for p, r in zip(prompt_ids, so_far)], sp)]
        ids = [r + s.response_ids for r, s in zip(so_far, samples)]
        logp = [old + s.logp for old, s in zip(rows[rb.SAMPLE_LOGP].to_pylist(), samples)]
        types = {f.name: f.type for f in rb.ROLLOUT_SCHEMA}
        for col, values in ((rb.RESPONSE_IDS, ids), (rb.SAMPLE_LOGP, logp),
                            (rb.RESPONSE_TEXT, [self.engine.decode(i) for i in ids]),
                            (rb.TRUNCATED, [s.truncated for s in samples])):
            rows = rows.set_column(rows.schema.get_field_index(col), col, pa.array(values, types[col]))
        return rb.with_column(rows, rb.POLICY_VERSION_MAX, [self.version] * rows.num_rows)

    def set_weights(self, state_dict, version: int) -> int:
        """Weights from the object store -> the version now held."""
        self.engine.load_weights(state_dict)
        self.version = version
        return version

    def join_sync_group(self, host: str, port: int, rank_base: int, world_size: int, backend: str,
                        timeout_s: float) -> bool:
        """Join the weight-broadcast group (its worker i as rank rank_base + i)."""
        self.engine.join_sync_group(host, port, rank_base, world_size, backend, timeout_s)
        return True

    def receive_weights(self, meta, bucket_bytes: int, version: int) -> int:
        """Weights broadcast by learner rank 0 -> the version now held."""
        self.engine.receive_weights(meta, bucket_bytes)
        self.version = version
        return version
