"""The kinds of event a run records in events.jsonl, written once.

`RunRecords.event` takes an `Event` and nothing else, so a kind is spelled in one place and a
misspelt one fails where it is written, not silently in a dashboard. `Event` is a `StrEnum`: it
is written to JSON as its value, and records read back compare equal to it
(`record["event"] == Event.RUN_END`).
"""
from __future__ import annotations

from enum import StrEnum


class Event(StrEnum):
    # the run's course
    RUN_START = "run_start"
    RUN_END = "run_end"
    RUN_RESUMED = "run_resumed"
    ROLLED_BACK = "rolled_back"
    PREEMPTED = "preempted"
    CHECKPOINT = "checkpoint"
    CHECKPOINT_DAMAGED = "checkpoint_damaged"
    SPEC_CHANGED = "spec_changed"
    # the actors (group.py)
    ACTOR_DIED = "actor_died"
    ACTOR_RESTARTED = "actor_restarted"
    WORK_REDISPATCHED = "work_redispatched"
    WORK_FAILED = "work_failed"
    # the data
    ITEM_REJECTED = "item_rejected"
    PROMPT_REJECTED = "prompt_rejected"
    ROWS_SKIPPED = "rows_skipped"
    VALIDATION_OVERLAPS_TRAINING = "validation_overlaps_training"
    GENERATION_FAILED = "generation_failed"
    # the step
    BATCH_SHORT = "batch_short"
    NO_INFORMATIVE_GROUPS = "no_informative_groups"
    NO_TRAINABLE_ROWS = "no_trainable_rows"
    UPDATE_SKIPPED = "update_skipped"
    # the reference
    REFERENCE_RESET = "reference_reset"
    REFERENCE_RESET_WAITS = "reference_reset_waits"
    REFERENCE_RESET_SKIPPED = "reference_reset_skipped"


# events about the run itself, not about its training steps: a rollback never moves them aside
LIFE_EVENTS = frozenset({Event.ACTOR_DIED, Event.ACTOR_RESTARTED, Event.WORK_REDISPATCHED, Event.ROLLED_BACK,
                         Event.RUN_RESUMED, Event.PREEMPTED, Event.SPEC_CHANGED, Event.CHECKPOINT_DAMAGED})
