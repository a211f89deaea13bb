"""ActorGroup: N Ray actors of one role. The group, not the supervisor, owns creation,
fan-out of work across its actors and the liveness check (`ping`); restarts and
re-dispatch after a death come with the fault-tolerance issue."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import ray


class ActorGroup:
    def __init__(self, cls, num_actors: int, *, num_cpus: float, num_gpus: float = 0.0,
                 env: dict[str, str] | None = None, args: tuple | Callable[[int], tuple] = (),
                 name: str | None = None):
        """`args` are the constructor's, or a function of the actor's rank giving them."""
        self.role = name or cls.__name__
        remote_cls = ray.remote(cls)
        opts = dict(num_cpus=num_cpus, num_gpus=num_gpus)
        if env:
            opts["runtime_env"] = {"env_vars": env}
        args_for = args if callable(args) else (lambda rank: args)
        self.actors = [remote_cls.options(**opts).remote(*args_for(rank)) for rank in range(num_actors)]

    def __len__(self) -> int:
        return len(self.actors)

    def call_all(self, method: str, *args) -> list:
        """The same call on every actor -> list of results."""
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def call_one(self, method: str, *args):
        """Roles with state kept once (learner, reference) use actor 0."""
        return ray.get(getattr(self.actors[0], method).remote(*args))

    def map_table(self, method: str, table: pa.Table, *args, rows_per_unit: int = 1) -> pa.Table:
        """Split `table` into contiguous shards of whole units (e.g. groups of G rows), one per
        actor, call `method(shard, *args)` on each and concatenate the results in order."""
        units = table.num_rows // rows_per_unit
        bounds = np.linspace(0, units, len(self.actors) + 1).round().astype(int) * rows_per_unit
        refs = [getattr(a, method).remote(table.slice(lo, hi - lo), *args)
                for a, lo, hi in zip(self.actors, bounds[:-1], bounds[1:]) if hi > lo]
        return pa.concat_tables(ray.get(refs))

    def ping(self, timeout_s: float = 60.0) -> list[str]:
        return ray.get([a.ping.remote() for a in self.actors], timeout=timeout_s)

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a)
