"""Reading back what the experiment trackers wrote: TensorBoard's event files (with TensorBoard's
own reader, which applies purge_step as the TensorBoard UI does) and W&B's offline runs (the
.wandb transaction log: LevelDB's log format of protobuf records, read here without W&B's
service, which has no Python reader any more)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

WANDB_HEADER = struct.Struct("<4sHB")   # b":W&B", magic 0xBEE1, version 0
BLOCK = 32768
RECORD_HEADER = struct.Struct("<IHB")   # crc32c, length, type: 1 full, 2 first, 3 middle, 4 last


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})   # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path: Path) -> list:
    """The protobuf Records of one .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    ident, magic, version = WANDB_HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, records, parts = WANDB_HEADER.size, [], b""
    while pos + RECORD_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < RECORD_HEADER.size:   # a block's tail too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, pos)
        pos += RECORD_HEADER.size
        if (kind == 0 and length == 0) or pos + length > len(data):   # a zeroed tail; a write cut short
            break
        parts += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(parts)
            records.append(r)
            parts = b""
    return records


def wandb_runs(wandb_dir: Path) -> list[dict]:
    """Every offline run under `wandb_dir` (<dir>/wandb), oldest first: {"id", "config", "history"},
    history being the logged rows ({key: value}) in order."""
    out = []
    for f in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb")):
        run = {"id": None, "config": {}, "history": []}
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run["id"] = r.run.run_id
                run["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in r.history.item})
        out.append(run)
    return out
