"""Steering: scale each category's ISNs and measure the response loss on every category, against
random-neuron controls with the same per-site counts, scaled alike.

The measurement is ``sparcom.edit.effects.loss_changes``, shared with the causal check of
``sparcom.edit.ablation`` (scale 0). Each control is a distribution: ``control_draws`` seeded random sets
per steered category, the same sets at every scale, so a control curve is as smooth as the ISN
curve it is compared with.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from sparcom.data import Record
from sparcom.edit.effects import (
    Dominance,
    Edits,
    LossChanges,
    check_scales,
    dominance,
    loss_changes,
    z_scores,
)
from sparcom.recording.response_loss import ResponseLoss
from sparcom.snapshot import Snapshot
from sparcom.stats.select import category_isns

DEFAULT_SCALES = (0.0, 0.5, 1.5, 2.0, 3.0)
COLUMNS = ("steered", "evaluated", "scale", "loss_delta", "control_mean", "control_sd", "z")


def held_out(records: Sequence[Record], snapshot: Snapshot, per_category: int, seed: int = 0) -> list[Record]:
    """A seeded sample of ``per_category`` records of each of the snapshot's categories that the
    snapshot did not see; where a category has fewer unseen records, the sample is taken from all."""
    seen = set(snapshot.instruction_ids)
    rng = random.Random(seed)
    chosen: list[Record] = []
    for category in snapshot.categories:
        pool = [r for r in records if r["category"] == category]
        unseen = [r for r in pool if r["id"] not in seen]
        pool = unseen if len(unseen) >= per_category else pool
        if not pool:
            raise ValueError(f"no records of category {category!r} to measure the loss on")
        chosen += rng.sample(pool, min(per_category, len(pool)))
    return chosen


def dose_response(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    snapshot: Snapshot,
    edits: Edits | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    max_length: int | None = None,
) -> list[dict]:
    """For each category's ISNs (selected from ``snapshot`` as ``edits`` says) and each scale, the
    loss change on every category's ``records`` (held-out instructions: see ``held_out``), with the
    random-neuron control's mean and standard deviation over ``edits.control_draws`` draws. Rows
    have the keys of ``COLUMNS``."""
    scales, edits = check_scales(scales), edits or Edits()
    sets = category_isns(snapshot, edits.epsilon, edits.selection_mode, edits.isn_set)
    loss = ResponseLoss(tokenizer, records, snapshot.categories, edits.batch_size, max_length)
    return dose_response_rows(loss_changes(model, loss, sets, scales, edits.control_draws, edits.seed))


def dose_response_rows(changes: LossChanges) -> list[dict]:
    """One row per (steered, evaluated, scale), in that order, with the change's z-score against its
    random-neuron draws."""
    mean, sd = changes.control.mean(1), changes.control.std(1)  # over draws: [S, R, C]
    z = z_scores(changes.delta, changes.control)  # [S, R, C]
    return [
        {
            "steered": steered,
            "evaluated": evaluated,
            "scale": scale,
            "loss_delta": float(changes.delta[s, r, c]),
            "control_mean": float(mean[s, r, c]),
            "control_sd": float(sd[s, r, c]),
            "z": float(z[s, r, c]),
        }
        for r, steered in enumerate(changes.steered)
        for c, evaluated in enumerate(changes.evaluated)
        for s, scale in enumerate(changes.scales)
    ]


def steering_dominance(rows: list[dict], draws: int, alpha: float = 0.05) -> dict[float, Dominance]:
    """Scale -> whether the steered category's own loss moves beyond its control further than any
    other category's does (``sparcom.edit.effects.dominance``, two-sided: amplifying may lower a loss as
    well as raise it); scale 1 changes nothing and is left out."""
    steered = list(dict.fromkeys(row["steered"] for row in rows))
    evaluated = list(dict.fromkeys(row["evaluated"] for row in rows))
    verdicts = {}
    for scale in sorted({row["scale"] for row in rows} - {1.0}):
        z = torch.full((len(steered), len(evaluated)), torch.nan, dtype=torch.float64)
        for row in rows:
            if row["scale"] == scale:
                z[steered.index(row["steered"]), evaluated.index(row["evaluated"])] = row["z"]
        verdicts[scale] = dominance(z, draws, alpha, two_sided=True)
    return verdicts


def write_dose_response(rows: list[dict], folder: str | Path) -> dict:
    """Write ``<folder>/dose_response.csv`` and ``<folder>/figures/dose_response_<category>.png``
    (one per steered category); returns ``{"table": path, "figures": {category: path}}``."""
    folder = Path(folder)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    table = folder / "dose_response.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    steered = list(dict.fromkeys(row["steered"] for row in rows))
    limits = shared_limits(rows)
    figures = {
        name: dose_response_figure(rows, name, folder / "figures" / f"dose_response_{name}.png", limits)
        for name in steered
    }
    return {"table": table, "figures": figures}


def shared_limits(rows: list[dict]) -> tuple[float, float]:
    """One y-range for every steered category's figure, so that their curves read on one scale."""
    values = [row["loss_delta"] for row in rows]
    values += [row["control_mean"] + sign * row["control_sd"] for row in rows for sign in (-1, 1)]
    low, high = min(values), max(values)
    margin = 0.05 * (high - low) or 1e-6
    return low - margin, high + margin


