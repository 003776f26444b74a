"""Snapshot: firing counts per site, per category and per instruction, with their provenance.

One file: safetensors tensors plus JSON metadata, written atomically (temporary file, then
rename). Raw counts are kept, not sets, so any epsilon can be applied later without a forward pass.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "sparcom-snapshot-1"
SNAPSHOT_NAME = "snapshot-step{step:07d}.safetensors"
_STEP = re.compile(r"snapshot-step(\d+)\.safetensors$")


class SnapshotError(ValueError):
    pass


@dataclass
class Snapshot:
    """Counts of one recording.

    Attributes:
        categories: the category names, in row order of the category tensors.
        category_tokens: ``[C]`` int64, counted tokens ``T`` per category.
        category_counts: site -> ``[C, *shape]`` int64 firing counts per category.
        site_kinds: site -> "ffn" | "experts" | "router"; site_layers: site -> layer index.
        instruction_ids / instruction_categories: one entry per instruction (empty when off).
        instruction_tokens: ``[N]`` int64, or None. instruction_counts: site -> ``[N, *shape]``, or None.
        meta: model, model_type, config_hash, dataset_hash, token_scope, step, sparcom_version.
    """

    categories: list[str]
    category_tokens: torch.Tensor
    category_counts: dict[str, torch.Tensor]
    site_kinds: dict[str, str]
    site_layers: dict[str, int]
    instruction_ids: list[str] = field(default_factory=list)
    instruction_categories: list[str] = field(default_factory=list)
    instruction_tokens: torch.Tensor | None = None
    instruction_counts: dict[str, torch.Tensor] | None = None
    meta: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- the notebook-facing views

    @property
    def tokens(self) -> dict[str, int]:
        """Counted tokens per category."""
        return {c: int(t) for c, t in zip(self.categories, self.category_tokens, strict=True)}

    @property
    def counts(self) -> dict[str, dict[str, torch.Tensor]]:
        """``counts[category][site]``: integer firing counts of that site's neurons or experts."""
        return {
            c: {site: counts[row] for site, counts in self.category_counts.items()}
            for row, c in enumerate(self.categories)
        }

    def sites(self, kind: str | None = None) -> list[str]:
        return [s for s, k in self.site_kinds.items() if kind is None or k == kind]

    def frequency(self, category: str) -> dict[str, torch.Tensor]:
        """``p`` per site for one category: counts divided by all of its counted tokens ``T``."""
        row = self.categories.index(category)
        total = max(int(self.category_tokens[row]), 1)
        return {site: counts[row].double() / total for site, counts in self.category_counts.items()}

    def instruction_frequency(self, index: int) -> dict[str, torch.Tensor]:
        """``p`` per site for one instruction (requires per-instruction statistics)."""
        if self.instruction_counts is None:
            raise SnapshotError(
                "this snapshot has no per-instruction statistics (recorded with per_instruction=False)"
            )
        total = max(int(self.instruction_tokens[index]), 1)
        return {site: counts[index].double() / total for site, counts in self.instruction_counts.items()}

    # ------------------------------------------------------------------- combining and ranks

    def __add__(self, other: Snapshot) -> Snapshot:
        """Sum of two recordings over disjoint shards of the same instructions and sites."""
        for name in ("categories", "site_kinds", "instruction_ids"):
            if getattr(self, name) != getattr(other, name):
                raise SnapshotError(f"cannot merge snapshots with different {name}")
        return Snapshot(
            categories=list(self.categories),
            category_tokens=self.category_tokens + other.category_tokens,
            category_counts={s: c + other.category_counts[s] for s, c in self.category_counts.items()},
            site_kinds=dict(self.site_kinds),
            site_layers=dict(self.site_layers),
            instruction_ids=list(self.instruction_ids),
            instruction_categories=list(self.instruction_categories),
            instruction_tokens=None
            if self.instruction_tokens is None
            else self.instruction_tokens + other.instruction_tokens,
            instruction_counts=None
            if self.instruction_counts is None
            else {s: c + other.instruction_counts[s] for s, c in self.instruction_counts.items()},
            meta=dict(self.meta),
        )

    # ---------------------------------------------------------------------------- disk

    def save(self, path: str | Path) -> Path:
        """Write atomically; refuses to overwrite an existing snapshot."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"snapshot already exists, not overwriting: {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"category_tokens": self.category_tokens.contiguous()}
        tensors |= {f"category/{s}": c.contiguous() for s, c in self.category_counts.items()}
        if self.instruction_counts is not None:
            tensors["instruction_tokens"] = self.instruction_tokens.contiguous()
            largest = int(self.instruction_tokens.max()) if len(self.instruction_tokens) else 0
            # No count can exceed its instruction's token count, so a narrow dtype is lossless.
            dtype = torch.int16 if largest <= torch.iinfo(torch.int16).max else torch.int32
            tensors |= {
                f"instruction/{s}": c.to(dtype).contiguous() for s, c in self.instruction_counts.items()
            }
        header = {
            "format": FORMAT,
            "categories": self.categories,
            "site_kinds": self.site_kinds,
            "site_layers": self.site_layers,
            "instruction_ids": self.instruction_ids,
            "instruction_categories": self.instruction_categories,
            "meta": self.meta,
        }
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(temporary), metadata={"sparcom": json.dumps(header)})
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        """Read a snapshot; a missing, truncated or foreign file raises ``SnapshotError`` naming it."""
        path = Path(path)
        if not path.is_file():
            raise SnapshotError(f"snapshot not found: {path}")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {})["sparcom"])
            tensors = load_file(str(path))
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError, RuntimeError) as err:
            raise SnapshotError(
                f"cannot read snapshot {path}: truncated or not a sparcom snapshot ({err})"
            ) from err
        if header.get("format") != FORMAT:
            raise SnapshotError(
                f"{path}: unknown snapshot format {header.get('format')!r}; expected {FORMAT!r}"
            )
        per_instruction = "instruction_tokens" in tensors
        return cls(
            categories=header["categories"],
            category_tokens=tensors["category_tokens"],
            category_counts={s: tensors[f"category/{s}"] for s in header["site_kinds"]},
            site_kinds=header["site_kinds"],
            site_layers={s: int(v) for s, v in header["site_layers"].items()},
            instruction_ids=header["instruction_ids"],
            instruction_categories=header["instruction_categories"],
            instruction_tokens=tensors["instruction_tokens"] if per_instruction else None,
            instruction_counts={s: tensors[f"instruction/{s}"].long() for s in header["site_kinds"]}
            if per_instruction
            else None,
            meta=header["meta"],
        )


def check_comparable(a: Snapshot, b: Snapshot, names: tuple[str, str] = ("base", "tuned")) -> None:
    """Refuse to compare snapshots that do not measure the same thing, naming the difference."""
    checks = [
        ("model family", a.meta.get("model_type"), b.meta.get("model_type")),
        ("token scope", a.meta.get("token_scope"), b.meta.get("token_scope")),
        ("dataset", a.meta.get("dataset_hash"), b.meta.get("dataset_hash")),
        ("categories", a.categories, b.categories),
    ]
    for what, left, right in checks:
        if left != right:
            raise SnapshotError(
                f"cannot compare snapshots: different {what} ({names[0]}: {left!r}, {names[1]}: {right!r})"
            )
    if a.site_kinds != b.site_kinds:
        only_a = sorted(set(a.site_kinds) - set(b.site_kinds))[:3]
        only_b = sorted(set(b.site_kinds) - set(a.site_kinds))[:3]
        raise SnapshotError(
            f"cannot compare snapshots: different sites (only in {names[0]}: {only_a}, only in {names[1]}: {only_b})"
        )
    for site, counts in a.category_counts.items():
        if counts.shape != b.category_counts[site].shape:
            raise SnapshotError(
                f"cannot compare snapshots: site {site} has shape {tuple(counts.shape)} in {names[0]} "
                f"and {tuple(b.category_counts[site].shape)} in {names[1]}"
            )


def snapshot_series(directory: str | Path) -> dict[int, Path]:
    """Snapshots in a folder by training step (temporary files of unfinished writes are ignored)."""
    found = {}
    for path in Path(directory).glob("snapshot-step*.safetensors"):
        match = _STEP.search(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))
