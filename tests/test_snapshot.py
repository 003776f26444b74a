"""Snapshot files: round trip, provenance, atomic writes, no overwrite, clear errors."""

from __future__ import annotations

import pytest
import torch

import sparcom
from sparcom.models import load_model
from sparcom.snapshot import Snapshot, SnapshotError


@pytest.fixture(scope="module")
def snapshot(small_records):
    model, tokenizer = load_model("tiny-qwen2-moe")
    return sparcom.record(model, tokenizer, small_records, step=7, progress=False)


def test_round_trip_keeps_every_count_and_the_metadata(snapshot, tmp_path):
    path = snapshot.save(tmp_path / "snap.safetensors")
    loaded = Snapshot.load(path)
    assert loaded.tokens == snapshot.tokens
    assert loaded.categories == snapshot.categories and loaded.site_kinds == snapshot.site_kinds
    for site in snapshot.category_counts:
        assert torch.equal(loaded.category_counts[site], snapshot.category_counts[site])
        assert torch.equal(loaded.instruction_counts[site], snapshot.instruction_counts[site])
    assert loaded.meta["step"] == 7 and loaded.meta["token_scope"] == "prompt"
    for key in ("model", "config_hash", "dataset_hash", "sparcom_version"):
        assert loaded.meta[key]
    assert not list(tmp_path.glob(".*.tmp"))


def test_counts_view_is_by_category_then_site(snapshot):
    site = snapshot.sites("router")[0]
    assert snapshot.counts["math"][site].shape == (8,)
    assert snapshot.counts["math"][site].dtype == torch.int64
    assert snapshot.tokens["math"] == int(snapshot.category_tokens[snapshot.categories.index("math")])


def test_existing_snapshot_is_never_overwritten(snapshot, tmp_path):
    path = snapshot.save(tmp_path / "snap.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="not overwriting"):
        snapshot.save(path)
    assert path.read_bytes() == before


def test_truncated_or_foreign_file_names_the_file(snapshot, tmp_path):
    path = snapshot.save(tmp_path / "snap.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SnapshotError, match="truncated.safetensors"):
        Snapshot.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(SnapshotError, match="garbage.safetensors"):
        Snapshot.load(garbage)


def test_shards_add_up_to_the_whole(small_records):
    model, tokenizer = load_model("tiny-llama")
    whole = sparcom.record(model, tokenizer, small_records, progress=False)
    first = sparcom.record(model, tokenizer, small_records[::2], per_instruction=False, progress=False)
    second = sparcom.record(model, tokenizer, small_records[1::2], per_instruction=False, progress=False)
    merged = first + second
    assert merged.tokens == whole.tokens
    for site in whole.category_counts:
        assert torch.equal(merged.category_counts[site], whole.category_counts[site])
