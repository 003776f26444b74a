"""Fine-tune a model with TRL SFT on HexaInst while recording its ISN/ISE drift.

python train.py                                    # tiny MoE, offline, CPU
python train.py model=olmoe-1b-7b trainer=lora logger=online
python train.py -m trainer.args.learning_rate=1e-5,3e-5        # a sweep, grouped in W&B
torchrun --nproc_per_node 2 train.py deepspeed=zero3           # several processes

In Python: ``train(cfg, run_dir)`` with ``cfg`` a ``sparcom.config.TrainConfig``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from sparcom import cli
from sparcom.config import TrainConfig
from sparcom.config.checks import check, check_data, check_models_loadable, to_object
from sparcom.train.run_folder import (
    Interrupted,
    check_resume,
    check_run_dir,
    latest_checkpoint,
    record_resume,
)
from sparcom.train.sft import (
    Launch,
    finish_wandb,
    log_settings,
    resumable,
    run_records,
    sft_dataset,
    start_wandb,
    summarise_wandb,
)

if TYPE_CHECKING:
    from sparcom.train.drift import RunResult


def train(cfg: TrainConfig, run_dir: Path, launch: Launch | None = None) -> RunResult | None:
    """Fine-tune ``cfg.model`` with TRL SFT, recording snapshots into ``run_dir/snapshots`` and
    logging drift beside the loss in W&B. Every rank of a job calls it; the main rank returns the
    run's ``RunResult`` (its folder, last drift and held-out loss; ``.objective(name)`` for a
    sweeper), the others None.

    With ``cfg.resume`` the run in ``run_dir`` continues: ``cfg`` must be the run's own config
    (``config.yaml``), but for a larger ``max_steps`` or ``num_train_epochs``, which is recorded in
    ``resumes.jsonl``; the probe set must be the one its step-0 snapshot was recorded on; it logs to
    the same W&B run. Ctrl-C raises ``Interrupted`` (a ``KeyboardInterrupt``) saying where the run
    stopped and how to resume it."""
    check(cfg)  # what to_object checked, for a config built in Python
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        check_run_dir(run_dir, cfg.resume)
    changes = check_resume(cfg, run_dir) if cfg.resume else {}
    records = check_data(cfg)
    check_models_loadable(cfg)
    data, s = cfg.data, cfg.sparcom
    records, held_out, probe = run_records(
        records, data.held_out, data.split_seed, s.probe_split, s.probe.per_category, s.probe.seed
    )

    from callbacks import SparcomCallback  # only now: every input is checked; torch takes seconds
    from sparcom.snapshot import check_continues
    from sparcom.train.drift import run_result

    resume = latest_checkpoint(run_dir) if cfg.resume is True else cfg.resume or None
    if cfg.resume:  # drift is only drift against a base recorded on the same probe set
        check_continues(run_dir / "snapshots", probe, cfg.sparcom.token_scope, cfg.sparcom.max_new_tokens)
    share_cores()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            record_resume(run_dir, resume, changes)
        else:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    wandb_running = rank == 0 and start_wandb(cfg, run_dir, launch)
    trainer = None
    try:
        trainer = sft_trainer(cfg, run_dir, records, held_out, probe, wandb_running, rank)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except KeyboardInterrupt:
        for callback in trainer.callback_handler.callbacks if trainer else []:
            if isinstance(callback, SparcomCallback):
                callback.close()  # figures still being drawn are logged before the W&B run ends
        finish_wandb(interrupted=True)
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()  # now, not at exit: the message below stays the last line
        step = trainer.state.global_step if trainer else 0
        raise Interrupted(run_dir, step, cfg.trainer.args.max_steps) from None
    result = run_result(run_dir) if rank == 0 else None
    if result is not None and wandb_running:
        summarise_wandb(result)
    finish_wandb()  # the next job of a sweep runs in this process and must start its own W&B run
    return result


def sft_trainer(cfg: TrainConfig, run_dir: Path, records, held_out, probe, wandb_running: bool, rank: int):
    """The SFT trainer of a run: the model, TRL's SFTConfig from ``trainer.args``, LoRA or ISN-only
    training, and the W&B and SPARCOM callbacks. ``records`` are trained on; ``held_out`` are the
    instructions never trained on (the held-out loss, and TRL's own eval when eval_strategy asks)."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from callbacks import ResilientWandbCallback, SparcomCallback
    from sparcom.models.loading import load_model

    model, tokenizer = load_model(
        cfg.model.name_or_path, cfg.model.dtype, cfg.model.chat_template_from, seed=cfg.seed
    )
    # Only what differs from TRL's defaults, so that SFTConfig derives the rest itself and
    # deprecated fields left alone raise no warnings.
    defaults = vars(type(cfg.trainer.args)())
    sft_args = {k: v for k, v in vars(cfg.trainer.args).items() if v != defaults[k]}
    if not torch.cuda.is_available():
        # Accelerate sizes a CPU job (gloo, one entry per rank) only when told it is on CPU.
        sft_args["use_cpu"] = True
    if sft_args.get("bf16") is None:  # TRL's default turns bf16 on, which CPUs refuse
        sft_args["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = SFTConfig(
        **sft_args,
        output_dir=str(run_dir),
        report_to=[],  # W&B goes through ResilientWandbCallback, so a W&B failure cannot stop training
        deepspeed=cfg.deepspeed.config,
        seed=cfg.seed,
        run_name=cfg.logger.name or run_dir.name,
    )
    base = None
    if cfg.trainer.isn is not None:  # train the base model's ISNs only
        base = isn_setup(cfg, model, tokenizer, probe, run_dir, rank)
    peft_config = None
    if cfg.trainer.peft is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **vars(cfg.trainer.peft))
    # resumable: resuming loads every weight of the checkpoint, MoE experts included
    return resumable(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=sft_dataset(records, tokenizer, cfg.data.max_length),
        eval_dataset=sft_dataset(held_out, tokenizer, cfg.data.max_length) if held_out else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[
            *([ResilientWandbCallback()] if wandb_running else []),
            SparcomCallback(
                tokenizer,
                probe,
                cfg.sparcom,
                cfg.stats,
                held_out=held_out,
                max_length=cfg.data.max_length,
                snapshot_dir=run_dir / "snapshots",
                base=base,
            ),
        ],
    )


