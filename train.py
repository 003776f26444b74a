"""Fine-tune a model with TRL SFT on HexaInst while recording its ISN/ISE drift.

python train.py                                    # tiny MoE, offline, CPU
python train.py model=olmoe-1b-7b trainer=lora logger=online
python train.py -m trainer.args.learning_rate=1e-5,3e-5        # a sweep, grouped in W&B
torchrun --nproc_per_node 2 train.py deepspeed=zero3           # several processes
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sparcom.config_check import ConfigError, exit_on_bad_input
from sparcom.training import sft_defaults


def run_stamp() -> str:
    """One folder name per launch, the same on every rank of a job.

    Ranks started by torchrun (or accelerate launch) share one parent, the elastic agent, so its
    start time names the run; a single process uses its own start time.
    """
    if "SPARCOM_RUN_STAMP" in os.environ:
        return os.environ["SPARCOM_RUN_STAMP"]
    started = time.time()
    if "LOCAL_RANK" in os.environ:
        with open(f"/proc/{os.getppid()}/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as boot:
            booted = next(int(line.split()[1]) for line in boot if line.startswith("btime"))
        started = booted + ticks / os.sysconf("SC_CLK_TCK")
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@exit_on_bad_input
def main(cfg: DictConfig) -> None:
    import torch
    from trl import SFTConfig, SFTTrainer

    from callbacks import ResilientWandbCallback, SparcomCallback
    from sparcom.config_check import check_probe_fits, check_train
    from sparcom.data import load_records
    from sparcom.models import load_model
    from sparcom.training import configure_wandb, finish_wandb, latest_checkpoint, probe_set, sft_dataset

    check_train(cfg)  # every config mistake surfaces here, before data or a model loads
    records = load_records(cfg.data.path, tuple(cfg.data.categories))
    check_probe_fits(records, cfg.sparcom.probe.per_category)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    group = cfg.logger.group or (Path(hydra_cfg.sweep.dir).name if sweep else None)
    mode = configure_wandb(
        cfg.logger.mode, cfg.logger.project, run_dir, group, cfg.logger.name, cfg.logger.entity
    )

    probe = probe_set(records, cfg.sparcom.probe.per_category, cfg.sparcom.probe.seed)
    model, tokenizer = load_model(
        cfg.model.name_or_path, cfg.model.dtype, cfg.model.chat_template_from, seed=cfg.seed
    )
    sft_args = OmegaConf.to_container(cfg.trainer.args, resolve=True)
    if not torch.cuda.is_available():
        # Accelerate sizes a CPU job (gloo, one entry per rank) only when told it is on CPU.
        sft_args["use_cpu"] = True
    if sft_args["bf16"] is None:  # TRL's default turns bf16 on, which CPUs refuse
        sft_args["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = SFTConfig(
        **sft_args,
        output_dir=str(run_dir),
        report_to=[],  # W&B goes through ResilientWandbCallback below, so a W&B failure cannot stop training
        deepspeed=OmegaConf.to_container(cfg.deepspeed.config, resolve=True)
        if cfg.deepspeed.config
        else None,
        seed=cfg.seed,
        run_name=cfg.logger.name or run_dir.name,
    )
    peft_config = None
    if cfg.trainer.peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="CAUSAL_LM", **OmegaConf.to_container(cfg.trainer.peft, resolve=True)
        )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(records, tokenizer, cfg.data.max_length),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[
            *([] if mode == "disabled" else [ResilientWandbCallback()]),
            SparcomCallback(
                tokenizer,
                probe,
                epsilons=list(cfg.sparcom.epsilons),
                selection_mode=cfg.sparcom.selection_mode,
                token_scope=cfg.sparcom.token_scope,
                batch_size=cfg.sparcom.probe.batch_size,
                per_instruction=cfg.sparcom.per_instruction,
                snapshot_dir=run_dir / "snapshots",
                on_save=cfg.sparcom.record.on_save,
                every_steps=cfg.sparcom.record.every_steps,
            ),
        ],
    )
    resume = cfg.resume
    if resume is True:  # the newest checkpoint that was written to the end
        resume = latest_checkpoint(run_dir)
        if resume is None:
            raise ConfigError(f"resume: true, but {run_dir} holds no complete checkpoint-* folder")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finish_wandb()  # the next job of a sweep runs in this process and must start its own W&B run
    if rank == 0:
        print(f"run folder: {run_dir}  (config.yaml, checkpoint-*/, snapshots/, wandb/)")


if __name__ == "__main__":
    os.environ["SPARCOM_RUN_STAMP"] = run_stamp()
    ConfigStore.instance().store(name="sft_args", node=sft_defaults())
    main()
