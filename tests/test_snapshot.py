"""Snapshot files: round trip, provenance, atomic writes, no overwrite, clear errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import sparcom
from sparcom.models.loading import load_model
from sparcom.recording.probe import Recording
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


def test_existing_snapshot_is_overwritten_only_when_asked(snapshot, tmp_path):
    path = snapshot.save(tmp_path / "snap.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"not overwriting: .* \(pass overwrite=True to replace it\)"):
        snapshot.save(path)
    assert path.read_bytes() == before
    other = Snapshot.load(path)  # lazy: its counts are read from the file being replaced
    smaller = replace(other, meta={**other.meta, "step": 99})
    smaller.save(path, overwrite=True)
    assert Snapshot.load(path).meta["step"] == 99 and not list(tmp_path.glob(".*.tmp"))
    for site in snapshot.site_kinds:
        assert torch.equal(Snapshot.load(path).category_counts[site], snapshot.category_counts[site])


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
    first = sparcom.record(
        model, tokenizer, small_records[::2], Recording(per_instruction=False), progress=False
    )
    second = sparcom.record(
        model, tokenizer, small_records[1::2], Recording(per_instruction=False), progress=False
    )
    merged = first + second
    assert merged.tokens == whole.tokens
    for site in whole.category_counts:
        assert torch.equal(merged.category_counts[site], whole.category_counts[site])


def test_per_instruction_shards_join_to_the_whole(small_records):
    model, tokenizer = load_model("tiny-qwen2-moe")
    whole = sparcom.record(model, tokenizer, small_records, progress=False)
    first = sparcom.record(model, tokenizer, small_records[::2], progress=False)
    second = sparcom.record(model, tokenizer, small_records[1::2], progress=False)
    merged = first + second
    assert merged.tokens == whole.tokens and merged.meta["dataset_hash"] == whole.meta["dataset_hash"]
    order = [merged.instruction_ids.index(i) for i in whole.instruction_ids]
    for site in whole.site_kinds:
        assert torch.equal(merged.category_counts[site], whole.category_counts[site])
        assert torch.equal(
            merged.instruction_counts[site][order].long(), whole.instruction_counts[site].long()
        )
    with pytest.raises(SnapshotError, match="share instructions"):
        first + first


def test_repr_is_one_short_line(snapshot):
    text = repr(snapshot)
    assert "\n" not in text and len(text) < 160
    assert "step 7" in text and "6 categories" in text and "18 instructions" in text


def test_loading_costs_memory_in_proportion_to_what_is_read(tmp_path):
    """A 256 MB snapshot: opening it and reading one category's counts adds a few MB to the
    peak resident memory of a fresh process; reading one site adds about that site."""
    import subprocess
    import sys

    sites, instructions, shape = 8, 1000, (16, 1024)  # 32 MB of int16 per site
    generator = torch.Generator().manual_seed(0)
    counts = {
        f"model.layers.{i}.mlp.experts": torch.randint(
            0, 50, (instructions, *shape), generator=generator, dtype=torch.int16
        )
        for i in range(sites)
    }
    categories = [f"c{i}" for i in range(instructions)]
    Snapshot(
        categories=["math"],
        category_tokens=torch.tensor([100 * instructions]),
        category_counts={s: c.long().sum(0, keepdim=True) for s, c in counts.items()},
        site_kinds={s: "experts" for s in counts},
        site_layers={s: i for i, s in enumerate(counts)},
        instruction_ids=categories,
        instruction_categories=["math"] * instructions,
        instruction_tokens=torch.full((instructions,), 100),
        instruction_counts=counts,
    ).save(tmp_path / "big.safetensors")
    del counts
    script = """
import sys, torch
from sparcom.snapshot import Snapshot
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
snapshot = Snapshot.load(sys.argv[1])
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
before = status("VmRSS:")
what = sys.argv[2]
if what == "category":
    rows = [snapshot.counts["math"][site].max() for site in snapshot.site_kinds]
elif what == "site":
    rows = snapshot.instruction_counts["model.layers.0.mlp.experts"].max()
print((status("VmHWM:") - before) / 1024)
"""
    grown = {}
    for what in ("category", "site"):
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "big.safetensors"), what],
            capture_output=True,
            text=True,
            check=True,
        )
        grown[what] = float(done.stdout.split()[-1])
    assert (tmp_path / "big.safetensors").stat().st_size > 256e6
    assert grown["category"] < 24, grown  # 8 rows of 16 k int64 (1 MB), and nothing else
    assert 28 < grown["site"] < 100, grown  # one 32 MB site, and not the other seven


def test_different_probe_sets_are_refused_with_the_fix(small_records):
    from sparcom.snapshot import check_comparable

    model, tokenizer = load_model("tiny-llama")
    two = sparcom.record(model, tokenizer, small_records, progress=False)
    one = sparcom.record(model, tokenizer, small_records[::3], progress=False)
    with pytest.raises(
        SnapshotError, match=r"base has 3 instructions per category, tuned 1: .*per_category=1"
    ):
        check_comparable(two, one)
