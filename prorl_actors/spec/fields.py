"""`opt()`: the spec's dataclass field with bounds and help text."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import field


def opt(default, *, ge=None, gt=None, le=None, lt=None, help=""):
    """A spec field with bounds; `help` says what it does and why."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    meta["help"] = help
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)
