"""Run under torchrun: ISN-only SFT of the tiny MoE with DeepSpeed ZeRO-2 on CPU, recording drift.

argv: the ISN mask file, the run folder."""

import sys
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

from callbacks import SparcomCallback
from sparcom.models.loading import load_model
from sparcom.train.isn_training import isn_only
from sparcom.train.sft import sft_dataset

from helpers.models import per_category

ZERO2 = {
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
}

if __name__ == "__main__":
    mask, run = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    model, tokenizer = load_model("tiny-qwen2-moe")
    args = SFTConfig(
        output_dir=str(run),
        deepspeed=ZERO2,
        use_cpu=True,
        bf16=False,
        max_steps=3,
        save_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        logging_steps=1,
        max_length=128,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    setup = isn_only(model, mask, run)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(per_category(2), tokenizer, 128),
        processing_class=tokenizer,
        callbacks=[SparcomCallback(tokenizer, per_category(1))],
    )
    trainer.train()
    if trainer.is_world_process_zero():
        print(setup)
