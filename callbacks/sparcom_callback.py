"""Record ISN/ISE snapshots while a HF Trainer runs, and log their drift next to the loss."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from transformers import TrainerCallback

from sparcom.analysis import layer_profiles
from sparcom.drift import drift_metrics
from sparcom.metrics import overlap_matrix
from sparcom.probe import record
from sparcom.select import SELECTION_MODES, check_epsilon
from sparcom.snapshot import SNAPSHOT_NAME, Snapshot, snapshot_series


class SparcomCallback(TrainerCallback):
    """Snapshots at step 0 (the vanilla model), at every checkpoint save and at the end of training.

    Each snapshot is saved atomically in ``snapshot_dir`` (default ``<output_dir>/snapshots``).
    Drift against the base snapshot and the previous one (ISN Jaccard per category for every
    epsilon; ISE Pearson for MoE models) goes to W&B under ``sparcom/...`` keys on the trainer's
    global step, so it lines up with ``train/loss``, and to ``drift.jsonl`` beside the snapshots.

    Every rank runs the probe (ZeRO-3 needs all ranks in every forward); counts are summed across
    ranks and only the main process writes and logs. A resumed run reloads its base snapshot
    from disk rather than recomputing it from resumed weights.

        trainer.add_callback(SparcomCallback(tokenizer, probe_records, epsilons=[0.3, 0.5, 0.7]))
    """

    def __init__(
        self,
        tokenizer,
        records: Sequence[dict],
        epsilons: Sequence[float] = (0.5,),
        selection_mode: str = "threshold",
        token_scope: str = "prompt",
        batch_size: int = 16,
        per_instruction: bool = True,
        snapshot_dir: str | Path | None = None,
        on_save: bool = True,
        every_steps: int | None = None,
        log_figures: bool = True,
        overlap_epsilon: float = 0.5,
    ):
        for epsilon in epsilons:
            check_epsilon(epsilon)
        if selection_mode not in SELECTION_MODES:
            raise ValueError(
                f"unknown selection mode {selection_mode!r}; expected one of {list(SELECTION_MODES)}"
            )
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"every_steps must be a positive integer or None, got {every_steps}")
        self.tokenizer = tokenizer
        self.records = list(records)
        self.epsilons = list(epsilons)
        self.selection_mode = selection_mode
        self.token_scope = token_scope
        self.batch_size = batch_size
        self.per_instruction = per_instruction
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self.record_on_save = on_save
        self.every_steps = every_steps
        self.log_figures = log_figures
        check_epsilon(overlap_epsilon)
        self.overlap_epsilon = overlap_epsilon  # of the figures, as in analyze.py's report
        self.base: Snapshot | None = None
        self.previous: Snapshot | None = None
        self.last_step: int | None = None
        self.table_rows: list[list] = []
        self._row_steps: set[int] = set()  # steps that have their row in drift.jsonl
        # Figures (overlap matrix, layer profile) are drawn off the training thread.
        self._figure_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparcom-figures")
        self._pending: list[Future] = []

    # ------------------------------------------------------------------------- trainer events

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.snapshot_dir = self.snapshot_dir or Path(args.output_dir) / "snapshots"
        series = snapshot_series(self.snapshot_dir)
        if series:  # a resumed run: continue the series that is on disk
            self.base = Snapshot.load(next(iter(series.values())))
            earlier = [step for step in series if step <= state.global_step]
            if state.is_world_process_zero:
                self._complete_drift_rows(series, earlier)
            if earlier:
                self.previous = Snapshot.load(series[earlier[-1]])
                self.last_step = earlier[-1]
            if self.last_step == state.global_step:
                return
        self._snapshot(args, state, model)

    def _complete_drift_rows(self, series: dict[int, Path], steps: list[int]) -> None:
        """A killed run can end between a snapshot's rename and its drift.jsonl row, or halfway
        through a row. Keep the whole rows, and recompute the missing ones from the snapshots."""
        path = self.snapshot_dir / "drift.jsonl"
        rows = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line
        present = {row["step"] for row in rows}
        previous = None
        for step in steps:
            snapshot = Snapshot.load(series[step])
            if step not in present:
                rows.append({"step": step, **self._drift(snapshot, previous)})
            previous = snapshot
        rows.sort(key=lambda row: row["step"])
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        temporary.replace(path)
        self._row_steps = {row["step"] for row in rows}

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.record_on_save:
            self._snapshot(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps and state.global_step % self.every_steps == 0:
            self._snapshot(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._snapshot(args, state, model)
        self.close()

    def close(self) -> None:
        """Wait for figures still being drawn and logged."""
        for future in self._pending:
            future.result()
        self._pending.clear()

    # ------------------------------------------------------------------------------ the work

    def _snapshot(self, args, state, model) -> None:
        step = state.global_step
        if step == self.last_step:
            return
        snapshot = record(
            model,
            self.tokenizer,
            self.records,
            token_scope=self.token_scope,
            batch_size=self.batch_size,
            per_instruction=self.per_instruction,
            progress=False,
            step=step,
        )
        self.last_step = step
        if state.is_world_process_zero:
            path = self.snapshot_dir / SNAPSHOT_NAME.format(step=step)
            if path.exists():  # a resumed run passing a step that a killed attempt finished
                warnings.warn(
                    f"{path} exists from an earlier attempt; keeping it, not overwriting", stacklevel=2
                )
            else:
                snapshot.save(path)
            if self.base is None:
                self.base = snapshot
            self._log(step, snapshot)
        self.previous = snapshot

    def _drift(self, snapshot: Snapshot, previous: Snapshot | None) -> dict[str, float]:
        metrics = drift_metrics(self.base, snapshot, self.epsilons, self.selection_mode, "base")
        if previous is not None:
            metrics |= drift_metrics(previous, snapshot, self.epsilons, self.selection_mode, "prev")
        return metrics

    def _log(self, step: int, snapshot: Snapshot) -> None:
        metrics = self._drift(snapshot, self.previous)
        if step not in self._row_steps:
            with open(self.snapshot_dir / "drift.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")
            self._row_steps.add(step)
        for category in snapshot.categories:
            for epsilon in self.epsilons:
                key = f"eps={epsilon:g}/{category}"
                self.table_rows.append([step, category, epsilon, metrics[f"sparcom/isn_jaccard/base/{key}"],
                                        metrics.get(f"sparcom/isn_jaccard/prev/{key}"),
                                        metrics.get(f"sparcom/ise_pearson/base/{category}")])  # fmt: skip
        try:
            import wandb

            if wandb.run is None:
                return
            payload = {**metrics, "train/global_step": step}
            payload["sparcom/drift_table"] = wandb.Table(
                columns=[
                    "step",
                    "category",
                    "epsilon",
                    "isn_jaccard_base",
                    "isn_jaccard_prev",
                    "ise_pearson_base",
                ],
                data=self.table_rows,
            )
            wandb.run.log(payload)
            if self.log_figures:
                self._pending.append(self._figure_worker.submit(self._log_figures, step, snapshot, wandb))
        except Exception as err:  # noqa: BLE001 - a logging outage must never stop training
            warnings.warn(f"W&B logging failed at step {step} ({err}); training continues", stacklevel=2)

    def _log_figures(self, step: int, snapshot: Snapshot, wandb) -> None:
        try:
            wandb.run.log({**self._figures(step, snapshot, wandb), "train/global_step": step})
        except Exception as err:  # noqa: BLE001
            warnings.warn(
                f"W&B figure logging failed at step {step} ({err}); training continues", stacklevel=2
            )

    def _figures(self, step: int, snapshot: Snapshot, wandb) -> dict:
        from sparcom.report import layer_profile_plot, overlap_heatmap

        epsilon = self.overlap_epsilon
        figures = self.snapshot_dir / "figures"
        figures.mkdir(exist_ok=True)
        profiles = layer_profiles(snapshot, epsilon, self.selection_mode)
        images = {
            "sparcom/layer_profile": wandb.Image(
                str(
                    layer_profile_plot(
                        profiles, f"ISNs per layer, step {step}", figures / f"layer_profile-{step}.png"
                    )
                )
            )
        }
        if snapshot.instruction_counts is not None:
            matrix = overlap_matrix(snapshot, epsilon, self.selection_mode)
            path = overlap_heatmap(matrix, snapshot.categories, f"ISN overlap, step {step}, eps={epsilon:g}",
                                   figures / f"overlap-{step}.png")  # fmt: skip
            images["sparcom/overlap"] = wandb.Image(str(path))
        return images
