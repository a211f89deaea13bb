"""The one on-disk task format: Parquet or JSONL rows {task, prompt, reference, metadata}.

  task       the family that scores the row: math, code, stem, logic or ifeval
  prompt     the question as the model sees it (the family's template wraps it)
  reference  a JSON string: everything the family's verifier needs (see families.py)
  metadata   optional: an object (JSONL) or JSON string (Parquet) for people; never scored

`load_rows` checks every row, including its reference against its family. A bad row is a
`DataError` naming the file and row (JSONL: the line; Parquet: the row, from 1; a JSON array:
the item), or,
with `bad_rows="skip"`, is left out and reported in `LoadedRows.skipped`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from prorl_actors.errors import InputError
from prorl_actors.tasks.families import make_families

COLUMNS = ("task", "prompt", "reference", "metadata")


class DataError(InputError):
    pass


@dataclass
class Row:
    task: str
    prompt: str
    reference: str        # JSON text, checked
    metadata: dict


@dataclass
class LoadedRows:
    path: Path
    rows: list[Row]
    skipped: list[str] = field(default_factory=list)   # "file:row N: why", one per skipped row


def read_records(path: Path):
    """(row label, record) for each record of a Parquet file ("row N"), a JSON array ("item N")
    or JSONL ("line N", blank lines skipped); a record that is not JSON comes back as a
    DataError for the caller to report with its label."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None
        for i, rec in enumerate(table.to_pylist(), start=1):
            yield f"row {i}", rec
        return
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unknown file type {path.suffix!r} (use .jsonl, .json or .parquet)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text, as {path.suffix} files are ({e.reason} at byte {e.start})") \
            from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not a JSON array: {e.msg} at line {e.lineno}") from None
        for i, rec in enumerate(records, start=1):
            yield f"item {i}", rec
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"line {i}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {i}", DataError(f"not JSON: {e.msg} at column {e.colno}")


def check_row(raw, family: str | None, families: dict) -> Row:
    """One row -> Row, or ValueError saying what is wrong (without the file and row)."""
    if isinstance(raw, Exception):
        raise raw
    if not isinstance(raw, dict):
        raise DataError(f"a row must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(COLUMNS))
    if unknown:
        raise DataError(f"unknown keys {unknown}; a row has {', '.join(COLUMNS)}")
    task = raw.get("task")
    if task not in families:
        raise DataError(f"task {task!r} is not a family: {', '.join(families)}")
    if family is not None and task != family:
        raise DataError(f"task {task!r} in a file loaded for family {family!r}")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError("prompt must be a non-empty string")
    ref_text = raw.get("reference")
    if not isinstance(ref_text, str):
        raise DataError(f"reference must be a JSON string, got {type(ref_text).__name__}")
    try:
        ref = json.loads(ref_text)
    except json.JSONDecodeError as e:
        raise DataError(f"reference is not JSON: {e.msg}") from None
    if not isinstance(ref, dict):
        raise DataError("reference must be a JSON object")
    try:
        families[task].check_reference(ref)
    except (ValueError, TypeError) as e:
        raise DataError(f"{task} reference: {e}") from None
    meta = raw.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            raise DataError("metadata is a string that is not JSON") from None
    if meta is not None and not isinstance(meta, dict):
        raise DataError("metadata must be an object (or absent)")
    return Row(task, prompt, json.dumps(ref, ensure_ascii=False), meta or {})


def load_rows(path: str | Path, family: str | None = None, bad_rows: str = "error",
              families: dict | None = None) -> LoadedRows:
    path = Path(path)
    families = families or make_families()
    if not path.exists():
        raise DataError(f"{path}: no such file")
    out = LoadedRows(path, [])
    for label, raw in read_records(path):
        try:
            out.rows.append(check_row(raw, family, families))
        except ValueError as e:
            where = f"{path}:{label}: {e}"
            if bad_rows != "skip":
                raise DataError(where) from None
            out.skipped.append(where)
    if not out.rows:
        raise DataError(f"{path}: no usable row ({len(out.skipped)} skipped)")
    return out


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """Rows {task, prompt, reference (dict or JSON text), metadata} -> a JSONL or Parquet file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    norm = [{"task": r["task"], "prompt": r["prompt"],
             "reference": r["reference"] if isinstance(r["reference"], str) else json.dumps(r["reference"]),
             "metadata": r.get("metadata") or {}} for r in rows]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        for r in norm:
            r["metadata"] = json.dumps(r["metadata"], ensure_ascii=False)
        pq.write_table(pa.Table.from_pylist(norm), path)
    else:
        with path.open("w", encoding="utf-8") as f:
            for r in norm:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
