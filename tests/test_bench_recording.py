"""The recording benchmark's own measurements, checked where their truth is known: decision flips
on planted sign changes, host synchronisations on a planted one, and the scale section's GPU path
run on CPU at a tiny scale."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import sparcom
from sparcom.models.loading import load_model
from sparcom.models.sites import gate_weight
from sparcom.recording.probe import Recording
from sparcom.recording.recorder import Recorder

sys.path.insert(0, str(Path(__file__).parent / "bench"))
import scale  # noqa: E402
from precision import decision_flips  # noqa: E402

import recording  # noqa: E402  (the bench is a folder of scripts, not a package)


def test_identical_models_flip_nothing_and_a_negated_gate_flips_every_token(small_records):
    model, tokenizer = load_model("tiny-llama")
    same = decision_flips(model, copy.deepcopy(model), tokenizer, small_records)
    tokens = sum(
        int(sparcom.recording.conversation.encode(r, tokenizer).prompt_mask.sum()) for r in small_records
    )
    layers, width = model.config.num_hidden_layers, model.config.intermediate_size
    assert same == {"ffn": {"differing": 0, "total": tokens * layers * width, "fraction": 0.0}}

    # Negating one gate row of the last layer flips that neuron on every counted token, and
    # nothing else (no site comes after it).
    planted = copy.deepcopy(model)
    with torch.no_grad():
        planted.model.layers[-1].mlp.gate_proj.weight[5].neg_()
    assert decision_flips(model, planted, tokenizer, small_records)["ffn"]["differing"] == tokens


def test_a_negated_expert_gate_flips_exactly_the_pairs_routed_to_it(small_records):
    model, tokenizer = load_model("tiny-qwen2-moe")
    planted = copy.deepcopy(model)
    expert, neuron = 3, 7
    with torch.no_grad():
        gate_weight(planted.model.layers[-1].mlp.experts)[expert, neuron].neg_()
    flips = decision_flips(model, planted, tokenizer, small_records)
    # The batches decision_flips runs (8 rows), so every hidden state is bitwise the same.
    routed = sparcom.record(model, tokenizer, small_records, Recording(batch_size=8), progress=False)
    selections = int(routed.category_counts["model.layers.3.mlp.gate"][:, expert].sum())
    assert selections > 0
    assert flips["experts"]["differing"] == selections
    assert flips["router"]["differing"] == 0 and flips["ffn"]["differing"] == 0


def test_host_syncs_in_the_recording_loop_are_counted(small_records, monkeypatch):
    model, tokenizer = load_model("tiny-qwen2-moe")
    clean = recording.host_syncs(model, tokenizer, small_records)
    assert clean["sparcom"] == 0 and clean["batches"] == 2
    finish = Recorder.finish_batch

    def syncing(self):
        rows = finish(self)
        next(iter(rows.values())).sum().item()  # a planted read-back, once per batch
        return rows

    monkeypatch.setattr(Recorder, "finish_batch", syncing)
    assert recording.host_syncs(model, tokenizer, small_records)["sparcom"] == clean["batches"]


TINY_SHAPES = {  # with shared experts (dense sites too), and experts only
    "qwen2_moe": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=6,
    ),
    "mixtral": dict(
        hidden_size=64,
        intermediate_size=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=6,
    ),
}
PER_LAYER = {"qwen2_moe": 8 * 32 + 8 + 64, "mixtral": 8 * 32 + 8}  # counted units per layer


@pytest.mark.parametrize(
    ("model_type", "dtype"), [("qwen2_moe", torch.float32), ("mixtral", torch.bfloat16)]
)  # a float32 model against its bfloat16 copy, and a bfloat16 one against its float32 copy
def test_scale_section_runs_at_a_tiny_scale_on_cpu(model_type, dtype, capsys):
    """The path ``--device cuda`` takes, minus the CUDA memory counters: timings, bytes of counts at
    full depth, what the recorder held against the formula, and bfloat16 against float32 flips."""
    records = recording.probe_records(3)  # 18 records: two batches of 16 and 2
    config = TINY_SHAPES[model_type]
    result = scale.one_model("tiny", model_type, config, 2, "cpu", dtype, records, rounds=1, precision=True)
    out = capsys.readouterr().out
    assert "record / bare" in out and "firing decisions that differ, bfloat16 vs float32" in out
    assert result["held_bytes"] == result["formula_bytes"]
    per_instruction = 6 * PER_LAYER[model_type] * 2  # full depth, int16
    assert result["count_bytes_full_depth"]["host"] == scale.HEXAINST * per_instruction
    assert all(speed > 0 for speed in result["tokens_per_s"].values())
    flips = result["decision_flips"]
    assert set(flips) == (
        {"ffn", "router", "experts"} if model_type == "qwen2_moe" else {"router", "experts"}
    )
    assert all(0 <= f["fraction"] < 0.2 for f in flips.values())
    assert sum(f["differing"] for f in flips.values()) > 0  # bfloat16 does round some gates across zero
