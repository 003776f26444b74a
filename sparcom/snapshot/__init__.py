"""Snapshot: firing counts per site, per category and per instruction, with their provenance.

One safetensors file: the counts plus JSON metadata, written atomically (temporary file, then
rename) and one tensor at a time. Raw counts are kept, not sets, so any epsilon can be applied
later without a forward pass. A loaded snapshot is lazy: its metadata is read at once, and each
site's counts only when that site is asked for, so analyses can stream over sites of snapshots
far larger than memory.

A snapshot of the ``"generated"`` token scope also holds each instruction's continuation (the
token ids counted) in the file's JSON header, so the file alone says which tokens were counted;
``save`` writes the decoded text beside it, ``<name>.generated.jsonl``, for reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparcom.data import CATEGORIES
from sparcom.snapshot import tensorfile

FORMAT = "sparcom-snapshot-2"
READABLE_FORMATS = ("sparcom-snapshot-1", FORMAT)
SNAPSHOT_NAME = "snapshot-step{step:07d}.safetensors"
_STEP = re.compile(r"snapshot-step(\d+)\.safetensors$")


class SnapshotError(ValueError):
    pass


@dataclass(repr=False)
class Snapshot:
    """Counts of one recording.

    Attributes:
        categories: the category names, in row order of the category tensors.
        category_tokens: ``[C]`` int64, counted tokens ``T`` per category.
        category_counts: site -> ``[C, *shape]`` int64 firing counts per category.
        site_kinds: site -> "ffn" | "experts" | "router"; site_layers: site -> layer index.
        instruction_ids / instruction_categories: one entry per instruction (empty when off).
        instruction_tokens: ``[N]`` int64, or None.
        instruction_counts: site -> ``[N, *shape]`` in the narrowest lossless integer dtype
            (int16 or int32; cast before arithmetic), or None.
        meta: model, model_type, config_hash, dataset_hash, token_scope, step, sparcom_version,
            category_instructions (instructions per category); max_new_tokens (generated scope).
        generated: instruction id -> the token ids of the model's own continuation that were
            counted (token scope "generated"; without the end-of-sequence token), else empty.
        generated_text: instruction id -> that continuation decoded.

    The count mappings of a loaded snapshot read each site from disk when it is accessed.
    """

    categories: list[str]
    category_tokens: torch.Tensor
    category_counts: Mapping[str, torch.Tensor]
    site_kinds: dict[str, str]
    site_layers: dict[str, int]
    instruction_ids: list[str] = field(default_factory=list)
    instruction_categories: list[str] = field(default_factory=list)
    instruction_tokens: torch.Tensor | None = None
    instruction_counts: Mapping[str, torch.Tensor] | None = None
    meta: dict = field(default_factory=dict)
    generated: dict[str, list[int]] = field(default_factory=dict)
    generated_text: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.instruction_categories and "category_instructions" not in self.meta:
            self.meta["category_instructions"] = {
                c: self.instruction_categories.count(c) for c in self.categories
            }

    # ---------------------------------------------------------------- the notebook-facing views

    @property
    def tokens(self) -> dict[str, int]:
        """Counted tokens per category."""
        return {c: int(t) for c, t in zip(self.categories, self.category_tokens, strict=True)}

    @property
    def counts(self) -> dict[str, Mapping[str, torch.Tensor]]:
        """``counts[category][site]``: integer firing counts of that site's neurons or experts.
        Only the rows asked for are read from disk."""
        return {c: _Row(self.category_counts, row) for row, c in enumerate(self.categories)}

    @property
    def per_instruction(self) -> bool:
        return self.instruction_counts is not None

    def sites(self, kind: str | None = None) -> list[str]:
        return [s for s, k in self.site_kinds.items() if kind is None or k == kind]

    def site_shape(self, site: str) -> tuple[int, ...]:
        """The shape of one site's neurons (or experts), read from metadata alone."""
        counts = self.category_counts
        shape = counts.shape(site) if hasattr(counts, "shape") else tuple(counts[site].shape)
        return tuple(shape[1:])

    def frequency(self, category: str) -> dict[str, torch.Tensor]:
        """``p`` per site for one category: counts divided by all of its counted tokens ``T``."""
        row = self.categories.index(category)
        total = max(int(self.category_tokens[row]), 1)
        return {site: counts.double() / total for site, counts in self.counts[category].items()}

    def instruction_frequency(self, index: int) -> dict[str, torch.Tensor]:
        """``p`` per site for one instruction (requires per-instruction statistics)."""
        counts = self.require_instructions("per-instruction frequencies")
        total = max(int(self.instruction_tokens[index]), 1)
        return {site: row.double() / total for site, row in _Row(counts, index).items()}

    def require_instructions(self, purpose: str) -> Mapping[str, torch.Tensor]:
        """The per-instruction counts, or an error saying why ``purpose`` needs them."""
        if self.instruction_counts is None:
            raise SnapshotError(
                f"{purpose} need per-instruction counts, and this snapshot has none "
                "(recorded with per_instruction=False); record again with sparcom.probe.per_instruction=true"
            )
        return self.instruction_counts

    def __repr__(self) -> str:
        step = self.meta.get("step")
        return (
            f"Snapshot({self.meta.get('model') or '?'}"
            + (f", step {step}" if step is not None else "")
            + f", {self.meta.get('token_scope', '?')} scope: {len(self.categories)} categories, "
            f"{len(self.instruction_ids) or sum(self.meta.get('category_instructions', {}).values())} "
            f"instructions, {int(self.category_tokens.sum()):,} tokens, {len(self.site_kinds)} sites)"
        )

    # ------------------------------------------------------------------------- combining shards

    def __add__(self, other: Snapshot) -> Snapshot:
        """Join recordings of disjoint shards of one probe set (same model, sites and scope):
        category counts add, per-instruction rows are concatenated."""
        for what in ("model_type", "config_hash", "token_scope", "step", "max_new_tokens"):
            if self.meta.get(what) != other.meta.get(what):
                raise SnapshotError(
                    f"cannot join snapshots with different {what}: "
                    f"{self.meta.get(what)!r} and {other.meta.get(what)!r}"
                )
        if self.site_kinds != other.site_kinds:
            raise SnapshotError("cannot join snapshots with different sites")
        if self.per_instruction != other.per_instruction:
            raise SnapshotError("cannot join a snapshot with per-instruction counts and one without")
        shared = set(self.instruction_ids) & set(other.instruction_ids)
        if shared:
            raise SnapshotError(
                f"cannot join snapshots that share instructions ({len(shared)}, e.g. {sorted(shared)[0]!r}); "
                "+ joins disjoint shards"
            )
        categories = [c for c in CATEGORIES if c in self.categories or c in other.categories]
        categories += [c for c in [*self.categories, *other.categories] if c not in categories]

        def by_category(values: torch.Tensor, names: list[str]) -> torch.Tensor:
            out = torch.zeros((len(categories), *values.shape[1:]), dtype=torch.int64)
            out[[categories.index(c) for c in names]] = values.long()
            return out

        def joined(site: str) -> torch.Tensor:
            return by_category(self.category_counts[site], self.categories) + by_category(
                other.category_counts[site], other.categories
            )

        sizes = {
            c: self.meta.get("category_instructions", {}).get(c, 0)
            + other.meta.get("category_instructions", {}).get(c, 0)
            for c in categories
        }
        meta = {
            **self.meta,
            "dataset_hash": combine_hashes(self.meta.get("dataset_hash"), other.meta.get("dataset_hash")),
            "category_instructions": sizes,
        }
        return Snapshot(
            categories=categories,
            category_tokens=by_category(self.category_tokens, self.categories)
            + by_category(other.category_tokens, other.categories),
            category_counts={site: joined(site) for site in self.site_kinds},
            site_kinds=dict(self.site_kinds),
            site_layers=dict(self.site_layers),
            instruction_ids=[*self.instruction_ids, *other.instruction_ids],
            instruction_categories=[*self.instruction_categories, *other.instruction_categories],
            instruction_tokens=None
            if self.instruction_tokens is None
            else torch.cat([self.instruction_tokens, other.instruction_tokens]),
            instruction_counts=None
            if self.instruction_counts is None
            else {
                s: torch.cat([self.instruction_counts[s].int(), other.instruction_counts[s].int()])
                for s in self.site_kinds
            },
            meta=meta,
            generated={**self.generated, **other.generated},
            generated_text={**self.generated_text, **other.generated_text},
        )

    # ---------------------------------------------------------------------------------- disk

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write atomically, one site at a time (the new file replaces an old one in one rename, so a
        reader never sees half of either); an existing snapshot is replaced only with ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"snapshot already exists, not overwriting: {path} (pass overwrite=True to replace it)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        categories = len(self.categories)
        # No count can exceed its row's token count, so these dtypes are lossless.
        category_dtype = _narrowest(int(self.category_tokens.max()) if categories else 0, torch.int32)
        planned: dict[str, tensorfile.Planned] = {
            "category_tokens": (torch.int64, (categories,), lambda: self.category_tokens.long())
        }
        for site in self.site_kinds:
            planned[f"category/{site}"] = (
                category_dtype,
                (categories, *self.site_shape(site)),
                lambda site=site: self.category_counts[site].to(category_dtype),
            )
        if self.instruction_counts is not None:
            tokens = self.instruction_tokens
            count = len(tokens)
            planned["instruction_tokens"] = (torch.int64, (count,), lambda: tokens.long())
            dtype = _narrowest(int(tokens.max()) if count else 0, torch.int16)
            for site in self.site_kinds:
                planned[f"instruction/{site}"] = (
                    dtype,
                    (count, *self.site_shape(site)),
                    lambda site=site: self.instruction_counts[site].to(dtype),
                )
        header = {
            "format": FORMAT,
            "categories": self.categories,
            "site_kinds": self.site_kinds,
            "site_layers": self.site_layers,
            "instruction_ids": self.instruction_ids,
            "instruction_categories": self.instruction_categories,
            "meta": self.meta,
        }
        if self.generated:
            header |= {"generated": self.generated, "generated_text": self.generated_text}
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tensorfile.write(temporary, planned, {"sparcom": json.dumps(header)})
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        if self.generated:  # a copy for reading; the snapshot holds what counts
            _write_atomically(generated_path(path), self._generated_lines().encode())
        return path

    def _generated_lines(self) -> str:
        """One JSON line per continuation: the instruction, its category, its token ids, how many they
        are and its text."""
        category = dict(zip(self.instruction_ids, self.instruction_categories, strict=True))
        lines = [
            {
                "instruction_id": instruction,
                **({"category": category[instruction]} if instruction in category else {}),
                "num_tokens": len(ids),
                "token_ids": list(ids),
                "text": self.generated_text.get(instruction, ""),
            }
            for instruction, ids in self.generated.items()
        ]
        return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        """Open a snapshot: metadata now, counts site by site when used. A missing, truncated or
        foreign file raises ``SnapshotError`` naming it."""
        path = Path(path)
        if not path.is_file():
            raise SnapshotError(f"snapshot not found: {path}")
        try:
            metadata, entries, start = tensorfile.read_header(path)
            header = json.loads(metadata["sparcom"])
        except (tensorfile.TensorFileError, KeyError, json.JSONDecodeError, OSError) as err:
            raise SnapshotError(
                f"cannot read snapshot {path}: truncated or not a sparcom snapshot ({err})"
            ) from err
        if header.get("format") not in READABLE_FORMATS:
            raise SnapshotError(
                f"{path}: unknown snapshot format {header.get('format')!r}; expected {FORMAT!r}"
            )
        sites = list(header["site_kinds"])
        per_instruction = "instruction_tokens" in entries
        needed = ["category_tokens", *(f"category/{s}" for s in sites)]
        if per_instruction:
            needed += [f"instruction/{s}" for s in sites]
        missing = [name for name in needed if name not in entries]
        if missing:
            raise SnapshotError(f"cannot read snapshot {path}: tensor {missing[0]!r} is missing")

        def tensor(name: str) -> torch.Tensor:
            return tensorfile.read_tensor(path, entries[name], start)

        meta = header["meta"]
        if header["format"] != FORMAT:  # 0.1 files: an order-dependent hash, no instruction sizes
            meta = {**meta, "dataset_hash": f"v1:{meta.get('dataset_hash')}"}
        return cls(
            categories=header["categories"],
            category_tokens=tensor("category_tokens"),
            category_counts=tensorfile.LazyTensors(
                path, entries, start, "category/", sites, cast=torch.int64
            ),
            site_kinds=header["site_kinds"],
            site_layers={s: int(v) for s, v in header["site_layers"].items()},
            instruction_ids=header["instruction_ids"],
            instruction_categories=header["instruction_categories"],
            instruction_tokens=tensor("instruction_tokens") if per_instruction else None,
            instruction_counts=tensorfile.LazyTensors(path, entries, start, "instruction/", sites)
            if per_instruction
            else None,
            meta=meta,
            generated=header.get("generated", {}),
            generated_text=header.get("generated_text", {}),
        )


