"""Read what an offline W&B run recorded, from its transaction log `offline-run-*/run-*.wandb`.

wandb >= 0.19 (its Go core) writes no `files/config.yaml` for an offline run: the config, history
rows, summary and artifacts are records in the log that `wandb sync` uploads. The log is LevelDB's
log format (32 KiB blocks of records with 7-byte headers) after a 7-byte `:W&B` file header, each
record a `wandb_internal_pb2.Record`. W&B's core process may still be writing the log when
`wandb.finish()` returns: `read_offline_run` waits for the closing `exit` record."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, chunk = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: zero padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        if pos + HEADER + length > len(data):  # W&B's core is still writing this record
            break
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            whole = payload
        elif kind == FIRST:
            chunk = payload
            continue
        elif kind == MIDDLE:
            chunk += payload
            continue
        elif kind == LAST:
            whole = chunk + payload
        else:  # zero padding at the end of the file
            break
        record = pb.Record()
        record.ParseFromString(whole)
        yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    name: str = ""
    group: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)


def read_offline_run(run_dir: Path, timeout: float = 60.0) -> OfflineRun:
    """`run_dir`: a `wandb/offline-run-*` folder, read once its log is complete."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = list(records(log))
        except DecodeError:  # a record half written as we read: read the log again
            found = []
        if any(r.WhichOneof("record_type") == "exit" for r in found):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{log}: no exit record after {timeout} s (run not finished)")
        time.sleep(0.2)
    run = OfflineRun()
    for record in found:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.name, run.group = record.run.display_name, record.run.run_group
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            art = record.artifact
            run.artifacts.append(
                {
                    "name": art.name,
                    "type": art.type,
                    "aliases": list(art.aliases),
                    "files": [entry.path for entry in art.manifest.contents],
                    "metadata": json.loads(art.metadata or "{}"),
                }
            )
    return run


def offline_runs(folder: Path) -> list[OfflineRun]:
    return [read_offline_run(d) for d in sorted(Path(folder).glob("wandb/offline-run-*"))]
