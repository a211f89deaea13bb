"""ActorGroup: N Ray actors of one role, and what happens when one of them dies.

The group owns creation, fan-out of work across its actors, waiting, and replacement. It is
called with methods of its role's interface (roles.py), `group.call_all(Generator.set_weights,
...)`, and refuses any other. When an actor dies in the middle of a call (its process killed,
its node gone, or a call over `call_timeout_s`), the group does what the role's restart strategy
(roles.RESTART) says:
- REPLACE (generators, verifiers): a replacement is started, brought up to date (`on_restart`,
  e.g. the current weights) and sent the same piece of work again, so the caller gets every
  row it asked for;
- REBUILD (reference): a replacement is started and restored (`on_restart`: the weights of the
  last reset), and the whole call is made again;
- ROLL_BACK (learner): `ActorLost` is raised; the run rolls back to its last checkpoint and
  calls `replace`, whose `on_restart` restores the checkpoint's state.
Every replacement is an `actor_restarted` event and counts against `max_restarts`.
Waiting polls, so that a SIGTERM (`should_stop`) can interrupt a long call with `Preempted`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from prorl_actors.events import Event
from prorl_actors.roles import INTERFACE, RESTART, Restart, Role

POLL_S = 0.2
PEER_GRACE_S = 30.0   # how long an error in one rank waits for a peer's death to explain it


class ActorLost(RuntimeError):
    """An actor of a stateful role died; its state has to be restored by the caller."""

    def __init__(self, role: str, rank: int, cause: str):
        super().__init__(f"{role}[{rank}] died: {cause}")
        self.role, self.rank, self.cause = role, rank, cause


class Preempted(Exception):
    """A stop was requested (SIGTERM) while waiting on an interruptible call."""


class TooManyRestarts(RuntimeError):
    pass


class ActorGroup:
    def __init__(self, cls, num_actors: int, *, num_cpus: float, num_gpus: float = 0.0,
                 env: dict[str, str] | None = None, args: tuple | Callable[[int], tuple] = (),
                 name: str | None = None, interface: type | None = None, restart: Restart = Restart.REPLACE,
                 max_restarts: int = 20, call_timeout_s: float = 0.0, on_restart: Callable | None = None,
                 on_event: Callable | None = None, should_stop: Callable[[], bool] = lambda: False,
                 placement: Callable[[int], dict] | None = None):
        """`args` are the constructor's, or a function of the actor's rank giving them (evaluated
        at every start, so a replacement can be built from state that has moved on);
        interface: the class whose methods the group may be called with (default: `cls`);
        restart: what a death does (see the module's docstring); on_restart(actor) brings a
        fresh replacement up to date; on_event(kind, **fields) records; placement(rank) -> extra
        actor options (a placement group's bundle: placement.py). `for_role` fills name,
        interface and restart from roles.py."""
        self.role = name or cls.__name__
        self.interface = interface or cls
        missing = [m for m in _methods(self.interface) if not callable(getattr(cls, m, None))]
        if missing:
            raise TypeError(f"{cls.__name__} lacks {', '.join(missing)} of {self.interface.__name__}")
        if restart is Restart.REBUILD and on_restart is None:
            raise TypeError(f"{self.role}: restart REBUILD needs on_restart (what a rebuilt actor is given)")
        self.restart, self.max_restarts, self.call_timeout_s = restart, max_restarts, call_timeout_s
        self.on_restart, self.on_event, self.should_stop = on_restart, on_event or (lambda *a, **k: None), should_stop
        self._remote = ray.remote(cls)
        self._opts = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)  # we restart, with state
        if env:
            self._opts["runtime_env"] = {"env_vars": env}
        self._args_for = args if callable(args) else (lambda rank: args)
        self._placement = placement or (lambda rank: {})
        self.restarts = 0
        # background(timeout, refs): other work to move on while this group's calls run (the rollout
        # producer's, while the learner and the reference work); it waits up to `timeout` for its
        # own work or for `refs`, and returns False when it cannot run now (re-entered)
        self.background: Callable[[float, list], bool] | None = None
        self.actors = [self._spawn(rank) for rank in range(num_actors)]

    @classmethod
    def for_role(cls, role: Role, actor_cls, num_actors: int, **kw) -> ActorGroup:
        """A group of one of the run's roles: its interface and restart strategy from roles.py."""
        return cls(actor_cls, num_actors, name=role.value, interface=INTERFACE[role], restart=RESTART[role], **kw)

    def method_name(self, method: Callable) -> str:
        """The name of `method`, a function of the group's interface; TypeError for anything else."""
        name = getattr(method, "__name__", None)
        if name is None or getattr(self.interface, name, None) is not method:
            raise TypeError(f"{self.role}: {method!r} is not a method of {self.interface.__name__}")
        return name

    def _spawn(self, rank: int):
        return self._remote.options(**self._opts, **self._placement(rank)).remote(*self._args_for(rank))

    def __len__(self) -> int:
        return len(self.actors)

    # ------------------------------------------------------------------ waiting
    def _gather(self, calls: dict, timeout_s: float | None = None) -> tuple[dict, dict]:
        """calls: key -> (rank, ObjectRef). Wait for all -> ({key: result}, {key: cause of death}).
        An exception raised by the method itself (a bug, bad input) is re-raised: retrying it
        would fail the same way. A call not answered within `timeout_s` (default: the group's
        call_timeout_s) is a death: its actor is killed."""
        limit = self.call_timeout_s if timeout_s is None else timeout_s
        done, dead, errors = {}, {}, {}
        waiting = {ref: key for key, (_, ref) in calls.items()}
        t0 = time.monotonic()
        while waiting:
            if self.should_stop():
                raise Preempted(f"{self.role}: stop requested")
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0 if self.background else POLL_S)
            if self.background is not None and len(ready) < len(waiting):
                if not self.background(POLL_S, [r for r in waiting if r not in ready]):
                    time.sleep(0.01)
                ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
            for ref in ready:
                key = waiting.pop(ref)
                try:
                    done[key] = ray.get(ref)
                except RayActorError as e:
                    if getattr(e, "actor_init_failed", False):   # its constructor raised: not a death
                        raise
                    dead[key] = _cause(e)
                except Exception as e:
                    if self.restart.resends_pieces or len(calls) == 1:
                        raise
                    # ranks in a collective: a peer's death reaches the others as an error of
                    # their own ("connection closed by peer"), often before Ray reports the death
                    errors.setdefault(key, (e, time.monotonic()))
            if dead and not self.restart.resends_pieces:   # the others may wait on the dead one in a collective
                return done, dead
            if errors and (not waiting or time.monotonic() - min(t for _, t in errors.values()) > PEER_GRACE_S):
                raise next(iter(errors.values()))[0]     # no death behind it: a bug
            if waiting and limit and time.monotonic() - t0 > limit:
                for ref, key in waiting.items():   # hung: kill it; the group replaces it like a dead one
                    ray.kill(self.actors[calls[key][0]], no_restart=True)
                    dead[key] = f"no answer in {limit:g} s (killed)"
                waiting = {}
        return done, dead

    def replace(self, rank: int, cause: str, step: int | None = None) -> None:
        """A fresh actor at `rank` (args evaluated now), brought up to date by on_restart."""
        while True:
            if self.restarts >= self.max_restarts:
                raise TooManyRestarts(f"{self.role}: {self.restarts} restarts already, the limit "
                                      f"(fault_tolerance.max_actor_restarts); last death: {cause}")
            self.restarts += 1
            t0 = time.monotonic()
            try:
                self._respawn(rank)
                if self.on_restart is not None:
                    self.on_restart(self.actors[rank])
            except (RayActorError, GetTimeoutError) as e:   # the replacement died or hung too: count it, again
                if getattr(e, "actor_init_failed", False):
                    raise RuntimeError(f"{self.role}[{rank}]: no replacement can start: {e}") from e
                cause = f"replacement died while starting: {_cause(e)}"
                continue
            except ActorLost as e:         # a rank of the replacement died while it was brought up to date
                cause = f"replacement died while starting: {e.cause}"
                continue
            self.on_event(Event.ACTOR_RESTARTED, role=self.role, rank=rank, cause=cause, step=step,
                          restart_s=round(time.monotonic() - t0, 3), restarts=self.restarts)
            return

    def _respawn(self, rank: int) -> None:
        """A new actor at `rank`, answering."""
        try:
            ray.kill(self.actors[rank], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[rank] = self._spawn(rank)
        ray.get(self.actors[rank].ping.remote(), timeout=max(600.0, self.call_timeout_s))

    def _lost(self, rank: int, cause: str, step: int | None):
        """A death: under REPLACE the actor is replaced (the caller re-sends its piece); otherwise
        ActorLost (REBUILD: the group's call catches it, rebuilds and calls again)."""
        self.on_event(Event.ACTOR_DIED, role=self.role, rank=rank, cause=cause, step=step)
        if not self.restart.resends_pieces:
            raise ActorLost(self.role, rank, cause)
        self.replace(rank, cause, step)

    def _healing(self, call: Callable, step: int | None):
        """call() -> its result; under REBUILD a death rebuilds the actor and makes the call again."""
        while True:
            try:
                return call()
            except ActorLost as e:
                if self.restart is not Restart.REBUILD:
                    raise
                self.replace(e.rank, e.cause, step=step)

    # ------------------------------------------------------------------ calls
    def _call(self, method: Callable, args: tuple, ranks: list[int], step: int | None,
              timeout_s: float | None = None) -> dict:
        """The same call on the actors at `ranks` -> {rank: result} (a replacement gets it again)."""
        name = self.method_name(method)
        return self._healing(lambda: self._call_ranks(name, args, ranks, step, timeout_s), step)

    def _call_ranks(self, method: str, args: tuple, ranks: list[int], step: int | None,
                    timeout_s: float | None) -> dict:
        results, todo = {}, list(ranks)
        if len(ranks) > 1:   # a batch sent to every rank is stored once, not once per call
            args = tuple(ray.put(a) if isinstance(a, pa.Table) else a for a in args)
        while todo:
            done, dead = self._gather({r: (r, getattr(self.actors[r], method).remote(*args)) for r in todo}, timeout_s)
            results.update(done)
            for r, cause in dead.items():
                self._lost(r, cause, step)
            todo = sorted(dead)
        return results

    def call_all(self, method: Callable, *args, step: int | None = None, timeout_s: float | None = None) -> list:
        """The same call on every actor -> list of results (timeout_s: its deadline, default the
        group's call_timeout_s)."""
        results = self._call(method, args, list(range(len(self.actors))), step, timeout_s)
        return [results[r] for r in range(len(self.actors))]

    def call_one(self, method: Callable, *args, step: int | None = None):
        """Actor 0's answer (state kept once: the reference's save, the learner's)."""
        return self._call(method, args, [0], step)[0]

    def map_table(self, method: Callable, table: pa.Table, *args, rows_per_unit: int = 1,
                  num_chunks: int | None = None, step: int | None = None) -> pa.Table:
        """Split `table` into `num_chunks` contiguous chunks of whole units (e.g. groups of G
        rows; default: one chunk per actor), call `method(chunk, *args)` and concatenate the
        results in chunk order. Each actor works on one chunk at a time and takes the next one
        when it is done, so a faster actor takes more (load balancing); which actor ran a chunk
        does not change its result. A chunk whose actor dies goes to its replacement (REPLACE),
        or the call is made again after the rebuild (REBUILD)."""
        chunks = split_table(table, rows_per_unit, num_chunks or len(self.actors))
        return self._healing(lambda: self._map_chunks(method, chunks, args, step), step)

    def _map_chunks(self, method: Callable, chunks: list[pa.Table], args: tuple, step: int | None) -> pa.Table:
        pool = WorkPool(self)
        for c, chunk in enumerate(chunks):
            pool.submit(c, method, chunk, *args)
        results = {}
        while pool.pending():
            results.update(pool.poll(0.0 if self.background else POLL_S, step))
            if self.background is not None and pool.pending() and not self.background(POLL_S, pool.refs()):
                results.update(pool.poll(POLL_S, step))
        return pa.concat_tables([results[c] for c in range(len(chunks))])

    def ping(self, timeout_s: float = 60.0) -> list[str]:
        """Every actor's answer to RoleActor.ping (the group's health check)."""
        return ray.get([a.ping.remote() for a in self.actors], timeout=timeout_s)

    def kill(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


def split_table(table: pa.Table, rows_per_unit: int, num_chunks: int) -> list[pa.Table]:
    """`table` as at most `num_chunks` contiguous chunks of whole units of `rows_per_unit` rows,
    as equal as they can be (at least one chunk)."""
    units = table.num_rows // rows_per_unit
    n = max(1, min(num_chunks, units))
    bounds = np.linspace(0, units, n + 1).round().astype(int) * rows_per_unit
    return [table.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


class WorkPool:
    """Pieces of work for a group, each actor running one piece at a time, results
    collected as they come (`poll`), so that a caller can do other things in between: the
    rollout producer streams generation into verification with it, and map_table waits on it.

    A piece whose actor dies (or runs past the group's call_timeout_s) goes first to the
    replacement. A piece whose method raises is a bug and raises, unless the pool is given
    `retries`: then it is tried that many more times (another actor first, when there is one),
    each failure recorded (event work_failed), and then its result is a `PieceFailed`. `busy_s`
    adds up the actor-seconds spent on pieces (for idle fractions)."""

    def __init__(self, group: ActorGroup, retries: int | None = None):
        self.group, self.retries = group, retries
        self.failed_on: dict = {}                           # key -> the ranks its method raised on, in turn
        self.queue: list = []                               # keys waiting for an actor
        self.work: dict = {}                                # key -> (method, args)
        self.running: dict = {}                             # ref -> (rank, key, started)
        self.idle = list(range(len(group.actors)))
        self.busy_s = 0.0
        self.held = False                                   # True: nothing new is handed out

    def submit(self, key, method: Callable, *args) -> None:
        """A piece: method (of the group's interface) called with args on the next free actor."""
        self.work[key] = (self.group.method_name(method), args)
        self.queue.append(key)

    def pending(self) -> int:
        """Pieces submitted and not yet returned by poll."""
        return len(self.queue) + len(self.running)

    def refs(self) -> list:
        return list(self.running)

    def _dispatch(self) -> None:
        """Waiting pieces to idle actors, in order; a piece that raised goes to an actor it has not
        raised on while the group has one (waiting for it if it is busy)."""
        for key in list(self.queue):
            if not self.idle or self.held:
                return
            tried = set(self.failed_on.get(key, ()))
            fresh = [r for r in self.idle if r not in tried]
            if not fresh and len(tried) < len(self.group.actors):
                continue                                    # another actor will be free
            rank = (fresh or self.idle)[0]
            self.idle.remove(rank)
            self.queue.remove(key)
            method, args = self.work[key]
            ref = getattr(self.group.actors[rank], method).remote(*args)
            self.running[ref] = (rank, key, time.monotonic())

    def poll(self, timeout: float, step: int | None = None, stoppable: bool = True,
             also: list | None = None) -> dict:
        """Hand out waiting pieces, wait up to `timeout` s for one to finish (or for one of the
        refs in `also`) -> {key: result} of the pieces done. A stop request (the group's
        should_stop) raises Preempted when `stoppable`; nothing is lost by it (poll again)."""
        g = self.group
        self._dispatch()
        if stoppable and g.should_stop():
            raise Preempted(f"{g.role}: stop requested")
        waiting = list(self.running)
        if not waiting:
            if also and timeout > 0:
                ray.wait(list(also), num_returns=1, timeout=timeout)
            return {}
        ray.wait(waiting + list(also or ()), num_returns=1, timeout=timeout)
        ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
        done, dead = {}, {}
        now = time.monotonic()
        for ref in ready:
            rank, key, t0 = self.running.pop(ref)
            self.busy_s += now - t0
            try:
                done[key] = ray.get(ref)
                self.idle.append(rank)
            except RayActorError as e:
                if getattr(e, "actor_init_failed", False):   # its constructor raised: not a death
                    raise
                dead[rank] = (key, _cause(e))
            except Exception as e:
                if self.retries is None:
                    raise
                self.idle.append(rank)
                self.failed_on.setdefault(key, []).append(rank)   # another actor tries it first
                n = len(self.failed_on[key])
                cause = _error(e)
                g.on_event(Event.WORK_FAILED, role=g.role, rank=rank, method=self.work[key][0], cause=cause,
                           attempt=n, step=step)
                if n > self.retries:
                    done[key] = PieceFailed(cause)
                else:
                    self.queue.insert(0, key)
        if g.call_timeout_s:
            for ref, (rank, key, t0) in list(self.running.items()):
                if now - t0 > g.call_timeout_s:   # hung: killed, replaced like a dead one
                    ray.kill(g.actors[rank], no_restart=True)
                    self.running.pop(ref)
                    self.busy_s += now - t0
                    dead[rank] = (key, f"no answer in {g.call_timeout_s:g} s (killed)")
        for rank, (key, cause) in sorted(dead.items()):
            g._lost(rank, cause, step)
            method, args = self.work[key]
            g.on_event(Event.WORK_REDISPATCHED, role=g.role, rank=rank, method=method,
                       rows=args[0].num_rows if args and isinstance(args[0], pa.Table) else None, step=step)
            self.queue.insert(0, key)
            self.idle.insert(0, rank)
        for key in done:
            del self.work[key]
            self.failed_on.pop(key, None)
        self._dispatch()
        return done

    def abandon(self) -> None:
        """Forget every piece (a rollback or resume makes them moot); actors still running one
        finish it and take new work after it."""
        self.queue, self.work, self.running, self.failed_on = [], {}, {}, {}
        self.idle = list(range(len(self.group.actors)))


@dataclass
class PieceFailed:
    """The result of a WorkPool piece whose method raised on every try: why."""
    cause: str


def _error(e: Exception) -> str:
    """A method's exception, in one line (a RayTaskError's cause, not its traceback)."""
    c = getattr(e, "cause", None) or e
    text = str(c).strip().splitlines()
    return f"{type(c).__name__}: {text[-1] if text else ''}"[:300]


class LearnerGroup(ActorGroup):
    """The learner's data-parallel ranks, one stateful unit: every call goes to every rank (they
    meet in collectives) and answers rank 0's result. The ranks rendezvous at a fresh
    tcp://host:port on the node of rank 0's bundle at every start; the constructor gets
    (*args, rank, world_size, dist_url). A rank's death loses the group's optimizer state
    (ActorLost: its restart strategy is ROLL_BACK whatever its role); `replace` then builds
    every rank again and `on_restart` restores them."""

    def __init__(self, cls, num_actors: int, **kw):
        self._world = num_actors
        self.dist_url = self._rendezvous(kw.get("placement") or (lambda rank: {}))
        super().__init__(cls, num_actors, **{**kw, "restart": Restart.ROLL_BACK})

    @staticmethod
    def _rendezvous(placement: Callable[[int], dict]) -> str:
        """A free port on the node where rank 0 will run (its placement)."""
        return ray.get(_free_address.options(**placement(0)).remote())

    def _spawn(self, rank: int):
        return self._remote.options(**self._opts, **self._placement(rank)).remote(
            *self._args_for(rank), rank, self._world, self.dist_url)

    def _respawn(self, rank: int) -> None:
        self.kill()
        self.dist_url = self._rendezvous(self._placement)
        self.actors = [self._spawn(r) for r in range(self._world)]
        ray.get([a.ping.remote() for a in self.actors], timeout=max(600.0, self.call_timeout_s))

    def call_one(self, method: Callable, *args, step: int | None = None):
        """Every rank is called; rank 0's answer."""
        return self.call_all(method, *args, step=step)[0]


@ray.remote(num_cpus=0)
def _free_address() -> str:
    import socket

    from prorl_actors.engines.weight_sync import node_ip
    with socket.socket() as s:
        s.bind(("", 0))
        return f"tcp://{node_ip()}:{s.getsockname()[1]}"


def _cause(e: Exception) -> str:
    """The error's first line, and the dead process's pid when Ray knows it."""
    lines = [ln.strip() for ln in str(e).strip().splitlines()]
    pid = next((ln for ln in lines if ln.startswith("pid:")), None)
    return (f"{type(e).__name__}: {lines[0] if lines else ''}" + (f" ({pid})" if pid else ""))[:300]


def _methods(interface: type) -> list[str]:
    """The public methods an interface declares (a Protocol's, or a class's own)."""
    return [n for n, v in vars(interface).items() if callable(v) and not n.startswith("_")]
