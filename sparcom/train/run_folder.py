"""A train.py run folder and its rules, in one place: when a folder may be (re)used, which
checkpoint a resume starts from, what a resume may change, and what a resume must restore (the
run's own config and its W&B run). Torch-free, so every rule is checked before anything heavy loads.

    outputs/<stamp>/config.yaml      the resolved config of the launch that started the run
    outputs/<stamp>/.hydra/          Hydra's record of that launch (overrides.yaml); never rewritten
    outputs/<stamp>/resumes.jsonl    one row per resume: when, from which checkpoint, what it extended
    outputs/<stamp>/wandb/run-id     the W&B run every launch of this run logs to
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from sparcom.errors import ConfigError

CONFIG = "config.yaml"
RESUMES = "resumes.jsonl"
WANDB_ID = Path("wandb") / "run-id"

# What a resume may change: each one extends the run (more steps) without changing what it has done.
EXTENDABLE = ("trainer.args.max_steps", "trainer.args.num_train_epochs")
# Where the run is logged, not what it is.
UNBOUND = ("logger.mode", "resume")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run. The trainer writes ``trainer_state.json`` last, so a
    checkpoint folder without it was cut short (a killed job) and is passed over."""
    complete = [p for p in Path(run_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def holds_run(folder: str | Path) -> bool:
    """Whether train.py has written a run into ``folder`` (Hydra's own .hydra/ does not count: every
    rank of a starting job writes it)."""
    folder = Path(folder)
    return (folder / CONFIG).is_file() or (folder / "snapshots").is_dir() or any(folder.glob("checkpoint-*"))


def check_run_dir(run_dir: str | Path, resume: bool | str | None, key: str = "hydra.run.dir") -> None:
    """A folder that holds a run is reused only to resume it; ``resume: true`` needs a checkpoint; the
    folder must be one this process can write."""
    run_dir = Path(run_dir)
    if resume is True and latest_checkpoint(run_dir) is None:
        raise ConfigError(
            f"resume: true, but {run_dir} holds no complete checkpoint-* folder; expected a run to resume"
        )
    if not resume and holds_run(run_dir):
        raise ConfigError(
            f"{key}: {str(run_dir)!r} already holds a run; expected a new folder, or resume=true to continue it"
        )
    check_writable(run_dir, key)


def check_writable(folder: str | Path, key: str) -> None:
    """Refuse a folder that cannot be created or written, before anything is written: a scratch
    folder is made and removed in its nearest existing ancestor (never in ``folder`` itself, which
    other ranks of the job may be creating)."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is a file"
    else:
        try:
            shutil.rmtree(tempfile.mkdtemp(prefix=".sparcom-write-check-", dir=existing))
        except OSError as err:
            problem = f"no folder can be made in {existing} ({err.strerror or err})"
    if problem:
        raise ConfigError(f"{key}: {str(folder)!r} cannot be created: {problem}; expected a writable folder")


# ------------------------------------------------------------------------------------ resume


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; lists and other values are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= flat(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config as it stands: ``config.yaml`` (written once, by the launch that started it)
    with every extension a resume recorded since, as a flat ``{key: value}``."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"resume: {run_dir} has no {CONFIG}; expected a folder written by train.py")
    values = flat(yaml.safe_load(path.read_text()) or {})
    for row in resumes(run_dir):
        values |= {key: change[1] for key, change in row.get("changed", {}).items()}
    return values


def resumes(run_dir: str | Path) -> list[dict]:
    """The rows of ``resumes.jsonl`` (none before the first resume)."""
    path = Path(run_dir) / RESUMES
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_resume(cfg, run_dir: str | Path) -> dict[str, tuple[Any, Any]]:
    """What resuming the run in ``run_dir`` with the typed config ``cfg`` changes (see
    ``resume_changes``); refuses any other change on one line."""
    from sparcom.config import as_plain

    return resume_changes(flat(as_plain(cfg)), run_dir)


def resume_changes(config: dict[str, Any], run_dir: str | Path) -> dict[str, tuple[Any, Any]]:
    """What a resume's ``config`` (flat, as ``flat`` gives it) changes in the run, ``{key: (run's,
    new)}``; refuses, on one line, any change other than extending ``EXTENDABLE`` settings."""
    saved = run_config(run_dir)
    changes = {}
    for key in sorted(set(saved) | set(config)):
        old, new = saved.get(key), config.get(key)
        if old == new or key in UNBOUND:
            continue
        if key in EXTENDABLE and _extends(key, old, new):
            changes[key] = (old, new)
            continue
        hint = (
            "; expected a larger value (a resumed run can only grow)"
            if key in EXTENDABLE
            else f"; a resumed run keeps its config: only {' and '.join(EXTENDABLE)} may grow "
            "(start a new run to change anything else)"
        )
        raise ConfigError(f"{key}: {new!r} differs from the run's {old!r} ({Path(run_dir) / CONFIG}){hint}")
    return changes


def _extends(key: str, old: Any, new: Any) -> bool:
    if not isinstance(old, int | float) or not isinstance(new, int | float):
        return False
    if key.endswith("max_steps") and old == -1:  # -1: the epochs govern; a step limit would cut the run
        return False
    return new > old


def record_resume(run_dir: str | Path, checkpoint: str | Path | None, changes: dict[str, tuple]) -> None:
    """Append the resume to ``resumes.jsonl``: when, from which checkpoint, what it extended."""
    row = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checkpoint": None if checkpoint is None else Path(checkpoint).name,
        "changed": {key: list(change) for key, change in changes.items()},
    }
    with open(Path(run_dir) / RESUMES, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def launch_overrides(run_dir: str | Path) -> list[str]:
    """The command line that composes the run's config: the overrides of the launch that started it
    (``.hydra/overrides.yaml``) and every extension recorded since, as ``key=value``."""
    run_dir = Path(run_dir)
    path = run_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in (yaml.safe_load(path.read_text()) or [])] if path.is_file() else []
    for row in resumes(run_dir):
        overrides += [f"{key}={json.dumps(change[1])}" for key, change in row.get("changed", {}).items()]
    return overrides


def resume_command(run_dir: str | Path) -> str:
    """The command that continues a run."""
    return f"python train.py hydra.run.dir={run_dir} resume=true"


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT); the message says where, and how to continue."""

    def __init__(self, run_dir: str | Path, step: int, max_steps: int | None):
        checkpoint = latest_checkpoint(run_dir)
        where = f"step {step}" + (f" of {max_steps}" if max_steps and max_steps > 0 else "")
        kept = (
            f"the last complete checkpoint is {checkpoint.name}"
            if checkpoint
            else "no checkpoint was written yet (a resume needs one)"
        )
        super().__init__(
            f"training stopped at {where} in {run_dir}; {kept}; resume: {resume_command(run_dir)}"
        )


# --------------------------------------------------------------------------------------- W&B


def wandb_run_id(run_dir: str | Path) -> str:
    """The id of the run's W&B run: kept in the folder, so every launch of the run (the first and each
    resume) logs to the same W&B run. The first launch takes ``WANDB_RUN_ID`` when it is set (a W&B
    Sweeps agent sets it, so that the run joins its sweep), else a new id."""
    path = Path(run_dir) / WANDB_ID
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(run_id + "\n")
    temporary.replace(path)
    return run_id
