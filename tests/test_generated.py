"""The generated token scope: each model counted on its own greedy continuation of every prompt.

The continuation is checked against ``model.generate`` run one prompt at a time without padding,
and the counts against an independent recount of prompt + continuation from the model's weights."""

from __future__ import annotations

import json

import pytest
import torch

import sparcom
from sparcom.conversation import encode
from sparcom.sites import ARCHITECTURES
from sparcom.snapshot import Snapshot, SnapshotError, check_comparable, generated_path
from sparcom.workflows import write_comparison

from conftest import exact_model, per_category
from reference import Reference

PRESETS = ["tiny-llama", "tiny-qwen2-moe"]  # a dense model and an MoE with shared experts
NEW_TOKENS = 10


def _greedy_one_at_a_time(model, tokenizer, record, max_new_tokens) -> list[int]:
    """``model.generate`` on one unpadded prompt, cut before the first end-of-sequence token."""
    prompt = encode(record, tokenizer).needed_for("prompt").input_ids[None]
    out = model.generate(prompt, do_sample=False, max_new_tokens=max_new_tokens)[0, prompt.shape[1] :]
    stops = model.generation_config.eos_token_id
    stops = [stops] if isinstance(stops, int) else stops
    tokens = out.tolist()
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


@pytest.mark.parametrize("preset", PRESETS)
def test_continuation_is_the_models_greedy_output_and_stops_before_eos(preset):
    model, tokenizer = exact_model(preset)
    records = per_category(2)
    # Plant an end of sequence: the token the model writes sixth for the first prompt now ends it.
    free = _greedy_one_at_a_time(model, tokenizer, records[0], NEW_TOKENS)
    stop = next(free[i] for i in range(3, NEW_TOKENS) if free[i] not in free[:i])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]

    # Batches of 4 prompts of different lengths: the batched generation is padded on the left.
    snapshot = sparcom.record(
        model,
        tokenizer,
        records,
        token_scope="generated",
        max_new_tokens=NEW_TOKENS,
        batch_size=4,
        progress=False,
    )
    assert snapshot.generated[records[0]["id"]] == free[: free.index(stop)]  # the stop is not kept
    for record in records:
        assert snapshot.generated[record["id"]] == _greedy_one_at_a_time(
            model, tokenizer, record, NEW_TOKENS
        ), record["id"]
        assert len(snapshot.generated[record["id"]]) <= NEW_TOKENS
    lengths = torch.tensor([len(snapshot.generated[r["id"]]) for r in records])
    assert torch.equal(snapshot.instruction_tokens, lengths)


@pytest.mark.parametrize("preset", PRESETS)
def test_counts_equal_a_recount_of_the_saved_continuation(preset, tmp_path):
    model, tokenizer = exact_model(preset)
    records = per_category(2)
    snapshot = sparcom.record(
        model,
        tokenizer,
        records,
        token_scope="generated",
        max_new_tokens=NEW_TOKENS,
        batch_size=5,
        progress=False,
    )
    saved = Snapshot.load(snapshot.save(tmp_path / "generated.safetensors"))
    assert saved.generated == snapshot.generated
    assert saved.meta["max_new_tokens"] == NEW_TOKENS

    # The independent path: prompt + saved continuation, one unpadded forward each, with an explicit
    # mask on the continuation, recounted from the module weights by tests/reference.py.
    sequences = []
    for record in records:
        prompt = encode(record, tokenizer).needed_for("prompt").input_ids
        continuation = torch.tensor(saved.generated[record["id"]], dtype=torch.long)
        counted = torch.cat(
            [torch.zeros(len(prompt), dtype=torch.bool), torch.ones(len(continuation), dtype=torch.bool)]
        )
        sequences.append((torch.cat([prompt, continuation]), counted))
    architecture = ARCHITECTURES[model.config.model_type]
    reference = Reference(
        model, tokenizer, records, None, architecture.dense_mlp, architecture.moe_block, sequences=sequences
    )
    with torch.no_grad():
        for ids, _ in sequences:
            model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None])
    reference.remove()
    expected = reference.counts()
    assert set(expected) == set(saved.instruction_counts)
    for site, counts in expected.items():
        assert torch.equal(saved.instruction_counts[site].long(), counts), site
    assert any(int(c.sum()) > 0 for c in expected.values())


def test_continuations_are_readable_beside_the_snapshot_and_compare_across_models(tmp_path):
    records = per_category(2)
    snapshots = []
    for seed in (0, 1):  # two models of one architecture: each says something else
        model, tokenizer = exact_model("tiny-llama", seed=seed)
        snapshots.append(
            sparcom.record(
                model, tokenizer, records, token_scope="generated", max_new_tokens=6, progress=False
            )
        )
    base, tuned = snapshots
    assert base.generated != tuned.generated
    path = base.save(tmp_path / "base.safetensors")
    lines = [json.loads(line) for line in generated_path(path).read_text().splitlines()]
    assert [line["instruction_id"] for line in lines] == [r["id"] for r in records]
    for line in lines:
        assert line["text"] == tokenizer.decode(base.generated[line["instruction_id"]])
        assert line["tokens"] == len(base.generated[line["instruction_id"]])

    check_comparable(base, tuned)  # same prompts, same scope: accepted
    page = write_comparison(
        tmp_path / "compare",
        base,
        tuned,
        ("base", "tuned"),
        records=records,
        tokenizer=tokenizer,
        epsilons=[0.5],
        selection_mode="threshold",
        overlap_epsilon=0.5,
        sweep_epsilons=[0.3, 0.5],
        statistics=None,
    )
    assert "each model counted on its own greedy continuation, so the tokens differ" in page.read_text()

    longer = Snapshot(**{**vars(tuned), "meta": {**tuned.meta, "max_new_tokens": 7}})
    with pytest.raises(SnapshotError, match=r"different max_new_tokens \(base: 6, tuned: 7\)"):
        check_comparable(base, longer)
    prompt = sparcom.record(model, tokenizer, records, progress=False)
    with pytest.raises(SnapshotError, match="different token scope"):
        check_comparable(base, prompt)


def test_bad_generation_settings_fail_before_any_work():
    model, tokenizer = exact_model("tiny-llama")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        sparcom.record(model, tokenizer, per_category(1), token_scope="generated", max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown token_scope 'spoken'.*'generated'"):
        sparcom.record(model, tokenizer, per_category(1), token_scope="spoken")
