"""A run's snapshots and checkpoints as W&B artifacts, by reference: W&B records each file's path,
size and checksum, nothing is uploaded and no file is stored twice. One artifact per run holds the
snapshot series (a version per snapshot, aliased ``step-<N>``, the first also ``base``), another
the checkpoints (the folder's files, not checksummed: they are large and never rewritten).

Lineage: every later snapshot's drift is measured against the base, so its version names the base
version in its metadata (``compared_with``), and online the run declares the base as used
(``use_artifact``), so W&B draws the base as an input of the run's comparisons. Offline W&B cannot
use artifacts; the metadata alone carries the lineage there.
"""

from __future__ import annotations

from pathlib import Path

SNAPSHOT_TYPE = "sparcom-snapshot"
CHECKPOINT_TYPE = "model"


def snapshot_artifact_name(run_id: str) -> str:
    return f"snapshots-{run_id}"


def log_snapshot(run, path: Path, step: int, base_step: int) -> None:
    """Log the snapshot at ``step`` of the run's series (``base_step``: the series' first)."""
    import wandb

    name = snapshot_artifact_name(run.id)
    metadata = {"step": step, "compared_with": f"{name}:step-{base_step}", "file": path.name}
    artifact = wandb.Artifact(name, type=SNAPSHOT_TYPE, metadata=metadata)
    artifact.add_reference(path.resolve().as_uri(), name=path.name)
    aliases = [f"step-{step}"] + (["base"] if step == base_step else [])
    run.log_artifact(artifact, aliases=aliases)
    if step != base_step and not run.offline:
        run.use_artifact(f"{name}:step-{base_step}")


def log_checkpoint(run, folder: Path, step: int) -> None:
    """Log a checkpoint folder of the run, by reference to its files."""
    import wandb

    artifact = wandb.Artifact(f"checkpoints-{run.id}", type=CHECKPOINT_TYPE, metadata={"step": step})
    artifact.add_reference(folder.resolve().as_uri(), name=folder.name, checksum=False)
    run.log_artifact(artifact, aliases=[f"step-{step}"])
