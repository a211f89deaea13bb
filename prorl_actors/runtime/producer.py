"""The rollout producer: prompts -> generation -> verification -> dynamic-sampling filter ->
training batches, made ahead of the learner within the staleness bound.

The learner trains step k on the weights step k - 1 left (one version per update; a step
without one leaves the version as it was). A batch "fill" is one step's batch; fill j is
sampled with the weights of step

    s(j) = max(0, j - 1 - max_staleness)

so every row the learner trains on was sampled at most `max_staleness` versions ago, and never
more: 0 is the synchronous loop (fill j waits for step j - 1 and its weights), 1 samples step
j + 1 while the learner trains step j (one-step-off), 2 lets generation run two steps ahead. A
fill starts when step s(j) is done (the consumer `publish`es each step's version) and the
previous fill is done; the generators are pushed to that version first. The schedule does not
depend on timing, so a run is reproducible (bit for bit, resumes included) at any staleness.

Within a fill, generation streams into verification: the round's prompts are cut into chunks
over the generators (a free generator takes the next one), and each chunk is verified as soon
as it is generated, while the others still generate. Rounds are DAPO's dynamic sampling as
before: a round asks for the prompts the running keep rate says it takes to fill the batch
(`round_size`); its groups are filtered in prompt order, so which groups are kept does not
depend on which chunk finished first; at most `max_rounds` rounds, then the batch is what there
is (recorded short). Informative groups beyond the batch are surplus: the next fill begins
with those of them the bound allows it to train on (`_carry`), and the others expire
(counted). Under the schedule above a surplus is one version too old for the next step unless
that step's learner cannot have moved on (a step without an update), or, with in-flight
updates (generator.in_flight_updates: responses decoded in pieces, between which the
generators take the learner's newest weights), it was sampled with fresher weights than its
fill began with.

A response whose verification failed (raised or timed out) is not a wrong answer: it is left
out of the group's baseline and of the filter (a group needs two valid rows; see algo), and
counted per task.

State (a checkpoint's): the sampler, the keep rate and counters as the next fill would start
them, and the finished fills not yet trained on (their rows as Arrow files), so that a resume
trains on exactly the rows the uninterrupted run trains on. A fill in progress at a checkpoint
is sampled with the checkpoint's own weights (`drain_before` finishes every older one first) and
is simply made again after a resume, identically.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prorl_actors import batch as rb
from prorl_actors.algo import KeepRate, informative_groups, round_size
from prorl_actors.engines.generation import SamplingSpec, generation_chunks
from prorl_actors.events import Event
from prorl_actors.group import POLL_S, ActorGroup, PieceFailed, WorkPool, split_table
from prorl_actors.metrics import Phase
from prorl_actors.roles import Generator, Verifier
from prorl_actors.runtime.rows import (failed_generation, shaping_on, train_rewards, usable_surplus, valid_rows,
                                       with_shaped_rewards)
from prorl_actors.spec import RunSpec
from prorl_actors.tasks import TaskMixture

ROLLOUTS_DIR = "rollouts"       # in a checkpoint: the finished fills, one Arrow file each
SURPLUS_FILE = "surplus.arrow"  # ... and the surplus the next fill begins with
_ROW = "_row"                   # in-flight updates: a row's place in its chunk while its pieces come back


@dataclass
class Fill:
    """One step's training batch, being made or made."""
    step: int
    version: int                        # the generators' weights it is sampled with
    source: int                         # the step that left them
    start: dict                         # the producer's state as it began (a resume redoes it from here)
    rounds: int = 0
    n_kept: int = 0                     # informative groups made (more than the batch: surplus)
    kept: list = field(default_factory=list)          # [pa.Table] informative groups, in prompt order
    made: list = field(default_factory=list)          # [pa.Table] every rollout (for the step's figures)
    events: list = field(default_factory=list)        # [(kind, fields)] recorded when the step is trained
    times: dict = field(default_factory=lambda: {Phase.GENERATE: 0.0, Phase.VERIFY: 0.0})
    keep_rate: float = 1.0              # the running keep rate when it was done
    in_flight_pushes: int = 0           # newer weights taken between decoding pieces
    carried: int = 0                    # groups of the last fill's surplus it begins with
    expired: int = 0                    # groups of that surplus too old for it
    surplus_before: list = field(default_factory=list)   # [pa.Table] that surplus (saved while this is made)

    def batch(self, P: int, G: int) -> pa.Table | None:
        """The kept groups, at most P (in the order they were made)."""
        batch = rb.concat(self.kept)
        if batch is not None and batch.num_rows > P * G:
            batch = batch.slice(0, P * G)
        return batch if batch is not None and batch.num_rows else None

    def info(self) -> dict:
        """What a checkpoint keeps of a finished fill besides its rows."""
        return {"step": self.step, "version": self.version, "source": self.source, "rounds": self.rounds, "n_kept": self.n_kept,
                "events": self.events, "times": self.times, "keep_rate": self.keep_rate,
                "in_flight_pushes": self.in_flight_pushes, "carried": self.carried, "expired": self.expired}