def generated_path(path: str | Path) -> Path:
    """Where a snapshot's continuations are written as text: ``<name>.generated.jsonl`` beside it."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".generated.jsonl")


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class _Row(Mapping[str, torch.Tensor]):
    """One row (a category or an instruction) of every site, read row by row from disk."""

    def __init__(self, counts: Mapping[str, torch.Tensor], row: int):
        self._counts, self._row = counts, row

    def __getitem__(self, site: str) -> torch.Tensor:
        if hasattr(self._counts, "rows"):
            return self._counts.rows(site, slice(self._row, self._row + 1))[0]
        return self._counts[site][self._row]

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)


def _narrowest(largest: int, smallest: torch.dtype) -> torch.dtype:
    for dtype in (torch.int16, torch.int32, torch.int64):
        if dtype.itemsize >= smallest.itemsize and largest <= torch.iinfo(dtype).max:
            return dtype
    raise SnapshotError(f"count {largest} does not fit in int64")


# ----------------------------------------------------------------------------- provenance

_HASH_BITS = 64


def dataset_hash(records: Sequence[dict]) -> str:
    """A hash of the set of instructions (order-free), additive over disjoint shards: the hash
    of a union is ``combine_hashes`` of the shards' hashes."""
    keys = ("id", "category", "instruction", "input", "output")
    total = 0
    for record in records:
        payload = json.dumps([record.get(k, "") for k in keys], ensure_ascii=False).encode()
        total += int(hashlib.sha256(payload).hexdigest()[:16], 16)
    return f"{total % (1 << _HASH_BITS):016x}"


