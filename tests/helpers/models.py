"""Models and data the tests share: HexaInst slices, float64 tiny models for exact comparisons,
the torchrun command prefix, and a plain transformers Trainer around the callback."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sparcom.data import CATEGORIES, load_records
from sparcom.models.loading import load_model


def per_category(count: int) -> list[dict]:
    """The first ``count`` records of each category, in category order."""
    records = load_records()
    return [r for c in CATEGORIES for r in [r for r in records if r["category"] == c][:count]]


def exact_model(preset: str, **overrides):
    """A tiny preset in float64 with eager experts: kernel rounding can no longer flip a gate's sign,
    so counts from different batchings must agree exactly."""
    model, tokenizer = load_model(preset, **overrides)
    model = model.to(torch.float64)
    if hasattr(model, "set_experts_implementation") and model._can_set_experts_implementation():
        model.set_experts_implementation("eager")
    return model, tokenizer


def torchrun(processes: int = 2) -> list[str]:
    """The command prefix that starts ``processes`` ranks on this host, as a user launches them."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def plain_trainer(model, tokenizer, folder: Path, max_steps: int, save_steps: int):
    """A plain transformers Trainer (not TRL's) on a few HexaInst conversations, on CPU, as a user
    would write one around the callback."""
    from transformers import Trainer, TrainingArguments

    from sparcom.train.sft import collate_sft, sft_dataset

    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=max_steps,
        save_steps=save_steps,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        remove_unused_columns=False,
    )
    dataset = sft_dataset(per_category(4), tokenizer, 256)
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate_sft)
