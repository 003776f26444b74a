"""Two real processes (torchrun, gloo) over shards give exactly the counts of one process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import sparcom
from sparcom.models.loading import load_model
from sparcom.recording.probe import Recording
from sparcom.snapshot import Snapshot

from helpers.models import per_category, torchrun

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize(
    ("preset", "scope"),
    [("tiny-llama", "prompt"), ("tiny-qwen2-moe", "prompt"), ("tiny-qwen2-moe", "generated")],
)
def test_two_ranks_equal_one_process(preset, scope, tmp_path):
    out = tmp_path / "reduced.safetensors"
    command = [
        *torchrun(),
        str(HERE / "distributed_record.py"),
        str(out),
        preset,
        scope,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert done.returncode == 0, done.stderr[-3000:]
    reduced = Snapshot.load(out)
    model, tokenizer = load_model(preset)
    single = sparcom.record(
        model,
        tokenizer,
        per_category(3),
        Recording(token_scope=scope, max_new_tokens=8, batch_size=4),
        progress=False,
    )
    assert reduced.tokens == single.tokens
    assert reduced.generated == single.generated  # each rank generated its share; all were shared
    for site in single.category_counts:
        assert torch.equal(reduced.instruction_counts[site], single.instruction_counts[site]), site
