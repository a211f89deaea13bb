"""WeightSync: the learner's weights, versioned, to every generator, by weight_sync.method.

- object_store: learner rank 0's weights are fetched by the driver and put in Ray's object
  store once, and every generator reads them. The driver owns them, so they outlive a dead
  learner (a rebuilt reference may need them); the price is the detour through the driver:
  about 10 ms/MB here against 2.5 ms/MB for broadcast (benchmarks/scale.py). The CPU default.
- broadcast: one torch.distributed broadcast from learner rank 0 to every generator worker
  (rank 1 + i * tensor_parallel_size + tp rank), NCCL between GPUs, gloo between CPUs, over a
  group of its own formed on first use. A member lost during a broadcast breaks the group:
  the dead generator is replaced, the survivors' calls fail with the group's timeout, the
  group is formed again and the weights sent again.

With rollouts made ahead (supervisor.max_staleness > 0) a broadcast is only started while the
learner is idle (the producer's pushes wait for it), so that what it sends is the version it
names; learner rank 0 keeps a copy of it for a generator that replaces a dead one meanwhile.

Every generator answers the version it now holds; each rollout row carries it
(`policy_version`), and the supervisor refuses rows sampled longer ago than
supervisor.max_staleness versions. A replacement generator and the reference's resets take the
weights from the object store (`weights_ref`, put at most once per version). With rollouts
made ahead of the learner (max_staleness > 0) the generators hold an older version than the
learner: each version is staged in the object store when the learner makes it (`stage`) and
kept until the generators have moved past it. The weights travel in the generators' dtype
(model.dtype: bf16 halves the bytes), not the learner's float32 master weights.
"""
from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError

from prorl_actors.engines.weight_sync import meta_mb
from prorl_actors.group import ActorGroup, ActorLost, _cause
from prorl_actors.roles import Generator, Learner
from prorl_actors.spec import WeightSyncSpec

MAX_ATTEMPTS = 3


