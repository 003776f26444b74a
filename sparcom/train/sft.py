"""The pieces train.py wires together: SFT data in the shared conversation format, the probe set,
the W&B run, the run folder and resuming from its checkpoints. Plain functions (no Hydra), and
torch-free to import."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import socket
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sparcom.data import CATEGORIES, Record

if TYPE_CHECKING:
    from torch import nn

    from sparcom.config import TrainConfig


@dataclasses.dataclass
class Launch:
    """What the command line said about a run, for its W&B record.

    Parameters:
        overrides: the command line's overrides, as given.
        choices: the config group options chosen (model preset, trainer kind, ...).
        group: the sweep this run belongs to (its W&B group), if any.
        name: the run's readable name, e.g. a sweep job's swept overrides.
    """

    overrides: list[str] = dataclasses.field(default_factory=list)
    choices: dict[str, str] = dataclasses.field(default_factory=dict)
    group: str | None = None
    name: str | None = None


def probe_set(records: Sequence[Record], per_category: int, seed: int = 0) -> list[Record]:
    """A seeded sample of ``per_category`` records of each category (all of them if fewer)."""
    rng = random.Random(seed)
    chosen = []
    for category in CATEGORIES:
        pool = [r for r in records if r["category"] == category]
        chosen += rng.sample(pool, min(per_category, len(pool)))
    return chosen


def split_records(
    records: Sequence[Record], held_out: int, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """``(train, held_out)``: ``held_out`` records of each category set aside, never trained on. The
    draw depends on the records' ids and the seed only, not on their order in the file."""
    rng = random.Random(seed)
    kept: set[str] = set()
    for category in CATEGORIES:
        ids = sorted(r["id"] for r in records if r["category"] == category)
        kept.update(rng.sample(ids, min(held_out, len(ids))))
    return [r for r in records if r["id"] not in kept], [r for r in records if r["id"] in kept]


def run_records(
    records: Sequence[Record],
    held_out: int,
    split_seed: int,
    probe_split: str,
    per_category: int,
    probe_seed: int,
) -> tuple[list[Record], list[Record], list[Record]]:
    """A training run's ``(train, held_out, probe)`` records: the split, and the probe set drawn from
    the part ``probe_split`` names (held_out, train or all)."""
    train, kept = split_records(records, held_out, split_seed)
    pool = {"held_out": kept, "train": train, "all": list(records)}[probe_split]
    return train, kept, probe_set(pool, per_category, probe_seed)


def sft_dataset(records: Sequence[Record], tokenizer, max_length: int | None):
    """Pre-tokenised SFT data: ``input_ids`` and ``completion_mask`` (the response tokens), from the
    same ``encode`` the probe uses, so training and probing see identical conversations."""
    from datasets import Dataset

    from sparcom.recording.conversation import encode

    encoded = [encode(r, tokenizer, max_length) for r in records]
    return Dataset.from_dict(
        {
            "input_ids": [e.input_ids.tolist() for e in encoded],
            "completion_mask": [e.response_mask.int().tolist() for e in encoded],
        }
    )