@dataclass
class _Round:
    chunks: int                         # generation pieces
    started: float
    sp: SamplingSpec                    # the round's sampling (its whole max_new_tokens)
    prompts: dict                       # chunk -> its prompts
    generated: dict = field(default_factory=dict)    # chunk -> rollouts
    verified: dict = field(default_factory=dict)     # chunk -> verified rollouts
    generated_at: float | None = None
    # in-flight updates: a chunk's rows decoded piece by piece
    done_rows: dict = field(default_factory=dict)    # chunk -> [rows finished so far]
    waiting: dict = field(default_factory=dict)      # chunk -> unfinished rows, for their next piece
    pieces: dict = field(default_factory=dict)       # chunk -> pieces decoded


class RolloutProducer:
    def __init__(self, spec: RunSpec, generators: ActorGroup, verifiers: ActorGroup, mixture: TaskMixture,
                 tokenizer, sync):
        """sync: the WeightSync that moves a version to the generators (its `push`)."""
        self.spec, self.generators, self.verifiers, self.mixture = spec, generators, verifiers, mixture
        self.tokenizer, self.sync = tokenizer, sync
        g = spec.generator
        self.S = spec.supervisor.max_staleness
        self.broadcast = spec.weight_sync.method == "broadcast"
        self.G, self.P = spec.group_size, spec.supervisor.num_prompts_per_step
        self.max_prompt_tokens = g.max_model_len - g.max_new_tokens
        self.keep_rate = KeepRate(spec.supervisor.dynamic_sampling.keep_rate_decay)
        self.next_group_id = 0
        self.next_step = 1                  # the fill to start next
        self.published = 0                  # the last step the learner has done
        self.versions = {0: 0}              # step -> the version the learner held after it
        self.pushes: list[dict] = []        # weight pushes not yet reported
        self.generator_version: int | None = 0   # what the generators hold (None: unknown, push before use)
        self.ready: dict[int, Fill] = {}    # finished fills not yet taken
        self.surplus: list[pa.Table] = []   # the last finished fill's informative groups beyond its batch
        self._surplus_saved: list[pa.Table] = []   # the surplus of the last state_dict
        self.current: Fill | None = None
        self._round: _Round | None = None
        self.in_flight, self.piece_tokens = g.in_flight_updates, g.in_flight_piece_tokens
        self.gen = WorkPool(generators, retries=1)   # a generation that raises twice: its rows fail
        self.ver = WorkPool(verifiers)
        self._busy = False                  # pump is not re-entrant (an actor restart may wait on a group)
        self._bound_s, self._bound_since = 0.0, None   # time the next fill waited for its version

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The sampler and counters as the next fill to be made would start them (the one in
        progress, if any, is made again after a resume), and the finished fills' infos."""
        st = self.current.start if self.current is not None else self._own_state()
        # the surplus that goes with this state (`save` writes it: the producer moves on meanwhile)
        self._surplus_saved = list(self.current.surplus_before if self.current is not None else self.surplus)
        return {**copy.deepcopy(st), "ready": [self.ready[k].info() for k in sorted(self.ready)]}

    def _own_state(self) -> dict:
        return {"data": self.mixture.state_dict(), "keep_rate": self.keep_rate.state_dict(),
                "next_group_id": self.next_group_id, "next_fill_step": self.next_step}

    def load_state_dict(self, st: dict, ckpt: Path | None = None, step: int = 0) -> None:
        """The state of a checkpoint (of `step`; older checkpoints have no fills and no
        next_fill_step: the synchronous loop's); the finished fills' rows come from `ckpt`."""
        self.abandon()
        self.mixture.load_state_dict(st["data"])
        self.keep_rate.load_state_dict(st["keep_rate"])
        self.next_group_id = st["next_group_id"]
        self.next_step = st.get("next_fill_step", step + 1)
        self.ready = {}
        for info in st.get("ready", []):
            fill = Fill(step=info["step"], version=info["version"], source=info["source"], start={},
                        rounds=info["rounds"],
                        n_kept=info["n_kept"], events=[tuple(e) for e in info["events"]], times=info["times"],
                        keep_rate=info["keep_rate"], in_flight_pushes=info.get("in_flight_pushes", 0),
                        carried=info.get("carried", 0), expired=info.get("expired", 0))
            for name in ("kept", "made"):
                path = Path(ckpt) / ROLLOUTS_DIR / f"{name}_{fill.step:06d}.arrow"
                if path.exists():
                    with pa.OSFile(str(path), "rb") as f:   # (shaped as this spec asks)
                        setattr(fill, name, [self._shaped(pa.ipc.open_file(f).read_all(), fill.step)])
            self.ready[fill.step] = fill
        path = Path(ckpt) / ROLLOUTS_DIR / SURPLUS_FILE if ckpt is not None else None
        self.surplus = []
        if path is not None and path.exists():
            with pa.OSFile(str(path), "rb") as f:
                self.surplus = [pa.ipc.open_file(f).read_all()]

    def save(self, directory: str) -> None:
        """The finished fills' rows into `directory`/rollouts (Arrow IPC files), and the surplus
        the next fill to be made begins with."""
        out = Path(directory) / ROLLOUTS_DIR
        out.mkdir(parents=True, exist_ok=True)
        files = [(f"{name}_{step:06d}.arrow", tables) for step, fill in self.ready.items()
                 for name, tables in (("kept", fill.kept), ("made", fill.made))]
        files.append((SURPLUS_FILE, self._surplus_saved))
        for name, tables in files:
            table = rb.concat(tables)
            if table is not None and table.num_rows:      # (a fill may have kept nothing)
                with pa.OSFile(str(out / name), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
                    w.write_table(table)

    def abandon(self) -> None:
        """Forget the fill in progress and every piece of work under way (a rollback or resume
        restores the state from a checkpoint); the generators' version becomes unknown."""
        self.gen.abandon()
        self.ver.abandon()
        self.current, self._round = None, None
        self.generator_version = None

    # ------------------------------------------------------------------ the consumer's side
    def publish(self, step: int, version: int) -> None:
        """The learner has done `step` and holds `version` (staged in the sync if it is new)."""
        self.published = step
        self.versions[step] = version
        for old in [s for s in self.versions if s < self.source_step(self.next_step) and s < step]:
            del self.versions[old]

    def set_published(self, step: int, version: int) -> None:
        """After a resume or rollback: the learner is at `step`, holding `version`."""
        self.published, self.versions = step, {step: version}

    def push(self, version: int, step: int) -> None:
        """The generators to `version` (unless they hold it); its figures kept for `take_pushes`."""
        if self.generator_version != version:
            self.pushes.append(self.sync.push(version, step=step))
            self.generator_version = version

    def take_pushes(self) -> list[dict]:
        """The weight pushes ({sync_s, sync_mb}) since the last call."""
        out, self.pushes = self.pushes, []
        return out

    def source_step(self, step: int) -> int:
        """The step whose weights fill `step` is sampled with."""
        return max(0, step - 1 - self.S)

    def take(self, step: int) -> Fill:
        """Fill `step`, made (waiting for it, interruptible by a stop request: nothing is lost)."""
        while step not in self.ready:
            if self.current is None and self.source_step(self.next_step) > self.published:
                raise RuntimeError(f"fill {step} waits for the weights of step {self.source_step(self.next_step)}, "
                                   f"which the learner has not done (it is at step {self.published})")
            self.pump(POLL_S, stoppable=True)
        return self.ready.pop(step)

    def untake(self, fill: Fill) -> None:
        """A fill taken by a step that was then stopped before its update: trained on next time."""
        self.ready[fill.step] = fill

    def drain_before(self, step: int) -> None:
        """Make every fill sampled with the weights of a step before `step` (before a checkpoint
        or a validation moves the generators to the weights after it); not interruptible."""
        while self.current is not None and self.current.source < step or \
                self.next_step <= self.spec.num_steps and self.source_step(self.next_step) < step:
            self.pump(POLL_S)

    @contextmanager
    def generators_held(self):
        """The generators free of the producer's work while the block runs (a validation): pieces
        under way finish, no new one starts."""
        self.gen.held = True
        try:
            while self.gen.running:
                self.pump(POLL_S)
            yield
        finally:
            self.gen.held = False

    def buffered(self) -> int:
        """Finished fills waiting for the learner."""
        return len(self.ready)

    # ------------------------------------------------------------------ the work
    def pump(self, timeout: float = 0.0, also: list | None = None, stoppable: bool = False,
             may_push: bool = True) -> bool:
        """Move the work on: collect what finished, start what may start; wait up to `timeout`
        for something to finish (or for one of `also`). may_push: False while the learner updates
        (a broadcast, which the learner sends, waits for it). -> False when already running (an
        actor restart inside it waits on another group, which calls back here)."""
        if self._busy:
            return False
        self._busy = True
        try:
            self._start_work(may_push)
            step = self.current.step if self.current is not None else None
            for key, rollouts in self.gen.poll(0.0, step, stoppable).items():
                self._generated(key, rollouts)
            for key, rollouts in self.ver.poll(timeout, step, stoppable, also=(also or []) + self.gen.refs()).items():
                self._round.verified[key] = rb.with_column(rollouts, rb.GENERATE_ERROR, [False] * rollouts.num_rows)
            for key, rollouts in self.gen.poll(0.0, step, stoppable).items():
                self._generated(key, rollouts)
            if self._round is not None and len(self._round.verified) == self._round.chunks:
                self._end_round()
            self._start_work(may_push)
        finally:
            self._busy = False
        return True

    def _generated(self, key: int, rollouts: pa.Table | PieceFailed) -> None:
        r = self._round
        if isinstance(rollouts, PieceFailed):   # no response to verify: rows that count, never train
            cause = rollouts.cause
            rollouts = failed_generation(r.prompts[key], self.G, self.generator_version or 0, self.in_flight)
            self.current.events.append((Event.GENERATION_FAILED, {"rows": rollouts.num_rows, "cause": cause}))
            r.done_rows.pop(key, None)
            r.verified[key] = rollouts
        elif self.in_flight:
            rollouts = self._piece_done(key, rollouts)
            if rollouts is None:                # pieces still to decode
                return
        r.generated[key] = rollouts
        if len(r.generated) == r.chunks:
            r.generated_at = time.monotonic()
        if key not in r.verified:
            self.ver.submit(key, Verifier.verify, rollouts)

    def _piece_done(self, key: int, rows: pa.Table) -> pa.Table | None:
        """In-flight updates: a decoding piece of chunk `key` came back -> the chunk's rollouts
        when every response has ended (EOS or max_new_tokens), else None (the unfinished rows
        wait for their next piece, `_continue`)."""
        r = self._round
        if key not in r.pieces:     # the first piece: G rows per prompt, in order
            rows = rows.append_column(_ROW, pa.array(np.arange(rows.num_rows), pa.int64()))
            rows = rb.with_column(rows, rb.POLICY_VERSION_MAX, rows[rb.POLICY_VERSION].to_pylist())
        r.pieces[key] = r.pieces.get(key, 0) + 1
        length = pc.list_value_length(rows[rb.RESPONSE_IDS]).to_numpy()
        open_ = rows[rb.TRUNCATED].to_numpy(zero_copy_only=False) & (length < r.sp.max_new_tokens)   # (b,)
        r.done_rows.setdefault(key, []).append(rows.filter(pa.array(~open_)))
        if open_.any():
            r.waiting[key] = rows.filter(pa.array(open_))
            return None
        out = pa.concat_tables(r.done_rows.pop(key)).sort_by(_ROW)
        return out.drop_columns([_ROW])

    def _continue(self, may_push: bool) -> None:
        """In-flight updates: the unfinished rows' next pieces, with the learner's newest weights
        when there are newer ones (taken once the pieces under way are back)."""
        r = self._round
        if r is None or not r.waiting:
            return
        newest = self.versions[self.published]
        if self.generator_version is not None and newest > self.generator_version and (may_push or not self.broadcast):
            if self.gen.pending():           # the pieces under way end on the weights they began with
                return
            self.push(newest, step=self.current.step)
            self.current.in_flight_pushes += 1
        for key, rows in r.waiting.items():
            sp = dataclasses.replace(r.sp, seed=(r.sp.seed * 31 + r.pieces[key]) % 2**31, max_new_tokens=min(
                self.piece_tokens, r.sp.max_new_tokens - r.pieces[key] * self.piece_tokens))
            self.gen.submit(key, Generator.extend, rows, sp)
        r.waiting = {}

    def _start_work(self, may_push: bool = True) -> None:
        """A new fill when the last is done and its version exists; a new round when a fill has none."""
        if self.current is None and self.next_step <= self.spec.num_steps:
            j = self.next_step
            src = self.source_step(j)
            if src > self.published:         # the learner has not done that step yet: the bound holds it
                if self._bound_since is None:
                    self._bound_since = time.monotonic()
                return
            if self._bound_since is not None:
                self._bound_s += time.monotonic() - self._bound_since
                self._bound_since = None
            if self.broadcast:
                # a broadcast sends the learner's weights as they are, the newest version: the
                # schedule's at max_staleness 1 (pushes wait for an idle learner, which is then at
                # the source step), fresher than it beyond
                if not may_push and self.generator_version != self.versions[self.published]:
                    return
                v = self.versions[self.published]
            else:
                # (a checkpoint of before this producer made batches ahead holds no older weights:
                # the oldest it has, fresher than the bound asks for)
                v = self.versions[src] if src in self.versions else self.versions[min(self.versions)]
                if self.in_flight and self.generator_version is not None:
                    v = max(v, self.generator_version)   # taken in flight: the generators never go back
            fill = Fill(step=j, version=v, source=src, start=self._own_state())
            self.push(v, step=j)             # (a stop may interrupt it: nothing has moved yet)
            self._carry(fill)
            self.current, self.next_step = fill, j + 1
        if self.current is not None and self._round is None:
            self._start_round()
        if self.in_flight:
            self._continue(may_push)

    def _start_round(self) -> None:
        fill, sup, g = self.current, self.spec.supervisor, self.spec.generator
        ds = sup.dynamic_sampling
        while True:
            if fill.n_kept >= self.P or fill.rounds >= ds.max_rounds or (fill.made and not ds.enabled):
                return self._finish_fill()
            n_new = round_size(self.P - fill.n_kept, self.keep_rate.rate, ds.fill_confidence, ds.max_oversample) \
                if ds.enabled else self.P
            sp = SamplingSpec(n=self.G, temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens,
                              seed=(self.spec.seed * 1_000_003 + fill.step) * 101 + fill.rounds)  # fresh per round
            items = self.mixture.sample(n_new)
            for bad in self.mixture.take_rejected():
                fill.events.append((Event.ITEM_REJECTED, {"split": "train", **bad}))
            prompts = self.prompt_table(items, fill.events)
            fill.rounds += 1
            if prompts.num_rows:
                break
        fill_n = g.vllm.max_num_seqs if g.engine == "vllm" else g.hf_batch_size
        chunks = split_table(prompts, 1, generation_chunks(prompts.num_rows, sp.n, g.num_actors, g.chunks_per_actor,
                                                           fill_n))
        self._round = _Round(len(chunks), time.monotonic(), sp, dict(enumerate(chunks)))
        first = dataclasses.replace(sp, max_new_tokens=min(self.piece_tokens, sp.max_new_tokens)) if self.in_flight else sp
        for c, chunk in enumerate(chunks):
            self.gen.submit(c, Generator.generate, chunk, first)

    def prompt_table(self, items, events: list | None = None) -> pa.Table:
        """Task items -> prompts with fresh group ids (a prompt too long is left out, recorded in `events`)."""
        table, rejected = rb.make_prompts(items, self.tokenizer, self.max_prompt_tokens, self.next_group_id)
        self.next_group_id += table.num_rows
        for it, why in rejected:
            if events is not None:
                events.append((Event.PROMPT_REJECTED, {"split": "train", "task": it.task, "item_index": it.index,
                                                   "reason": why}))
        return table

    def _end_round(self) -> None:
        r, fill, G = self._round, self.current, self.G
        self._round = None
        now = time.monotonic()
        gen_end = r.generated_at or now
        fill.times[Phase.GENERATE] += gen_end - r.started
        fill.times[Phase.VERIFY] += now - gen_end          # the verification not hidden behind generation
        rollouts = self._shaped(pa.concat_tables([r.verified[c] for c in range(r.chunks)]), fill.step)
        fill.made.append(rollouts)
        if not self.spec.supervisor.dynamic_sampling.enabled:
            fill.kept.append(rollouts)
            fill.n_kept += rollouts.num_rows // G
        else:
            keep = informative_groups(train_rewards(rollouts, self.spec.algorithm.reward_shaping), G,
                                      valid_rows(rollouts))                                      # (groups,)
            self.keep_rate.observe(int(keep.sum()), len(keep))
            fill.kept.append(rb.select_rows(rollouts, keep.repeat_interleave(G).numpy()))
            fill.n_kept += int(keep.sum())
        self._start_round()

    def _carry(self, fill: Fill) -> None:
        """A new fill begins with the last fill's surplus groups that its step may train on: the
        learner then holds at most the version of the fill's source step plus one per step in
        between, so a group sampled at least that minus max_staleness is within the bound whatever
        happens (and which groups carry does not depend on timing); the rest expire."""
        fill.surplus_before, surplus, self.surplus = self.surplus, rb.concat(self.surplus), []
        if surplus is None or not surplus.num_rows:
            return
        if self.in_flight != (rb.POLICY_VERSION_MAX in surplus.column_names):   # in-flight turned on or off
            surplus = rb.with_column(surplus, rb.POLICY_VERSION_MAX, surplus[rb.POLICY_VERSION].to_pylist()) \
                if self.in_flight else surplus.drop_columns([rb.POLICY_VERSION_MAX])
        surplus = self._shaped(surplus, fill.step)     # (made before a resume that turned shaping on: for this step)
        src = fill.source if fill.source in self.versions else min(self.versions)   # (an old checkpoint: stricter)
        newest = self.versions[src] + (fill.step - 1 - src)
        carried, fill.carried, fill.expired = usable_surplus(rb.in_column_order(surplus), newest, self.S, self.G)
        fill.kept.append(carried)
        fill.n_kept += fill.carried

    def _shaped(self, rows: pa.Table, step: int) -> pa.Table:
        """Rows made for `step` -> their rewards shaped for it as the spec asks, once: rows already
        shaped keep it (a surplus carried to the next step, the shaping it was filtered with); the
        column of rows made before a resume that turned shaping off is dropped."""
        rs = self.spec.algorithm.reward_shaping
        if rb.SHAPED_REWARD in rows.column_names:
            return rows if shaping_on(rs) else rows.drop_columns([rb.SHAPED_REWARD])
        return with_shaped_rewards(rows, rs, self.spec.generator.max_new_tokens, step)

    def _finish_fill(self) -> None:
        fill = self.current
        kept = rb.concat(fill.kept)
        if kept is not None and kept.num_rows > self.P * self.G:   # the groups beyond the batch: surplus
            fill.kept, self.surplus = [kept.slice(0, self.P * self.G)], [kept.slice(self.P * self.G)]
        fill.keep_rate, fill.surplus_before = self.keep_rate.rate, []   # (only a fill in progress saves it)
        self.ready[fill.step] = fill
        self.current = None

    # ------------------------------------------------------------------ figures
    def bound_seconds(self) -> float:
        """Seconds so far during which the next fill could not start for want of its version."""
        now = time.monotonic()
        return self._bound_s + (now - self._bound_since if self._bound_since is not None else 0.0)
