"""ISN-only fine-tuning: after real training runs (TRL SFTTrainer with the drift callback and a W&B
offline run; DeepSpeed ZeRO-2 in two processes), every parameter outside the ISN mask equals the
base model's byte for byte and every entry inside it moved; checkpoints load as ordinary models."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from trl import SFTConfig, SFTTrainer

import sparcom
from callbacks import ResilientWandbCallback, SparcomCallback
from sparcom.config import IsnTrainingConfig, TrainSparcomConfig
from sparcom.edit.intervention import intervene, neuron_sites
from sparcom.models.loading import load_model
from sparcom.snapshot import Snapshot, snapshot_series
from sparcom.train.isn_training import (
    MASK_FILE,
    check_isn_settings,
    isn_only,
    load_mask,
    lora_rank_matching,
    merge,
    save_mask,
    select_isns,
)
from sparcom.train.sft import finish_wandb, sft_dataset

from helpers.isn_masks import assert_only_isns_moved, byte_equal, random_mask, weights
from helpers.models import per_category, torchrun
from helpers.wandb_log import history, run_file

HERE = Path(__file__).parent


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-phi3", "tiny-olmoe", "tiny-deepseek-v3"])
def test_parametrized_model_is_the_base_model_until_trained(preset):
    """Set up, the model computes exactly what the base model computes and shows the base's state
    dict; it trains 3 x hidden parameters per neuron; one optimizer step with weight decay moves
    every chosen entry and nothing else; the state dict loads back into a freshly set-up model."""
    model, tokenizer = load_model(preset)
    base = weights(model)
    parameters = sum(p.numel() for p in model.parameters())
    ids = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    mask = random_mask(model, 0.2, seed=1)
    setup = isn_only(model, mask)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    assert (
        all(byte_equal(weights(model)[k], v) for k, v in base.items())
        and weights(model).keys() == base.keys()
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert (
        setup.trainable == 3 * model.config.hidden_size * setup.neurons == sum(p.numel() for p in trainable)
    )
    assert setup.total == parameters
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.5)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    trained = weights(model)
    assert_only_isns_moved(base, trained, mask)
    fresh, _ = load_model(preset)
    isn_only(fresh, mask)
    fresh.load_state_dict(trained)
    assert all(byte_equal(weights(fresh)[k], v) for k, v in trained.items())
    with pytest.raises(ValueError, match="parametrized .*merge"), intervene(fresh, mask, 0.0):
        pass
    merge(fresh)
    assert not any(name for name, _ in fresh.named_parameters() if "parametrizations" in name)
    assert all(byte_equal(weights(fresh)[k], v) for k, v in trained.items())
    assert all(p.requires_grad for p in fresh.parameters())


@pytest.mark.slow
def test_isn_only_sft_with_the_drift_callback_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "sparcom-tests")
    model, tokenizer = load_model("tiny-qwen2-moe")
    base = weights(model)
    probe = per_category(2)
    base_snapshot = sparcom.record(model, tokenizer, probe, progress=False)
    setup = isn_only(model, base_snapshot, tmp_path, IsnTrainingConfig(epsilon=0.5))
    expected_mask = select_isns(base_snapshot, 0.5)
    saved = load_mask(tmp_path / MASK_FILE)
    assert saved.keys() == neuron_sites(model).keys() == expected_mask.keys()
    assert all(torch.equal(saved[s], expected_mask[s]) for s in saved)
    assert setup.trainable == 3 * model.config.hidden_size * setup.neurons > 0
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        save_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        optim="adamw_torch",
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        max_length=128,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks = [
        ResilientWandbCallback(),
        SparcomCallback(tokenizer, probe, TrainSparcomConfig(epsilons=[0.5])),
    ]
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(per_category(4), tokenizer, 128),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train()
    finish_wandb()

    tuned, _ = load_model(str(tmp_path / "checkpoint-3"))  # an ordinary model, as analyze.py loads it
    after = weights(tuned)
    assert_only_isns_moved(base, after, setup.mask)
    merge(model)
    assert all(byte_equal(weights(model)[k], v) for k, v in after.items())

    series = snapshot_series(tmp_path / "snapshots")
    assert sorted(series) == [0, 3]
    for step, reference in ((0, base_snapshot), (3, sparcom.record(tuned, tokenizer, probe, progress=False))):
        recorded = Snapshot.load(series[step])  # what the callback saw during training
        assert all(
            torch.equal(recorded.instruction_counts[s], c) for s, c in reference.instruction_counts.items()
        )
    assert any(
        not torch.equal(Snapshot.load(series[3]).instruction_counts[s], c)
        for s, c in base_snapshot.instruction_counts.items()
    )
    rows = history(run_file(tmp_path / "wandb"))
    assert {r["train/global_step"] for r in rows if "train/loss" in r} == {1, 2, 3}
    assert {r["train/global_step"] for r in rows if "sparcom/isn_jaccard/base/eps=0.5/mean" in r} == {0, 3}


@pytest.mark.slow
def test_isn_only_sft_under_deepspeed_zero2_in_two_processes(tmp_path):
    model, tokenizer = load_model("tiny-qwen2-moe")
    base = weights(model)
    mask = select_isns(sparcom.record(model, tokenizer, per_category(2), progress=False), 0.5)
    save_mask(mask, tmp_path / "mask.safetensors")
    run = tmp_path / "run"
    command = [
        *torchrun(),
        str(HERE / "isn_zero2.py"),
        str(tmp_path / "mask.safetensors"),
        str(run),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=500, cwd=HERE, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "ISN-only training:" in done.stdout
    assert all(torch.equal(load_mask(run / MASK_FILE)[s], mask[s]) for s in mask)
    tuned, _ = load_model(str(run / "checkpoint-3"))
    assert_only_isns_moved(base, weights(tuned), mask)
    torch.set_num_threads(1)  # as each rank ran
    single = sparcom.record(tuned, tokenizer, per_category(1), progress=False)
    recorded = Snapshot.load(snapshot_series(run / "snapshots")[3])
    assert all(torch.equal(recorded.instruction_counts[s], c) for s, c in single.instruction_counts.items())


def test_bad_isn_settings_are_refused_in_one_line(tmp_path):
    cases = [
        (dict(epsilon=0.0), r"epsilon: 0.0 is not a valid epsilon; expected a number in \(0, 1\]"),
        (dict(selection_mode="top"), "unknown selection mode 'top'"),
        (dict(categories=["maths"]), r"ISN categories \['maths'\] are unknown; expected some of"),
        (dict(categories=[]), r"categories: \[\] is empty; expected null \(all six\)"),
        (
            dict(deepspeed={"zero_optimization": {"stage": 3}}),
            "ZeRO-3 is not supported with trainer=isn.*zero2",
        ),
        (dict(peft={"r": 16}), "LoRA cannot be combined with trainer=isn"),
    ]
    for change, message in cases:
        settings = dict(epsilon=0.5, categories=None, selection_mode="threshold") | change
        with pytest.raises(ValueError, match=message):
            check_isn_settings(**settings)
    check_isn_settings(0.5, ["math"], "percentile_layer", {"zero_optimization": {"stage": 2}})

    model, _ = load_model("tiny-llama")
    nothing = {s: torch.zeros(shape, dtype=torch.bool) for s, (_, shape) in neuron_sites(model).items()}
    with pytest.raises(ValueError, match="selects no neuron"):
        isn_only(model, nothing)
    save_mask(random_mask(model, 0.1, seed=0), tmp_path / MASK_FILE)
    with pytest.raises(ValueError, match="holds a different ISN mask"):
        isn_only(model, random_mask(model, 0.1, seed=1), tmp_path)
    assert not any(p.requires_grad is False for p in model.parameters())  # refused before any change

    from transformers.integrations import HfDeepSpeedConfig

    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        with pytest.raises(ValueError, match="ZeRO-3"):
            isn_only(model, random_mask(model, 0.1, seed=0))
    finally:
        del zero3


@pytest.mark.parametrize("targets", ["all-linear", ["gate_proj", "up_proj", "down_proj"]])
def test_the_matched_lora_rank_trains_about_as_many_parameters(targets):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model("tiny-llama")
    wanted = 3 * model.config.hidden_size * 150  # 150 ISNs
    rank = lora_rank_matching(model, wanted, targets)
    adapted = get_peft_model(model, LoraConfig(r=rank, target_modules=targets, task_type="CAUSAL_LM"))
    trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    per_rank = trained // rank
    assert abs(trained - wanted) <= per_rank / 2, (rank, trained, wanted)