def combine_hashes(a: str | None, b: str | None) -> str | None:
    if a is None or b is None or ":" in a or ":" in b:
        return None
    return f"{(int(a, 16) + int(b, 16)) % (1 << _HASH_BITS):016x}"


def check_comparable(a: Snapshot, b: Snapshot, names: tuple[str, str] = ("base", "tuned")) -> None:
    """Refuse to compare snapshots that do not measure the same thing, naming the difference."""
    checks = [
        ("model family", a.meta.get("model_type"), b.meta.get("model_type")),
        ("token scope", a.meta.get("token_scope"), b.meta.get("token_scope")),
        ("categories", a.categories, b.categories),
    ]
    if a.meta.get("token_scope") == "generated":
        # Each model is counted on its own continuation: the tokens differ by design, their budget may not.
        checks.append(("max_new_tokens", a.meta.get("max_new_tokens"), b.meta.get("max_new_tokens")))
    for what, left, right in checks:
        if left != right:
            raise SnapshotError(
                f"cannot compare snapshots: different {what} ({names[0]}: {left!r}, {names[1]}: {right!r})"
            )
    if a.meta.get("dataset_hash") != b.meta.get("dataset_hash"):
        sizes = [s.meta.get("category_instructions", {}) for s in (a, b)]
        hint = (
            "record both on the same instructions (the same data.path, sparcom.probe.per_category and seed)"
        )
        if sizes[0] and sizes[1] and sizes[0] != sizes[1]:
            counts = [sorted(set(s.values())) for s in sizes]
            hint = (
                f"{names[0]} has {_sizes(counts[0])} instructions per category, {names[1]} "
                f"{_sizes(counts[1])}: record the model with sparcom.probe.per_category="
                f"{min(counts[0] + counts[1])} and the same sparcom.probe.seed"
            )
        raise SnapshotError(f"cannot compare snapshots: different probe sets (dataset hashes differ); {hint}")
    if a.site_kinds != b.site_kinds:
        only_a = sorted(set(a.site_kinds) - set(b.site_kinds))[:3]
        only_b = sorted(set(b.site_kinds) - set(a.site_kinds))[:3]
        raise SnapshotError(
            f"cannot compare snapshots: different sites (only in {names[0]}: {only_a}, only in {names[1]}: {only_b})"
        )
    for site in a.site_kinds:
        if a.site_shape(site) != b.site_shape(site):
            raise SnapshotError(
                f"cannot compare snapshots: site {site} has shape {a.site_shape(site)} in {names[0]} "
                f"and {b.site_shape(site)} in {names[1]}"
            )


