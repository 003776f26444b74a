"""Read a W&B run file (``run-*.wandb``) back: the run's config, name, group and tags, and the
logged history rows, without a W&B server.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB
blocks of chunks, each with a 7-byte header (CRC32, length, type: full/first/middle/last)
carrying serialized ``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator:
    """Every ``Record`` message in a run file, in write order. A torn final chunk (a killed
    writer) ends the iteration instead of raising."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file (header {ident!r} {magic:#x})")
    position, pending = HEADER.size, b""
    while position + CHUNK.size <= len(data):
        room = BLOCK - position % BLOCK
        if room < CHUNK.size:  # the writer pads a block tail too small for a chunk header
            position += room
            continue
        _, length, kind = CHUNK.unpack_from(data, position)
        start = position + CHUNK.size
        if kind == 0 or start + length > len(data):
            return
        payload = data[start : start + length]
        position = start + length
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(path: str | Path) -> list[dict]:
    """The rows logged with ``wandb.log``: one dict per row, values decoded from JSON."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def run(path: str | Path):
    """The run's ``RunRecord`` (name, group, tags, config at start)."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise ValueError(f"{path} holds no run record")


def config(path: str | Path) -> dict:
    """The run's config as it ends: the values given at start, then every later update."""
    values: dict = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            update = record.run.config if kind == "run" else record.config
            for item in update.update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            for item in update.remove:
                values.pop(item.key or "/".join(item.nested_key), None)
    return values


def summary(path: str | Path) -> dict:
    """The run's summary as it ends: every summary update, in order."""
    values: dict = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            for item in record.summary.remove:
                values.pop(item.key or "/".join(item.nested_key), None)
    return values


def artifacts(path: str | Path) -> list[dict]:
    """The artifacts the run logged, in order: name, type, aliases, metadata, and the manifest's
    entries (path -> reference, digest, size)."""
    found = []
    for record in records(path):
        if record.WhichOneof("record_type") == "artifact":
            artifact = record.artifact
            found.append(
                {
                    "name": artifact.name,
                    "type": artifact.type,
                    "aliases": list(artifact.aliases),
                    "metadata": json.loads(artifact.metadata or "{}"),
                    "entries": {e.path: (e.ref, e.digest, e.size) for e in artifact.manifest.contents},
                }
            )
    return found


def run_file(run_dir: str | Path) -> Path:
    """The ``.wandb`` file of the (single) W&B run under a folder."""
    found = sorted(Path(run_dir).rglob("run-*.wandb"))
    if not found:
        raise FileNotFoundError(f"no W&B run file under {run_dir}")
    return found[-1]
