"""The generated token scope: each model counted on its own greedy continuation of every prompt.

The continuation is checked against ``model.generate`` run one prompt at a time without padding,
and the counts against an independent recount of prompt + continuation from the model's weights."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import sparcom
from callbacks import SparcomCallback
from sparcom.config import ProbeConfig, TrainSparcomConfig
from sparcom.data import load_records
from sparcom.models.loading import load_model
from sparcom.models.sites import ARCHITECTURES
from sparcom.recording.conversation import encode
from sparcom.recording.probe import Recording
from sparcom.report.workflows import write_comparison
from sparcom.snapshot import Snapshot, SnapshotError, check_comparable, generated_path, snapshot_series
from sparcom.stats.comparison import Selection

from helpers.models import exact_model, per_category, plain_trainer, torchrun
from helpers.reference import Reference

ROOT = Path(__file__).resolve().parents[1]
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
        Recording(token_scope="generated", max_new_tokens=NEW_TOKENS, batch_size=4),
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
        Recording(token_scope="generated", max_new_tokens=NEW_TOKENS, batch_size=5),
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
                model,
                tokenizer,
                records,
                Recording(token_scope="generated", max_new_tokens=6),
                progress=False,
            )
        )
    base, tuned = snapshots
    assert base.generated != tuned.generated
    path = base.save(tmp_path / "base.safetensors")
    lines = [json.loads(line) for line in generated_path(path).read_text().splitlines()]
    assert [line["instruction_id"] for line in lines] == [r["id"] for r in records]
    for line in lines:
        assert line["text"] == tokenizer.decode(base.generated[line["instruction_id"]])
        assert line["token_ids"] == list(base.generated[line["instruction_id"]])
        assert line["num_tokens"] == len(line["token_ids"])

    check_comparable(base, tuned)  # same prompts, same scope: accepted
    page = write_comparison(
        tmp_path / "compare",
        base,
        tuned,
        records=records,
        selection=Selection(epsilons=(0.5,), sweep_epsilons=(0.3, 0.5)),
        statistics=None,
    )
    assert "each model counted on its own greedy continuation, so the tokens differ" in page.read_text()

    longer = Snapshot(**{**vars(tuned), "meta": {**tuned.meta, "max_new_tokens": 7}})
    with pytest.raises(SnapshotError, match=r"different max_new_tokens \(base: 6, tuned: 7\)"):
        check_comparable(base, longer)
    prompt = sparcom.record(model, tokenizer, records, progress=False)
    with pytest.raises(SnapshotError, match="different token scope"):
        check_comparable(base, prompt)


def test_an_moe_set_up_for_training_generates_the_same():
    """TRL turns on the router's load-balancing loss for MoE training; a batched, cached generation
    step must not compute it (its router logits cover one token, the attention mask all of them)."""
    model, tokenizer = exact_model("tiny-qwen2-moe")
    records = per_category(1)
    plain = sparcom.record(
        model, tokenizer, records, Recording(token_scope="generated", max_new_tokens=5, batch_size=4)
    )
    model.config.output_router_logits = True
    training = sparcom.record(
        model, tokenizer, records, Recording(token_scope="generated", max_new_tokens=5, batch_size=4)
    )
    assert training.generated == plain.generated


def test_bad_generation_settings_fail_before_any_work():
    model, tokenizer = exact_model("tiny-llama")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        sparcom.record(
            model, tokenizer, per_category(1), Recording(token_scope="generated", max_new_tokens=0)
        )
    with pytest.raises(ValueError, match="unknown token_scope 'spoken'.*'generated'"):
        sparcom.record(model, tokenizer, per_category(1), Recording(token_scope="spoken"))


@pytest.mark.slow
def test_callback_counts_each_checkpoints_own_words_and_restores_the_model(tmp_path):
    model, tokenizer = load_model("tiny-olmoe")
    model.gradient_checkpointing_enable()
    model.config.output_router_logits = True  # as TRL trains MoE models: the router's loss is added
    trainer = plain_trainer(model, tokenizer, tmp_path, max_steps=2, save_steps=2)
    probe = per_category(1)
    # One prompt per batch: the reference below generates unpadded, and float32 sums of padded
    # batches may round differently.
    settings = TrainSparcomConfig(token_scope="generated", max_new_tokens=6, probe=ProbeConfig(batch_size=1))
    callback = SparcomCallback(tokenizer, probe, settings)
    callback.draw_figures = False
    trainer.add_callback(callback)
    trainer.train()
    assert model.training and model.is_gradient_checkpointing  # restored after every probe
    assert all(not m._forward_pre_hooks for m in model.modules())  # no hook left attached

    series = snapshot_series(tmp_path / "snapshots")
    assert sorted(series) == [0, 2]
    final = Snapshot.load(series[2])
    assert final.meta["token_scope"] == "generated" and generated_path(series[2]).is_file()
    checkpoint, _ = load_model(str(tmp_path / "checkpoint-2"))  # the weights the step-2 snapshot saw
    for record in probe:
        assert final.generated[record["id"]] == _greedy_one_at_a_time(checkpoint, tokenizer, record, 6)
    assert sum(len(ids) for ids in final.generated.values()) == sum(final.tokens.values())


@pytest.mark.slow
def test_zero3_ranks_generate_in_step_and_record_what_one_process_records(tmp_path):
    """train.py under DeepSpeed ZeRO-3 on two ranks: every generation step is a collective forward."""
    run_dir = tmp_path / "run"
    command = [
        *torchrun(),
        str(ROOT / "train.py"),
        "experiment=smoke",
        f"hydra.run.dir={run_dir}",
        "deepspeed=zero3",
        "logger=disabled",
        "sparcom.token_scope=generated",
        "sparcom.max_new_tokens=6",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SPARCOM_RUN_STAMP", None)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    series = snapshot_series(run_dir / "snapshots")
    assert sorted(series) == [0, 3, 6]
    model, tokenizer = load_model(str(run_dir / "checkpoint-6"))
    torch.set_num_threads(1)  # as each torchrun rank ran
    by_id = {r["id"]: r for r in load_records()}
    single = sparcom.record(
        model,
        tokenizer,
        [by_id[i] for i in Snapshot.load(series[6]).instruction_ids],
        Recording(token_scope="generated", max_new_tokens=6),
        progress=False,
    )
    distributed = Snapshot.load(series[6])
    assert distributed.generated == single.generated
    for site in single.category_counts:
        assert torch.equal(
            distributed.instruction_counts[site].long(), single.instruction_counts[site].long()
        ), site


def test_analyze_records_with_the_configured_continuation_length():
    """analyze.py's sparcom.max_new_tokens reaches the recording of a model given by name."""
    from analyze import recorded
    from sparcom.cli import compose

    cfg = compose(
        "analyze",
        ["base=tiny-llama", "tuned=tiny-llama", "sparcom.token_scope=generated", "sparcom.max_new_tokens=3"],
    )
    cfg.sparcom.probe.per_category = 1
    snapshot = recorded(cfg, {"name_or_path": "tiny-llama"}, load_records())
    assert snapshot.meta["max_new_tokens"] == 3
    assert max(len(ids) for ids in snapshot.generated.values()) == 3
