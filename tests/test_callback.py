"""SparcomCallback in a user's own transformers Trainer (no train.py, no TRL, no Hydra)."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from callbacks import SparcomCallback
from sparcom.models import load_model
from sparcom.snapshot import snapshot_series
from sparcom.training import sft_dataset

from conftest import per_category


def collate(rows):
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100)
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        attention[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(r["completion_mask"]).bool(), ids[i, :n], -100)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


@pytest.mark.slow
def test_callback_in_a_plain_trainer(tmp_path):
    model, tokenizer = load_model("tiny-olmoe")
    model.gradient_checkpointing_enable()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, logging_steps=1, remove_unused_columns=False)  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(per_category(4), tokenizer, 256),
        data_collator=collate,
    )
    callback = SparcomCallback(tokenizer, per_category(2), epsilons=[0.5], log_figures=False)
    trainer.add_callback(callback)
    trainer.train()
    assert sorted(snapshot_series(tmp_path / "snapshots")) == [0, 2, 4]
    assert model.training and model.is_gradient_checkpointing  # restored after every probe
    assert all(not m._forward_pre_hooks for m in model.modules())  # no hook left attached


def test_bad_callback_settings_fail_at_construction():
    _, tokenizer = load_model("tiny-llama")
    with pytest.raises(ValueError, match=r"epsilon must be in \(0, 1\], got 0"):
        SparcomCallback(tokenizer, [], epsilons=[0])
    with pytest.raises(ValueError, match="unknown selection mode 'top'"):
        SparcomCallback(tokenizer, [], selection_mode="top")