def dose_response_figure(
    rows: list[dict], steered: str, path: str | Path, limits: tuple[float, float] | None = None
) -> Path:
    """``dose_response_plot`` saved to ``path``."""
    dose_response_plot(rows, steered, limits).savefig(path)
    return Path(path)


def dose_response_plot(rows: list[dict], steered: str, limits: tuple[float, float] | None = None) -> Figure:
    """Loss change against scale when ``steered``'s ISNs are scaled: one solid line per evaluated
    category, its random-neuron control dashed in the same colour with a band of one control SD
    (both in the legend); ``limits``: the y-range (shared by the figures meant to be compared)."""
    figure = Figure(figsize=(6.8, 4.4), dpi=120, layout="constrained")
    axes = figure.subplots()
    mine = [row for row in rows if row["steered"] == steered]
    for index, evaluated in enumerate(dict.fromkeys(row["evaluated"] for row in mine)):
        curve = sorted((row for row in mine if row["evaluated"] == evaluated), key=lambda row: row["scale"])
        scales = [row["scale"] for row in curve]
        mean = [row["control_mean"] for row in curve]
        sd = [row["control_sd"] for row in curve]
        colour = f"C{index}"
        bold = 2.2 if evaluated == steered else 1.2
        axes.plot(
            scales,
            [row["loss_delta"] for row in curve],
            marker="o",
            markersize=3,
            color=colour,
            linewidth=bold,
            label=evaluated,
        )
        axes.plot(scales, mean, linestyle="--", linewidth=0.9, color=colour)
        axes.fill_between(
            scales,
            [m - s for m, s in zip(mean, sd, strict=True)],
            [m + s for m, s in zip(mean, sd, strict=True)],
            color=colour,
            alpha=0.12,
            linewidth=0,
        )
    axes.axhline(0, color="black", linewidth=0.6)
    axes.axvline(1, color="grey", linewidth=0.6, linestyle=":")
    axes.set_title(f"Scaling the {steered} ISNs (dashed: random neurons, band: 1 SD)", fontsize=10)
    axes.set_xlabel("scale of the neurons' activations (1 = unchanged)")
    axes.set_ylabel("response-loss change (nats/token)")
    axes.grid(alpha=0.3)
    if limits:
        axes.set_ylim(*limits)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, labels = axes.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="grey", linestyle="--", linewidth=0.9),
        Patch(color="grey", alpha=0.25, linewidth=0),
    ]
    labels += ["random neurons, mean", "random neurons, 1 SD"]
    axes.legend(handles, labels, title="evaluated on", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure
