"""Resuming continues from the checkpoint: every weight (fused MoE experts and routers included, which
transformers 5 saves in the per-expert layout of the original checkpoints), the optimizer, the
scheduler and the data order. Real TRL training runs on tiny presets, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from sparcom.cli import compose
from sparcom.models.loading import load_model
from sparcom.train.isn_training import isn_only
from sparcom.train.sft import load_checkpoint_weights, resumable, sft_dataset
from train import train

from helpers.isn_masks import random_mask
from helpers.models import per_category


class WeightsAtResume(TrainerCallback):
    """Keeps a copy of the model's state dict (adapters only, for PEFT) as training resumes."""

    def __init__(self):
        self.state: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            return
        if hasattr(model, "peft_config"):
            from peft import get_peft_model_state_dict

            weights = get_peft_model_state_dict(model)
        else:
            weights = model.state_dict()
        self.state = {k: v.detach().clone() for k, v in weights.items()}


def sft(
    model,
    tokenizer,
    output_dir: Path,
    max_steps: int,
    callbacks=(),
    peft_config=None,
    eval_dataset=None,
    **settings,
) -> SFTTrainer:
    """The trainer train.py builds, on six records; ``settings``: SFTConfig fields to change."""
    settings = {"save_steps": 2, "learning_rate": 1e-2, **settings}
    args = SFTConfig(
        **settings,
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_checkpointing=False,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        max_length=64,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return resumable(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=sft_dataset(per_category(1), tokenizer, 64),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks),
    )


def fresh(preset: str, kind: str):
    """The base model as a run sets it up: ``kind`` is ``full``, ``isn`` (a seeded random mask) or
    ``lora`` (adapters are added by the trainer from the returned config)."""
    model, tokenizer = load_model(preset)
    if hasattr(model, "set_experts_implementation"):  # grouped_mm is slow on CPU; the layout is the same
        model.set_experts_implementation("eager")
    if kind == "isn":
        isn_only(model, random_mask(model, 0.3, seed=1))
    peft_config = None
    if kind == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")
    return model, tokenizer, peft_config


@pytest.mark.slow
@pytest.mark.parametrize(
    ("preset", "kind"),
    [
        ("tiny-llama", "full"),
        ("tiny-qwen2-moe", "full"),
        ("tiny-olmoe", "full"),
        ("tiny-mixtral", "full"),  # its routers are renamed on save too
        ("tiny-qwen2-moe", "isn"),
        ("tiny-qwen2-moe", "lora"),
    ],
)
def test_training_resumes_from_every_weight_of_the_checkpoint(tmp_path, preset, kind):
    model, tokenizer, peft_config = fresh(preset, kind)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sft(model, tokenizer, tmp_path, 2, peft_config=peft_config).train()
    checkpoint = tmp_path / "checkpoint-2"

    model, tokenizer, peft_config = fresh(preset, kind)
    seen = WeightsAtResume()
    sft(model, tokenizer, tmp_path, 3, [seen], peft_config).train(resume_from_checkpoint=str(checkpoint))
    if kind == "lora":
        saved = load_file(checkpoint / "adapter_model.safetensors")
        assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in saved.items() if "lora_B" in k)
    else:
        saved = load_model(str(checkpoint))[0].state_dict()  # the checkpoint as from_pretrained reads it
        moved = {k for k, v in saved.items() if not torch.equal(v, base[k])}
        # Resuming from the base weights would be caught: the experts (all of them) had moved.
        assert moved and {k for k in saved if ".experts." in k} <= moved
    assert seen.state is not None and seen.state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(seen.state[key], value), key


@pytest.mark.slow
def test_the_best_model_loaded_at_the_end_is_the_best_checkpoint_whole(tmp_path):
    model, tokenizer, _ = fresh("tiny-qwen2-moe", "full")
    trainer = sft(
        model,
        tokenizer,
        tmp_path,
        4,
        learning_rate=5e-2,  # large enough that the eval loss is not lowest at the last step
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        eval_dataset=sft_dataset(per_category(1)[:2], tokenizer, 64),
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-4"  # the last step's weights would not pass for the best's
    saved = load_model(str(best))[0].state_dict()
    weights = model.state_dict()
    assert weights.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(weights[key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "isn"])
def test_a_resumed_run_is_the_uninterrupted_run_bit_for_bit(tmp_path, kind):
    """2 steps, then resumed to 4, against 4 steps at once (a constant learning rate, so that the
    schedule does not depend on max_steps): the same losses and the same final weights exactly,
    which holds only if weights, Adam's moments, the scheduler and the data order all resumed."""
    common = [
        "experiment=smoke",
        "logger=disabled",
        f"trainer={kind}",
        "sparcom.probe.per_category=1",
        "trainer.args.save_steps=2",
        "trainer.args.lr_scheduler_type=constant",
    ]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    train(compose("train", [*common, "trainer.args.max_steps=2"]), resumed)
    train(compose("train", [*common, "trainer.args.max_steps=4", "resume=true"]), resumed)
    train(compose("train", [*common, "trainer.args.max_steps=4"]), straight)

    def losses(run: Path) -> dict[int, float]:
        history = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        return {row["step"]: row["loss"] for row in history if "loss" in row}

    assert losses(resumed) == losses(straight) and sorted(losses(straight)) == [1, 2, 3, 4]
    after_resume = load_model(str(resumed / "checkpoint-4"))[0].state_dict()
    after_straight = load_model(str(straight / "checkpoint-4"))[0].state_dict()
    assert after_resume.keys() == after_straight.keys()
    for key, value in after_straight.items():
        assert torch.equal(after_resume[key], value), key


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(tmp_path):
    model, _ = load_model("tiny-qwen2-moe")
    model.save_pretrained(tmp_path / "whole")
    # Another model: its checkpoint has other shapes.
    other, _ = load_model("tiny-qwen2-moe", num_experts=4)
    with pytest.raises(
        ValueError, match=r"^checkpoint '.*whole' does not fit the Qwen2MoeForCausalLM"
    ) as err:
        load_checkpoint_weights(other, tmp_path / "whole")
    assert "\n" not in str(err.value) and "experts" in str(err.value)
    # Checkpoints missing weights, which from_pretrained would initialise at random (with a warning)
    # or fail to convert (with a report on many lines).
    cases = {
        "model.layers.1.mlp.shared_expert.up_proj.weight": "missing_keys: model.layers.1.mlp.shared_expert.up_proj.weight",
        "model.layers.1.mlp.experts.3.up_proj.weight": "issues during automatic conversion of the weights",
    }
    for name, reason in cases.items():
        cut = tmp_path / name
        model.save_pretrained(cut)
        tensors = load_file(cut / "model.safetensors")
        del tensors[name]
        save_file(tensors, cut / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=f"^checkpoint '.*{name}' does not fit") as err:
            load_checkpoint_weights(model, cut)
        assert "\n" not in str(err.value) and reason in str(err.value)
