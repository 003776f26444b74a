"""The pieces train.py wires together: SFT data in the shared conversation format, the probe set,
TRL's SFTConfig as a Hydra node, and W&B settings. Plain functions: no Hydra needed to use them."""

from __future__ import annotations

import dataclasses
import enum
import os
import random
import socket
import warnings
from collections.abc import Sequence
from pathlib import Path

from sparcom.conversation import encode
from sparcom.data import CATEGORIES, Record

# Fields train.py sets itself from other groups (run folder, logger, DeepSpeed, seed).
MANAGED_FIELDS = {"output_dir", "report_to", "deepspeed", "seed", "run_name"}


def sft_defaults() -> dict:
    """Every TRL ``SFTConfig`` field with TRL's default, as a plain dict Hydra can hold, so that
    ``trainer.args.<any field>=...`` works on the command line and a misspelt field is refused."""
    from trl import SFTConfig

    defaults = {}
    for field in dataclasses.fields(SFTConfig):
        if field.name.startswith("_") or field.name in MANAGED_FIELDS:
            continue
        if field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        if value is None or isinstance(value, str | int | float | bool | list | dict):
            defaults[field.name] = value
    return defaults


def probe_set(records: Sequence[Record], per_category: int, seed: int = 0) -> list[Record]:
    """A seeded sample of ``per_category`` records of each category (all of them if fewer)."""
    rng = random.Random(seed)
    chosen = []
    for category in CATEGORIES:
        pool = [r for r in records if r["category"] == category]
        chosen += rng.sample(pool, min(per_category, len(pool)))
    return chosen


def sft_dataset(records: Sequence[Record], tokenizer, max_length: int | None):
    """Pre-tokenised SFT data: ``input_ids`` and ``completion_mask`` (the response tokens), from the
    same ``encode`` the probe uses, so training and probing see identical conversations."""
    from datasets import Dataset

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


def configure_wandb(mode: str, project: str, run_dir: Path, group: str | None, name: str | None,
                    entity: str | None) -> str:  # fmt: skip
    """Set W&B's environment for this run; returns the effective mode.

    ``online`` falls back to ``offline`` with a warning when there is no API key or no network,
    so a run never fails for want of a login.
    """
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"unknown logger mode {mode!r}; expected online, offline or disabled")
    if mode == "online" and not _wandb_reachable():
        warnings.warn(
            "W&B: no API key or no network; logging offline (sync later with `wandb sync`)", stacklevel=2
        )
        mode = "offline"
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_PROJECT"] = project
    os.environ["WANDB_DIR"] = str(run_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    for key, value in (("WANDB_RUN_GROUP", group), ("WANDB_NAME", name), ("WANDB_ENTITY", entity)):
        if value:
            os.environ[key] = str(value)
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    return mode


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run. The trainer writes ``trainer_state.json`` last, so a
    checkpoint folder without it was cut short (a killed job) and is passed over."""
    complete = [p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def finish_wandb() -> None:
    """Close this process's W&B run, if any; a failure to close is a warning, never an error."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()  # forget settings read from the environment: the next job sets its own
    except Exception as err:  # noqa: BLE001 - logging must never fail a finished run
        warnings.warn(f"W&B: could not finish the run ({err})", stacklevel=2)


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