def collate_sft(rows: list[dict], pad_id: int = 0) -> dict:
    """Batch ``sft_dataset`` rows for a plain transformers ``Trainer``: right-padded ``[B, L]``
    ``input_ids`` and ``attention_mask``, and ``labels`` that score the response tokens only.
    (Give the Trainer ``remove_unused_columns=False``, or it drops ``completion_mask`` first.)"""
    import torch

    if rows and "completion_mask" not in rows[0]:
        raise KeyError(
            "rows have no 'completion_mask': pass remove_unused_columns=False to TrainingArguments"
        )
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        attention[i, :n] = 1
        labels[i, :n] = input_ids[i, :n].masked_fill(~torch.tensor(row["completion_mask"]).bool(), -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def wandb_mode(mode: str) -> str:
    """The W&B mode to use: ``online`` falls back to ``offline``, with a warning, when there is no
    API key or no network, so a run never fails for want of a login."""
    if mode == "online" and not _wandb_reachable():
        warnings.warn(
            "W&B: no API key or no network; logging offline (sync later with `wandb sync`)", stacklevel=2
        )
        return "offline"
    return mode


def wandb_settings(cfg: TrainConfig, run_dir: Path, launch: Launch | None = None) -> dict:
    """``wandb.init`` keyword arguments for a train.py run: project, entity, group, a readable name,
    tags (the model and the trainer kind) and the whole resolved config, with the DeepSpeed stage
    and the command line's overrides, so that runs can be grouped and filtered by any setting."""
    launch = launch or Launch()
    config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    deepspeed = cfg.deepspeed.config
    stage = deepspeed.get("zero_optimization", {}).get("stage") if isinstance(deepspeed, dict) else None
    model = launch.choices.get("model") or Path(str(cfg.model.name_or_path)).name
    trainer = launch.choices.get("trainer") or ("lora" if cfg.trainer.peft else "full")
    config |= {
        "deepspeed_stage": stage,
        "overrides": list(launch.overrides),
        "choices": dict(launch.choices),
        "run_dir": str(run_dir),
    }
    return {
        "project": cfg.logger.project,
        "entity": cfg.logger.entity,
        "group": cfg.logger.group or launch.group,
        "name": cfg.logger.name or launch.name or run_dir.name,
        "tags": [tag[:64] for tag in (*cfg.logger.tags, model, trainer)],  # W&B's limit
        "config": config,
    }


def start_wandb(cfg: TrainConfig, run_dir: Path, launch: Launch | None = None) -> bool:
    """Start this process's W&B run before the trainer (transformers' WandbCallback then reuses it);
    returns whether one is running. Every launch of a run, resumes included, logs to the one W&B run
    whose id the run folder keeps (offline, a resume writes a second file of the same run: sync the
    first, then ``wandb sync --append`` the next). A failure, ``wandb.init``'s included, is a warning,
    never an error."""
    mode = wandb_mode(str(cfg.logger.mode))
    if mode == "disabled":
        return False
    try:
        import wandb

        from sparcom.train.run_folder import wandb_run_id

        # W&B validates the environment's settings even where init's arguments override them.
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        wandb.init(
            mode=mode,
            dir=str(run_dir),
            id=wandb_run_id(run_dir),
            resume="allow",  # the first launch creates the run, a resume continues it
            **wandb_settings(cfg, run_dir, launch),
        )
    except Exception as err:  # noqa: BLE001 - W&B must never stop a run
        warnings.warn(
            f"W&B setup failed ({type(err).__name__}: {err}); training continues without W&B; "
            "snapshots are still saved",
            stacklevel=2,
        )
        return False
    return True


def summarise_wandb(result) -> None:
    """The run's W&B summary, which W&B Sweeps rank runs by: every number of the last snapshot
    (drift where it ended), and for the held-out losses the lowest reached (``drift.SUMMARIES``)."""
    try:
        import wandb

        from sparcom.train.drift import read_drift

        if wandb.run is None:
            return
        summary = result.numbers()
        for point in read_drift(result.run_dir / "snapshots" / "drift.jsonl"):
            for key, value in point.wandb_metrics().items():
                if key.startswith("eval/loss/") and value == value:
                    summary[key] = min(summary.get(key, value), value)
        wandb.run.summary.update({k: v for k, v in summary.items() if v == v})
    except Exception as err:  # noqa: BLE001 - W&B must never fail a finished run
        warnings.warn(f"W&B: could not write the run's summary ({err})", stacklevel=2)


def log_settings(values: dict) -> None:
    """Add settings found during the run (e.g. trainable parameters) to the W&B run's config."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.run.config.update(values, allow_val_change=True)
    except Exception as err:  # noqa: BLE001 - W&B must never stop a run
        warnings.warn(f"W&B: could not log {sorted(values)} ({err})", stacklevel=2)


def load_checkpoint_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Copy the weights of ``checkpoint`` (a folder written by ``save_pretrained``) into ``model`` in
    place, read as ``from_pretrained`` reads them, and refuse a checkpoint whose weights do not fit.

    transformers 5 saves fused MoE experts (``experts.gate_up_proj``, ``[E, 2 * d_expert, d]``) in
    the per-expert layout of the original checkpoints (``experts.{e}.gate_proj.weight``, ...), and only
    ``from_pretrained`` converts them back; a plain ``load_state_dict(..., strict=False)`` (the
    Trainer's resume) skips them and leaves the experts and, for Mixtral, the routers as they were.
    The copy goes through ``model.load_state_dict``, strictly, so ISN-only models (whose load hooks
    split each weight into frozen base and trainable entries) load too; tensors keep their identity,
    so an optimizer built on them stays valid. Host memory: one copy of the weights, as the
    Trainer's own load takes."""
    import torch

    from sparcom.models.sites import unwrap

    hf_model = unwrap(model)
    try:
        loaded, info = type(hf_model).from_pretrained(str(checkpoint), dtype="auto", output_loading_info=True)
        # from_pretrained initialises what a checkpoint lacks at random: a lack is a misfit too
        misfit = "; ".join(
            f"{kind}: {_some(sorted(map(str, found)))}" for kind, found in info.items() if found
        )
        if not misfit:
            hf_model.load_state_dict(loaded.state_dict(), strict=True)
            return
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:  # a failed conversion; keys or shapes that differ, one per line
        lines = [line.strip() for line in str(err).splitlines()]
        misfit = _some([line for line in lines if line and not line.startswith("Error(s) in loading")], "; ")
    raise ValueError(
        f"checkpoint {str(checkpoint)!r} does not fit the {type(hf_model).__name__} being trained: {misfit}"
    )


class CheckpointWeights:
    """Trainer mixin: model weights read back from a checkpoint (on resume, and for
    ``load_best_model_at_end``) are loaded with ``load_checkpoint_weights`` (every key, MoE experts
    included), where ``Trainer`` would load them with a key-for-key ``load_state_dict(strict=False)``.
    Adapters (PEFT), DeepSpeed and FSDP checkpoints are left to the Trainer, which reads them whole."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.model if model is None else model
        if self._trainer_reads(resume_from_checkpoint, target):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            load_checkpoint_weights(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if self._trainer_reads(best, self.model):
            super()._load_best_model()
        else:
            load_checkpoint_weights(self.model, best)

    def _trainer_reads(self, checkpoint: str, model) -> bool:
        from transformers.trainer_utils import _is_peft_model
        from transformers.utils import (
            SAFE_WEIGHTS_INDEX_NAME,
            SAFE_WEIGHTS_NAME,
            WEIGHTS_INDEX_NAME,
            WEIGHTS_NAME,
        )

        weights = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
        return (
            self.is_deepspeed_enabled
            or self.is_fsdp_enabled
            or _is_peft_model(model)
            or not any((Path(checkpoint) / name).is_file() for name in weights)
        )


class TruthfulModelCard:
    """Trainer mixin: the ``README.md`` a checkpoint save writes names the model the run started
    from as it is (a sparcom preset, a local folder, or a hub id with its link) and shows how to
    load this run's checkpoints; TRL's draft links every base model to the hub and loads ``"None"``."""

    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        if self.is_world_process_zero():
            output = Path(self.args.output_dir)
            base = str(getattr(self.model.config, "name_or_path", "") or "unknown")
            (output / "README.md").write_text(model_card(base, output), encoding="utf-8")


def model_card(base: str, output: Path) -> str:
    """A run folder's model card: where the model came from, and how to load and analyse the run."""
    from sparcom.config import PACKAGED_PRESET_NAMES, TINY_PRESET_NAMES

    if base in TINY_PRESET_NAMES or base in PACKAGED_PRESET_NAMES:
        origin = f"the sparcom preset `{base}` (`sparcom.models.loading.load_model({base!r})`)"
    elif Path(base).exists():
        origin = f"the local model `{base}`"
    else:
        origin = f"[{base}](https://huggingface.co/{base})"
    return (
        f"---\nbase_model: {base}\nlibrary_name: transformers\ntags: [sparcom, trl, sft]\n---\n\n"
        f"# {output.name}\n\nFine-tuned from {origin} with TRL SFT on HexaInst by sparcom, which "
        "recorded its instruction-specific neurons and experts along the way (`snapshots/`).\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'checkpoint = "{output}/checkpoint-<step>"  # one of this folder\'s checkpoints\n'
        "model = AutoModelForCausalLM.from_pretrained(checkpoint)\n"
        "tokenizer = AutoTokenizer.from_pretrained(checkpoint)\n```\n\n"
        f"Drift over training: `snapshots/drift.jsonl`; the report: `python analyze.py run={output}`.\n"
    )


@functools.cache
def resumable(trainer_class: type) -> type:
    """``trainer_class`` (a transformers ``Trainer``, e.g. TRL's ``SFTTrainer``) reading checkpoints
    back with ``CheckpointWeights`` and writing a ``TruthfulModelCard``:
    ``resumable(SFTTrainer)(model=..., args=...)``."""
    return type(trainer_class.__name__, (CheckpointWeights, TruthfulModelCard, trainer_class), {})


def finish_wandb(interrupted: bool = False) -> None:
    """Close this process's W&B run, if any; a failure to close is a warning, never an error. An
    ``interrupted`` run (Ctrl-C) is marked preempting and ends with exit code 130 (SIGINT), so W&B
    shows it as stopped to be resumed, not as failed."""
    try:
        import wandb

        if wandb.run is not None:
            if interrupted:
                wandb.run.mark_preempting()
            wandb.finish(exit_code=130 if interrupted else None)
        wandb.teardown()  # forget settings read from the environment: the next job sets its own
    except Exception as err:  # noqa: BLE001 - logging must never fail a finished run
        warnings.warn(f"W&B: could not finish the run ({err})", stacklevel=2)


def _some(items: list[str], separator: str = ", ", shown: int = 3) -> str:
    """The first ``shown`` items and how many more: a long list still fits an error's one line."""
    more = f"{separator}... ({len(items) - shown} more)" if len(items) > shown else ""
    return separator.join(items[:shown]) + more


def _wandb_reachable() -> bool:
    if not os.environ.get("WANDB_API_KEY"):
        import netrc

        try:
            if not netrc.netrc().authenticators("api.wandb.ai"):
                return False
        except (FileNotFoundError, netrc.NetrcParseError):
            return False
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
    except OSError:
        return False
    return True
