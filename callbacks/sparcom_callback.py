"""Record ISN/ISE snapshots while a HF Trainer runs, and log their drift next to the loss."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from transformers import TrainerCallback

from sparcom.config import StatsConfig, TrainSparcomConfig
from sparcom.config.checks import check_sparcom
from sparcom.recording.probe import Recording, record
from sparcom.snapshot import SNAPSHOT_NAME, Snapshot, check_continues, snapshot_series
from sparcom.stats.analysis import layer_profiles, overlap_matrix
from sparcom.stats.resampling import sampling_stability
from sparcom.stats.select import SELECTION_MODES
from sparcom.train.artifacts import log_checkpoint, log_snapshot
from sparcom.train.drift import TABLE_COLUMNS, DriftPoint, append_drift, drift_point, read_drift, write_drift


class SparcomCallback(TrainerCallback):
    """Snapshots at step 0 (the vanilla model), at every checkpoint save and at the end of training.

    Each snapshot is saved atomically in ``snapshot_dir`` (default ``<output_dir>/snapshots``).
    Drift against the base snapshot and the previous one (ISN Jaccard per category for every
    epsilon, with its chance level; ISE Pearson for MoE models; at step 0 the split-half stability
    of the probe's ISN sets, ``stats.splits`` splits) is written to ``drift.jsonl``
    beside the snapshots and, when a W&B run is active, logged under ``sparcom/...`` keys on the
    trainer's global step, so it lines up with ``train/loss``. The overlap matrix and layer
    profile at ``overlap_epsilon`` are drawn to ``snapshot_dir/figures`` (and logged to W&B).

    Every rank runs the probe (ZeRO-3 needs all ranks in every forward); counts are summed across
    ranks and only the main process writes and logs. Given ``held_out`` records (instructions never
    trained on), each snapshot also measures the response loss on them per category, logged as
    ``eval/loss/<category>`` beside the drift and kept in ``drift.jsonl``, so capability and drift
    read off one page. With ``token_scope="generated"`` each snapshot
    counts the model's own greedy continuation of every prompt as it is at that step (at most
    ``max_new_tokens``); the ranks generate their shares in step (``synced_gpus``), so ZeRO-3 works. A resumed run reloads its base snapshot
    from disk rather than recomputing it from resumed weights.

        trainer.add_callback(SparcomCallback(tokenizer, probe_records, TrainSparcomConfig(epsilons=[0.3, 0.5])))
    """

    def __init__(
        self,
        tokenizer,
        records: Sequence[dict],
        settings: TrainSparcomConfig | None = None,
        stats: StatsConfig | None = None,
        *,
        held_out: Sequence[dict] | None = None,
        max_length: int | None = None,
        snapshot_dir: str | Path | None = None,
        base: Snapshot | None = None,
    ):
        """``settings``: the config's ``sparcom`` section (epsilons, selection, token scope, probe
        batching, when to record); ``stats``: its ``stats`` section (the split-half stability at step 0,
        none when disabled); ``held_out``: instructions never trained on, whose response loss is
        measured at every snapshot (cut at ``max_length`` tokens); ``base``: a step-0 recording
        made already (ISN-only training selects from it), not redone."""
        settings, stats = settings or TrainSparcomConfig(), stats or StatsConfig()
        check_sparcom(settings)
        if settings.record.every_steps is not None and settings.record.every_steps < 1:
            raise ValueError(
                f"every_steps must be a positive integer or None, got {settings.record.every_steps}"
            )
        if settings.selection_mode not in SELECTION_MODES:
            raise ValueError(
                f"unknown selection mode {settings.selection_mode!r}; expected one of {list(SELECTION_MODES)}"
            )
        self.tokenizer = tokenizer
        self.records = list(records)
        self.recording = Recording.of(settings)
        epsilons, overlap_epsilon = list(settings.epsilons), settings.overlap_epsilon
        # The overlap epsilon is always measured: its numbers are also logged without "eps=" in the key.
        self.epsilons = [*epsilons, *([overlap_epsilon] if overlap_epsilon not in epsilons else [])]
        self.selection_mode = str(settings.selection_mode)
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self.record_on_save, self.every_steps = settings.record.on_save, settings.record.every_steps
        self.overlap_epsilon = overlap_epsilon
        self.draw_figures = True
        self.base: Snapshot | None = None
        self._recorded_base = base  # a step-0 recording made already (to select ISNs): not redone
        self.stability_splits = stats.splits if stats.enabled else None
        self.seed = stats.seed
        self.held_out, self.max_length = list(held_out or []), max_length
        self._held_out_loss = None  # tokenised and batched on first use
        self.previous: Snapshot | None = None
        self.last_step: int | None = None
        self.points: dict[int, DriftPoint] = {}  # what drift.jsonl holds, by step
        # Figures (overlap matrix, layer profile) are drawn off the training thread.
        self._figure_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparcom-figures")
        self._pending: list[Future] = []

    # ------------------------------------------------------------------------- trainer events

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.snapshot_dir = self.snapshot_dir or Path(args.output_dir) / "snapshots"
        series = snapshot_series(self.snapshot_dir)
        if series:  # a resumed run: continue the series that is on disk, if it measured the same
            how = self.recording
            check_continues(self.snapshot_dir, self.records, how.token_scope, how.max_new_tokens)
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
        self.points = {point.step: point for point in read_drift(path)}
        previous = None
        for step in steps:
            snapshot = Snapshot.load(series[step])
            if step not in self.points:
                self.points[step] = self._drift(step, snapshot, previous)
            previous = snapshot
        write_drift(path, [self.points[step] for step in sorted(self.points)])

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.record_on_save:
            self._snapshot(args, state, model)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            try:
                import wandb

                if wandb.run is not None:
                    log_checkpoint(wandb.run, folder, state.global_step)
            except Exception as err:  # noqa: BLE001 - a logging outage must never stop training
                warnings.warn(f"W&B: could not log {folder.name} ({err}); training continues", stacklevel=2)

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
        if step == 0 and self._recorded_base is not None:
            snapshot = self._recorded_base
        else:
            snapshot = record(
                model,
                self.tokenizer,
                self.records,
                self.recording,
                progress=state.is_world_process_zero,
                step=step,
            )
        self.last_step = step
        # Every rank measures: under ZeRO-3 each forward is collective.
        loss = self._measure_held_out(model, snapshot.categories)
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
            self._log(step, snapshot, loss)
        self.previous = snapshot

    def _measure_held_out(self, model, categories: list[str]) -> dict[str, float]:
        """Response loss per category on the held-out records (empty without them)."""
        if not self.held_out:
            return {}
        if self._held_out_loss is None:
            from sparcom.recording.response_loss import ResponseLoss

            self._held_out_loss = ResponseLoss(
                self.tokenizer, self.held_out, categories, self.recording.batch_size, self.max_length
            )
        return dict(zip(categories, self._held_out_loss(model).tolist(), strict=True))

    def _drift(
        self, step: int, snapshot: Snapshot, previous: Snapshot | None, loss: dict[str, float] | None = None
    ) -> DriftPoint:
        stability = None
        halves = min(snapshot.meta.get("category_instructions", {}).values(), default=0) >= 2
        if previous is None and self.stability_splits and snapshot.per_instruction and halves:
            # The scale on which drift is read, once: how far the ISN sets move between halves of the probe.
            by_category = sampling_stability(
                snapshot, self.epsilons, self.selection_mode, self.stability_splits, self.seed
            )
            stability = {e: {c: values[e] for c, values in by_category.items()} for e in self.epsilons}
        point = drift_point(
            step,
            self.base,
            snapshot,
            previous,
            epsilons=self.epsilons,
            mode=self.selection_mode,
            headline_epsilon=self.overlap_epsilon,
        )
        return dataclasses.replace(point, isn_stability=stability or {}, held_out_loss=loss or {})

    def _log(self, step: int, snapshot: Snapshot, loss: dict[str, float]) -> None:
        point = self._drift(step, snapshot, self.previous, loss)
        if step not in self.points:
            append_drift(self.snapshot_dir / "drift.jsonl", point)
            self.points[step] = point
        run = None
        try:
            import wandb

            run = wandb.run
            if run is not None:
                rows = [row for s in sorted(self.points) for row in self.points[s].table_rows()]
                table = wandb.Table(columns=TABLE_COLUMNS, data=rows)
                run.log({**point.wandb_metrics(), "sparcom/drift_table": table, "train/global_step": step})
                path = self.snapshot_dir / SNAPSHOT_NAME.format(step=step)
                log_snapshot(run, path, step, min(self.points))
        except Exception as err:  # noqa: BLE001 - a logging outage must never stop training
            warnings.warn(f"W&B logging failed at step {step} ({err}); training continues", stacklevel=2)
        if self.draw_figures:
            self._pending.append(self._figure_worker.submit(self._figures, step, snapshot, run))

    def _figures(self, step: int, snapshot: Snapshot, run) -> None:
        """Draw the step's overlap matrix and layer profile to disk, and log them if W&B is on."""
        from sparcom.report.figures import layer_profile_plot, overlap_heatmap

        epsilon = self.overlap_epsilon
        folder = self.snapshot_dir / "figures"
        folder.mkdir(exist_ok=True)
        profiles = layer_profiles(snapshot, epsilon, self.selection_mode)
        paths = {
            "sparcom/layer_profile": layer_profile_plot(
                profiles,
                f"ISNs per layer, step {step} (eps={epsilon:g})",
                folder / f"layer_profile-{step}.png",
            )
        }
        if snapshot.per_instruction:
            matrix = overlap_matrix(snapshot, epsilon, self.selection_mode)
            title = f"ISN overlap, step {step} (eps={epsilon:g})"
            paths["sparcom/overlap"] = overlap_heatmap(
                matrix, snapshot.categories, title, folder / f"overlap-{step}.png"
            )
        if run is None:
            return
        try:
            import wandb

            run.log(
                {**{key: wandb.Image(str(path)) for key, path in paths.items()}, "train/global_step": step}
            )
        except Exception as err:  # noqa: BLE001
            warnings.warn(
                f"W&B figure logging failed at step {step} ({err}); training continues", stacklevel=2
            )