def share_cores() -> None:
    """Several processes on one machine (torchrun, accelerate launch) each start as many threads as
    there are cores; oversubscribed, they stall each other (greedy generation most of all). Give each
    its share, unless OMP_NUM_THREADS says otherwise."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def isn_setup(cfg: TrainConfig, model, tokenizer, probe, run_dir: Path, rank: int):
    """Parametrize ``model`` to train only the ISNs its recording of the probe set selects (on
    resume: the mask the run saved); returns that recording, the run's step-0 snapshot (None on resume)."""
    from sparcom.recording.probe import Recording, record
    from sparcom.train.isn_training import MASK_FILE, isn_only

    isn = cfg.trainer.isn
    snapshot = None
    if cfg.resume:  # the mask the run chose at its start (every rank takes the same branch)
        selection = run_dir / MASK_FILE
    else:
        snapshot = record(model, tokenizer, probe, Recording.of(cfg.sparcom), progress=rank == 0, step=0)
        selection = snapshot
    setup = isn_only(model, selection, run_dir if rank == 0 else None, isn)
    if rank == 0:
        print(setup)
        log_settings(
            {
                "isn": {
                    "trains": "random neurons matched to the ISNs" if isn.control == "random" else "the ISNs",
                    "neurons": setup.neurons,
                    "trainable_parameters": setup.trainable,
                    "total_parameters": setup.total,
                }
            }
        )
    return snapshot


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@cli.exits_on_bad_input
def main(cfg: DictConfig) -> float | None:
    """The run; returns the number ``objective`` names (default the mean held-out loss), which
    Hydra's sweepers (Optuna, Nevergrad, Ax) optimise."""
    typed = to_object(cfg)
    result = train(typed, cli.run_dir(), cli.launch())
    if result is None:
        return None
    print(f"run folder: {result.run_dir}  (config.yaml, checkpoint-*/, snapshots/, wandb/)")
    try:
        value = result.objective(typed.objective)
    except KeyError:  # the held-out loss of a run with data.held_out=0
        print(f"objective {typed.objective}: not measured by this run (data.held_out={typed.data.held_out})")
        return None
    print(f"objective {typed.objective} = {value:.4f}")
    return value


if __name__ == "__main__":
    cli.prepare("train")  # every job's config is checked before Hydra creates a run folder
    main()
