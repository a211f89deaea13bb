"""Reading and checking: YAML + overrides -> a plain dict (`read_spec`) -> `RunSpec`
(`typed_spec`), every problem reported at once as a `SpecError`; and back to YAML. The whole
load, with the tasks' checks, is `prorl_actors.config.load_spec`. OmegaConf is imported where YAML is read or written,
so that the typed sections import without it (benchmarks/gpu_smoke.py on a bare GPU machine).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prorl_actors.errors import InputError
from prorl_actors.spec.run import RunSpec

if TYPE_CHECKING:
    from omegaconf import DictConfig


# ----------------------------------------------------------------------------- checking
class SpecError(InputError):
    """Every problem of a spec, each as (key path, value given, what is allowed)."""

    def __init__(self, errors: list[tuple[str, Any, str]]):
        self.errors = errors
        lines = [f"  {path}: got {value!r}; allowed: {allowed}" for path, value, allowed in errors]
        super().__init__(f"{len(errors)} error(s) in the run spec:\n" + "\n".join(lines))


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _build(tp, value, path: str, errs: list) -> Any:
    """Return `value` converted to `tp`, appending (path, value, allowed) for each problem."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errs.append((path or "<root>", value, _type_name(tp)))
            return None
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        for key in value:
            if key not in fields:
                errs.append((f"{path}.{key}".lstrip("."), value[key],
                             f"a known key of {path or 'the spec'}: {', '.join(fields)}"))
        kwargs = {}
        for name, f in fields.items():
            if name not in value:
                continue
            sub = f"{path}.{name}".lstrip(".")
            v = _build(hints[name], value[name], sub, errs)
            if v is not None or value[name] is None:
                _check_bounds(v, f.metadata, sub, errs, given=value[name])
                kwargs[name] = v
        try:
            return tp(**kwargs)
        except TypeError as e:  # only reachable if a field has no default
            errs.append((path, value, str(e)))
            return None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            errs.append((path, value, _type_name(tp)))
            return None
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            errs.append((path, value, _type_name(tp)))
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, path, errs)
    if origin is list:
        if not isinstance(value, list):
            errs.append((path, value, _type_name(tp)))
            return None
        (item,) = typing.get_args(tp)
        return [_build(item, v, f"{path}[{i}]", errs) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            errs.append((path, value, "a mapping with string keys"))
            return None
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errs.append((path, value, "true or false"))
            return None
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errs.append((path, value, "an integer"))
            return None
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errs.append((path, value, "a number"))
            return None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errs.append((path, value, "a string"))
            return None
        return value
    raise TypeError(f"spec type {tp} at {path} is not supported")


def _check_bounds(v, meta, path, errs, given):
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    for key, op, word in (("ge", float.__ge__, ">="), ("gt", float.__gt__, ">"),
                          ("le", float.__le__, "<="), ("lt", float.__lt__, "<")):
        if key in meta and not op(float(v), float(meta[key])):
            errs.append((path, given, f"{word} {meta[key]}"))


def typed_spec(data: dict) -> tuple[RunSpec | None, list[tuple[str, Any, str]]]:
    """Plain nested dict -> (RunSpec, []), or (None, every problem of keys, types and bounds);
    with no such problem, the spec's own cross-field rules (`RunSpec.cross_checks`) too. The
    tasks' checks come on top in `prorl_actors.config.build_spec`."""
    errs: list = []
    spec = _build(RunSpec, data, "", errs)
    if errs:
        return None, errs
    return spec, spec.cross_checks()


def _read_spec_file(path: str | Path) -> DictConfig:
    """The YAML mapping of a spec file, or InputError saying what is wrong with the file."""
    import yaml
    from omegaconf import DictConfig, OmegaConf
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InputError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    if not isinstance(cfg, DictConfig):
        raise InputError(f"{path}: a run spec is a mapping of sections (model:, data:, learner:, ...); "
                         f"this file holds a {type(OmegaConf.to_container(cfg)).__name__}")
    return cfg


def read_spec(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """YAML file (or the defaults when path is None) + `dotted.key=value` overrides -> the
    plain nested dict `typed_spec` checks (SpecError for overrides that do not parse)."""
    from omegaconf import OmegaConf
    errs = []
    cfg = _read_spec_file(path) if path is not None else OmegaConf.create({})
    parsed = []
    for o in overrides:
        if "=" not in o:
            errs.append((o, o, "overrides of the form dotted.key=value"))
            continue
        try:
            parsed.append(OmegaConf.from_dotlist([o]))
        except Exception as e:  # noqa: BLE001 - OmegaConf's grammar errors have no common base worth naming
            errs.append((o.split("=", 1)[0], o.split("=", 1)[1],
                         f"a value OmegaConf can parse ({str(e).splitlines()[0]})"))
    if errs:
        raise SpecError(errs)
    try:
        cfg = OmegaConf.merge(cfg, *parsed)
    except Exception as e:  # noqa: BLE001 - e.g. a list given where the file has a mapping
        raise SpecError([("<overrides>", list(overrides), f"values that fit the spec's structure ({e})")]) from None
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # a broken ${...} interpolation
        raise SpecError([("<interpolation>", None, str(e))]) from None
    return data or {}


def to_yaml(spec: RunSpec) -> str:
    from omegaconf import OmegaConf
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(spec)))
