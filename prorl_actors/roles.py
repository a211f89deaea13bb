"""The four roles of a run: what each one answers (its interface) and what happens when one of
its actors dies (its restart strategy), declared here once.

The run's code talks to a role only through its interface: a group is called with one of the
interface's methods (`learner.call_one(Learner.update, batch, ...)`), never with a method name
in a string, and the group refuses a method its interface does not declare. Every actor class
implements its role's interface (tests/test_architecture.py checks each signature).

| role      | state it keeps                                  | when an actor dies (`RESTART`)             |
|-----------|-------------------------------------------------|--------------------------------------------|
| generator | the weights of the current policy version       | REPLACE: a new one, given the current      |
|           |                                                 | weights, is sent the same work again       |
| verifier  | none (its scorers' helper processes)            | REPLACE: a new one is sent the same work   |
| reference | the weights of its last reset                   | REBUILD: a new one, from the checkpoint's  |
|           |                                                 | reference or the weights of the last       |
|           |                                                 | reset; the call is made again              |
| learner   | weights, AdamW moments, LR schedule, RNG        | ROLL_BACK: the optimizer state is gone;    |
|           | (data-parallel ranks in collectives)            | the whole run goes back to its last        |
|           |                                                 | checkpoint and does the steps again        |

The group (group.py) enforces the strategy: REPLACE and REBUILD are healed inside the call
(the caller gets its answer); ROLL_BACK raises `ActorLost`, which the run's loop turns into a
rollback (runtime/lifecycle.py). Every replacement counts against
fault_tolerance.max_actor_restarts.
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

if TYPE_CHECKING:
    from prorl_actors.engines.generation import SamplingSpec


class Restart(enum.Enum):
    """What the group does when an actor of a role dies (or hangs past its call's deadline)."""
    REPLACE = "replace the actor, bring it up to date, send it the same work again"
    REBUILD = "rebuild the actor from the state it was last given, make the call again"
    ROLL_BACK = "raise ActorLost: the run rolls back to its last checkpoint"

    @property
    def resends_pieces(self) -> bool:
        """Only the dead actor's piece of the work is sent again (the others' answers stand);
        otherwise the whole call is made again after the rebuild."""
        return self is Restart.REPLACE


class Role(enum.StrEnum):
    GENERATOR = "generator"
    VERIFIER = "verifier"
    REFERENCE = "reference"
    LEARNER = "learner"


RESTART: dict[Role, Restart] = {
    Role.GENERATOR: Restart.REPLACE,
    Role.VERIFIER: Restart.REPLACE,
    Role.REFERENCE: Restart.REBUILD,
    Role.LEARNER: Restart.ROLL_BACK,
}


class RoleActor:
    """What every actor answers: `ping`, the health check a group makes of a new actor."""

    def ping(self) -> str:
        return "ok"


# ----------------------------------------------------------------------------- interfaces
class Generator(Protocol):
    def generate(self, prompts: pa.Table, sp: SamplingSpec) -> pa.Table:
        """One row per prompt -> G consecutive rollout rows per prompt (batch.ROLLOUT_SCHEMA)."""

    def extend(self, rows: pa.Table, sp: SamplingSpec) -> pa.Table:
        """Partial responses continued by up to sp.max_new_tokens more tokens (in-flight updates)."""

    def set_weights(self, state_dict, version: int) -> int:
        """Weights from the object store -> the version now held."""

    def join_sync_group(self, host: str, port: int, rank_base: int, world_size: int, backend: str,
                        timeout_s: float) -> bool:
        """Join the weight-broadcast group."""

    def receive_weights(self, meta, bucket_bytes: int, version: int) -> int:
        """Weights broadcast by learner rank 0 -> the version now held."""

    def ping(self) -> str: ...


class Verifier(Protocol):
    def verify(self, rollouts: pa.Table) -> pa.Table:
        """Rollouts -> the same rows with REWARD, FORMATTED, VERIFY_ERROR, VERIFY_TIMEOUT."""

    def stats(self) -> dict:
        """Counts of scored, failed and timed-out responses per task."""

    def close(self) -> None:
        """Stop the helper processes (sandbox workers, math-verify)."""

    def ping(self) -> str: ...


class Reference(Protocol):
    def logprobs(self, rollouts: pa.Table, temperature: float | None = None) -> pa.Table:
        """REF_LOGP added: each response token's logprob under the reference."""

    def entropy(self, rollouts: pa.Table, temperature: float) -> float:
        """The reference's mean entropy per token on the responses, at `temperature`."""

    def reset_to(self, state_dict, version: int) -> int:
        """The reference <- these weights (a ProRL reset) -> its version."""

    def load(self, path: str, version: int) -> int:
        """The reference <- a checkpoint's reference -> its version."""

    def save(self, path: str) -> None: ...

    def ping(self) -> str: ...


class Learner(Protocol):
    def update(self, rollouts: pa.Table, kl_coef: float, entropy_coef: float | None = None) -> dict:
        """One update on a batch -> its stats."""

    def reset_optimizer(self) -> None:
        """Fresh AdamW state and warm-up (a ProRL reference reset)."""

    def get_weights(self, dtype: str | None = None) -> dict[str, Any] | None:
        """Rank 0: the policy's weights (for the object store); other ranks: None."""

    def weights_meta(self, dtype: str | None = None) -> Any:
        """Rank 0: names, shapes and dtypes of the weights a broadcast sends."""

    def open_sync_group(self, world_size: int, timeout_s: float) -> tuple[str, int]: ...

    def join_sync_group(self, world_size: int, timeout_s: float) -> bool: ...

    def push_weights(self, meta: Any, bucket_bytes: int, dtype: str | None = None, keep: bool = False) -> None: ...

    def pushed_weights(self) -> dict[str, Any] | None: ...

    def save(self, path: str) -> str | None:
        """The policy (HF format) and the learner's state -> the weights' digest (rank 0)."""

    def load_state(self, path: str) -> str | None:
        """A checkpoint's optimizer, schedule and RNG -> the weights' digest (rank 0)."""

    def weights_digest(self) -> str | None: ...

    def ping(self) -> str: ...


INTERFACE: dict[Role, type] = {Role.GENERATOR: Generator, Role.VERIFIER: Verifier, Role.REFERENCE: Reference,
                               Role.LEARNER: Learner}