def check_continues(
    snapshot_dir: str | Path, records: Sequence[dict], token_scope: str, max_new_tokens: int | None = None
) -> None:
    """Refuse to continue a snapshot series (a resumed run) on another probe set or token scope than
    its step-0 snapshot was recorded on: its drift would mix two probe sets. A folder without
    snapshots continues nothing and passes."""
    series = snapshot_series(snapshot_dir)
    if not series:
        return
    base = Snapshot.load(next(iter(series.values())))
    meta = base.meta
    now = {
        c: sum(r["category"] == c for r in records)
        for c in CATEGORIES
        if any(r["category"] == c for r in records)
    }
    checks = [("token scope", meta.get("token_scope"), token_scope)]
    if token_scope == "generated":
        checks.append(("max_new_tokens", meta.get("max_new_tokens"), max_new_tokens))
    for what, left, right in checks:
        if left != right:
            raise SnapshotError(
                f"cannot continue the snapshot series in {snapshot_dir}: different {what} (step 0: {left!r}, "
                f"now: {right!r}); its drift would mix two measurements"
            )
    if meta.get("dataset_hash") != dataset_hash(records):
        recorded = sorted(set(meta.get("category_instructions", {}).values()))
        raise SnapshotError(
            f"cannot continue the snapshot series in {snapshot_dir}: different probe sets (step 0 has "
            f"{_sizes(recorded) if recorded else '?'} instructions per category, now {_sizes(sorted(set(now.values())))}, "
            "or other instructions); its drift would mix two probe sets; expected the run's own data.path "
            "and sparcom.probe settings"
        )


def _sizes(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def instruction_order(base: Snapshot, tuned: Snapshot) -> torch.Tensor | None:
    """``[N]`` rows of ``tuned`` in ``base``'s instruction order, or None when already aligned."""
    if base.instruction_ids == tuned.instruction_ids:
        return None
    position = {instruction: row for row, instruction in enumerate(tuned.instruction_ids)}
    return torch.tensor([position[instruction] for instruction in base.instruction_ids])


def snapshot_series(directory: str | Path) -> dict[int, Path]:
    """Snapshots in a folder by training step (temporary files of unfinished writes are ignored)."""
    found = {}
    for path in Path(directory).glob("snapshot-step*.safetensors"):
        match = _STEP.search(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))