class WeightSync:
    def __init__(self, spec: WeightSyncSpec, learner: ActorGroup, generators: ActorGroup, workers_per_generator: int,
                 backend: str, log=print, dtype: str | None = None, ahead: bool = False):
        """dtype: what the weights are sent in, the generators' model.dtype (None: the learner's
        float32); ahead: rollouts are made ahead of the learner (max_staleness > 0), so the
        generators may hold a version the learner has moved past (a broadcast keeps a copy of
        what it sent on learner rank 0, for a replacement generator)."""
        self.spec, self.learner, self.generators, self.log, self.dtype = spec, learner, generators, log, dtype
        self.ahead = ahead
        self.workers_per_generator, self.backend = workers_per_generator, backend
        self.version = 0                     # the generators' version (the last one pushed)
        self._refs: dict = {}                # version -> its weights in the object store
        self._meta = None
        self._group_ok = False
        self._pushing = False
        self._moot = False

    def stage(self, version: int, step: int | None = None) -> None:
        """The learner's weights now are `version`: put them in the object store (once)."""
        if version not in self._refs:
            self._refs[version] = ray.put(self.learner.call_one(Learner.get_weights, self.dtype, step=step))

    def weights_ref(self, version: int | None = None):
        """`version`'s weights (default: the generators') in the object store; a version not staged
        is taken from the learner now, which must hold it."""
        version = self.version if version is None else version
        self.stage(version)
        return self._refs[version]

    def push(self, version: int, step: int | None = None) -> dict:
        """Every generator to `version` (staged, or the learner's weights now) -> {sync_s, sync_mb}.
        Older staged versions are dropped: the generators never go back (a rollback starts over)."""
        t0 = time.perf_counter()
        self.version, self._moot = version, False
        if self._meta is None:
            self._meta = self.learner.call_one(Learner.weights_meta, self.dtype, step=step)
        for old in [v for v in self._refs if v < version]:
            del self._refs[old]
        if self.spec.method == "object_store":
            # a generator that does not take them within weight_sync.timeout_s, after a piece it may
            # still be running (at most call_timeout_s), is hung: replaced
            limit = self.generators.call_timeout_s
            held = self.generators.call_all(Generator.set_weights, self.weights_ref(version), version, step=step,
                                            timeout_s=self.spec.timeout_s + limit if limit else None)
        else:
            held = self._broadcast(version, step)
        if set(held) != {version}:
            raise RuntimeError(f"generators hold versions {sorted(set(held))} after a sync to {version}")
        return {"sync_s": time.perf_counter() - t0, "sync_mb": meta_mb(self._meta)}

    def on_generator_restart(self, actor) -> None:
        """A replacement generator: the generators' version from the object store, or, broadcast
        with the learner moved on, the copy learner rank 0 kept of its last broadcast (unless a
        broadcast is under way, whose retry reaches it); it is not in the broadcast group yet."""
        self._group_ok = False
        if self._pushing or self.version == 0 or self._moot:
            return
        if self.spec.method == "broadcast" and self.ahead:
            weights = self.learner.actors[0].pushed_weights.remote()   # after the update it may be in
        else:
            weights = self.weights_ref()
        ray.get(actor.set_weights.remote(weights, self.version), timeout=self.spec.timeout_s)

    def on_learner_restart(self) -> None:
        """New learner processes: the broadcast group is formed again at the next push, and the
        cached weights are dropped (a rollback replays versions, maybe with other weights); a
        generator replaced before that push is left as it starts (the push reaches it)."""
        self._group_ok = False
        self._refs = {}
        self._moot = True       # what the generators hold is moot until the next push

    # ------------------------------------------------------------------ broadcast
    def _form_group(self, step) -> None:
        tp = self.workers_per_generator
        world = 1 + len(self.generators) * tp
        t = self.spec.timeout_s
        opened: dict = {}
        failed = self._wait({("learner", 0): self.learner.actors[0].open_sync_group.remote(world, t)}, step, opened)
        if failed:
            raise _Retry(f"opening the broadcast group: {failed}")
        host, port = opened[("learner", 0)]
        refs = {("learner", 0): self.learner.actors[0].join_sync_group.remote(world, t)}
        for i, g in enumerate(self.generators.actors):
            refs[("generator", i)] = g.join_sync_group.remote(host, port, 1 + i * tp, world, self.backend, t)
        failed = self._wait(refs, step)
        if failed:
            raise _Retry(f"forming the broadcast group: {failed}")
        self._group_ok = True

    def _broadcast(self, version: int, step) -> list[int]:
        bucket = int(self.spec.bucket_mb * 2**20)
        last = None
        self._pushing = True
        try:
            for attempt in range(MAX_ATTEMPTS):
                try:
                    if not self._group_ok:
                        self._form_group(step)
                    refs = {("learner", r): a.push_weights.remote(self._meta, bucket, self.dtype, self.ahead)
                            for r, a in enumerate(self.learner.actors)}
                    refs.update({("generator", i): g.receive_weights.remote(self._meta, bucket, version)
                                 for i, g in enumerate(self.generators.actors)})
                    results: dict = {}
                    failed = self._wait(refs, step, results)
                    if not failed:
                        return [results[("generator", i)] for i in range(len(self.generators))]
                    raise _Retry(str(failed))
                except ActorLost:          # a learner rank: the supervisor rolls back
                    self._group_ok = False
                    raise
                except _Retry as e:
                    last = e
                    self._group_ok = False
                    self.log(f"weight broadcast to version {version} failed (attempt {attempt + 1}): {e}")
        finally:
            self._pushing = False
        raise RuntimeError(f"weight broadcast to version {version} failed {MAX_ATTEMPTS} times; last: {last}")

    def _wait(self, refs: dict, step, results: dict | None = None) -> dict:
        """Wait for every call -> {member: why it failed}. A dead generator is replaced; a dead
        learner rank is ActorLost (the supervisor rolls back)."""
        failed = {}
        deadline = time.monotonic() + self.spec.timeout_s + 60
        for key, ref in refs.items():
            role, rank = key
            try:
                value = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
                if results is not None:
                    results[key] = value
            except RayActorError as e:
                if role == "learner":
                    raise ActorLost("learner", rank, _cause(e)) from e
                failed[key] = _cause(e)
                self.generators._lost(rank, _cause(e), step)
            except Exception as e:  # noqa: BLE001 - a member of the group died: its collective timed out
                failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        return failed


class _Retry(Exception):
    pass
