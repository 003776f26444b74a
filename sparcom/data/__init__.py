"""HexaInst: the shipped dataset, its schema, and a loader that reports problems by file and line."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

CATEGORIES: tuple[str, ...] = ("classification", "code", "general_qa", "generation", "math", "summarization")
FIELDS: tuple[str, ...] = ("id", "category", "instruction", "input", "output", "origin")
# What a user's file must give; load_records fills in the rest (see with_defaults).
REQUIRED_FIELDS: tuple[str, ...] = ("category", "instruction", "output")
# Records built from public sources also carry their licence; the shipped file is the project's own.
OPTIONAL_FIELDS: tuple[str, ...] = ("license",)

Record = dict[str, str]


@dataclass(frozen=True)
class DataError:
    """One problem in a data file: where it is and what is wrong."""

    path: str
    line: int | None  # 1-based; None for problems of the whole file (an empty category)
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.message}"


class DataFileError(ValueError):
    """A data file that cannot be used. The message is one line: the problem, or the first three of
    several with how many more (``errors`` holds every one; ``python -m sparcom.data validate`` lists them)."""

    SHOWN = 3

    def __init__(self, errors: list[DataError]):
        self.errors = errors
        if len(errors) == 1:
            super().__init__(str(errors[0]))
            return
        shown = "; ".join(str(e) for e in errors[: self.SHOWN])
        more = len(errors) - self.SHOWN
        tail = f"; ... ({more} more; `python -m sparcom.data validate {errors[0].path}` lists every one)"
        super().__init__(f"{len(errors)} problems in data: {shown}" + (tail if more > 0 else ""))


def hexainst_path() -> Path:
    """Path of the HexaInst file shipped inside the package."""
    return Path(str(resources.files("sparcom.data") / "hexainst.jsonl"))


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_jsonl(
    path: str | Path, required: tuple[str, ...] = FIELDS
) -> tuple[list[tuple[int, Record]], list[DataError]]:
    """Read a JSONL file of records, keeping each record's line number.

    Returns the well-formed records and the problems found: bytes that are not UTF-8, lines that
    are not JSON objects, missing ``required`` fields, non-string fields.
    """
    path = Path(path)
    records: list[tuple[int, Record]] = []
    errors: list[DataError] = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            errors.append(
                DataError(
                    str(path), number, f"not UTF-8 (byte {err.start}: {raw[err.start : err.start + 1]!r})"
                )
            )
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            errors.append(DataError(str(path), number, f"malformed JSON: {err.msg} at column {err.colno}"))
            continue
        except RecursionError:  # a line of thousands of nested brackets
            errors.append(DataError(str(path), number, "malformed JSON: nested too deeply"))
            continue
        if not isinstance(record, dict):
            errors.append(
                DataError(str(path), number, f"expected a JSON object, got {type(record).__name__}")
            )
            continue
        problems = [f"missing field {name!r}" for name in required if name not in record]
        problems += [
            f"field {name!r} must be a string, got {type(record[name]).__name__}"
            for name in FIELDS + OPTIONAL_FIELDS
            if name in record and not isinstance(record[name], str)
        ]
        # A "\ud800" escape decodes to a lone surrogate, which no UTF-8 consumer (compile, print) accepts.
        problems += [
            f"field {name!r} has a lone surrogate escape (not encodable as UTF-8)"
            for name in FIELDS + OPTIONAL_FIELDS
            if isinstance(record.get(name), str)
            and not record[name].isascii()
            and _has_surrogate(record[name])
        ]
        if problems:
            errors.extend(DataError(str(path), number, p) for p in problems)
            continue
        records.append((number, record))
    return records, errors


def with_defaults(record: Record) -> Record:
    """A record with the optional fields filled in: ``input`` "", ``origin`` "user", and an ``id``
    ``<category>-<hash of instruction, input and output>``. A content hash rather than a line
    number, so that a record keeps its id when lines are added, removed or reordered, and a
    snapshot's instruction ids still name the same records after the file is edited."""
    if all(name in record for name in FIELDS):
        return record
    text = "\0".join((record["instruction"], record.get("input", ""), record["output"]))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    defaults = {"id": f"{record['category']}-{digest}", "input": "", "origin": "user"}
    return {name: record.get(name, defaults.get(name)) for name in FIELDS} | record


def load_records(path: str | Path | None = None, categories: tuple[str, ...] = CATEGORIES) -> list[Record]:
    """Load HexaInst-schema records (the shipped HexaInst when ``path`` is None). A record needs
    ``category``, ``instruction`` and ``output``; the others get defaults (``with_defaults``).

    Raises ``DataFileError`` naming file and line for malformed lines, missing fields, non-UTF-8
    text, unknown categories, and for any requested category that has no records.
    """
    path = hexainst_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    numbered, errors = read_jsonl(path, REQUIRED_FIELDS)
    numbered = [(number, with_defaults(record)) for number, record in numbered]
    for number, record in numbered:
        if record["category"] not in CATEGORIES:
            errors.append(
                DataError(
                    str(path),
                    number,
                    f"unknown category {record['category']!r}; expected one of {list(CATEGORIES)}",
                )
            )
    present = {record["category"] for _, record in numbered}
    errors += [
        DataError(str(path), None, f"category {c!r} has no records") for c in categories if c not in present
    ]
    if errors:
        raise DataFileError(errors)
    return [record for _, record in numbered if record["category"] in categories]
