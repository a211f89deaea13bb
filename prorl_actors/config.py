"""A run spec as a run gets it: read (YAML + `dotted.key=value` overrides), typed, and checked
whole, every problem reported at once as one `SpecError` with its key path.

The checks come from two places: the spec's own (prorl_actors/spec/: keys, types, bounds,
rules across sections) and the tasks' (tasks/checks.py: generators that exist and accept
their settings, files that exist, unique names). This module is where they meet, so that
neither imports the other.
"""
from __future__ import annotations

from pathlib import Path

from prorl_actors.spec import RunSpec, SpecError, read_spec, typed_spec
from prorl_actors.tasks.checks import task_errors

__all__ = ["build_spec", "load_spec"]


def build_spec(data: dict) -> RunSpec:
    """Plain nested dict -> RunSpec, or SpecError listing every problem."""
    spec, errs = typed_spec(data)
    if spec is not None:
        errs = errs + task_errors(spec)
    if errs:
        raise SpecError(errs)
    return spec


def load_spec(path: str | Path | None, overrides: list[str] = ()) -> RunSpec:
    """YAML file (or the defaults when path is None) + `dotted.key=value` overrides -> RunSpec."""
    return build_spec(read_spec(path, overrides))
