"""Steering: scale each category's ISNs and measure the response loss on every category, against
random-neuron controls with the same per-site counts, scaled alike.

The one measurement behind both steering (a dose-response over scales) and the causal check of
``sparcom.ablation`` (scale 0): ``loss_changes``. Each control is a distribution: ``control_draws``
seeded random sets per steered category, the same sets at every scale, so a control curve is as
smooth as the ISN curve it is compared with.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from sparcom.data import Record
from sparcom.intervention import check_editable, check_neurons, intervene, neuron_sites, random_sets
from sparcom.response_loss import ResponseLoss
from sparcom.select import NeuronSet, category_isns
from sparcom.snapshot import Snapshot

DEFAULT_SCALES = (0.0, 0.5, 1.5, 2.0, 3.0)
COLUMNS = ("steered", "evaluated", "scale", "loss_delta", "control_mean", "control_sd", "z")


@dataclass(frozen=True)
class LossChanges:
    """Response-loss changes under scaled neurons.

    Attributes:
        steered: the neuron sets' names (rows), e.g. categories whose ISNs are scaled.
        evaluated: the categories the loss is measured on (columns).
        scales: the scales applied.
        intact: ``[C]`` loss of the unchanged model.
        delta: ``[S, R, C]`` loss with set ``r`` scaled by ``scales[s]``, minus ``intact``.
        control: ``[S, D, R, C]`` the same for each of ``D`` random sets with set ``r``'s per-site counts.
        neurons: the size of each set.
    """

    steered: list[str]
    evaluated: list[str]
    scales: list[float]
    intact: torch.Tensor
    delta: torch.Tensor
    control: torch.Tensor
    neurons: list[int]


def check_scales(scales: Sequence[float]) -> list[float]:
    bad = [s for s in scales if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s)]
    if not scales or bad:
        raise ValueError(f"scales must be a non-empty list of finite numbers, got {list(scales)!r}")
    return [float(s) for s in scales]


def loss_changes(
    model: nn.Module,
    loss: ResponseLoss,
    neuron_sets: dict[str, NeuronSet],
    scales: Sequence[float],
    control_draws: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> LossChanges:
    """Scale each set, and each of its random controls, by every scale; measure the loss change.

    Costs ``1 + len(neuron_sets) * len(scales != 1) * (1 + control_draws)`` passes of ``loss``: a
    scale of 1 changes nothing, so its changes are 0 without a pass. Each pass is a forward over
    the records (the time goes there: ``make bench``, section ``edits``); a progress bar names the
    set, the scale and the draw.
    """
    from tqdm.auto import tqdm

    scales = check_scales(scales)
    sites = neuron_sites(model)
    for neurons in neuron_sets.values():
        check_neurons(neurons, sites)
        check_editable(model, neurons)  # before the intact pass, not after it
    generator = torch.Generator().manual_seed(seed)
    draws = {name: random_sets(neurons, control_draws, generator) for name, neurons in neuron_sets.items()}
    intact = loss(model)
    rows, columns = len(neuron_sets), len(loss.categories)
    delta = torch.zeros(len(scales), rows, columns, dtype=torch.float64)
    control = torch.zeros(len(scales), control_draws, rows, columns, dtype=torch.float64)
    passes = len(neuron_sets) * sum(s != 1 for s in scales) * (1 + control_draws)
    bar = tqdm(total=passes, desc="edited passes", unit="pass", disable=not progress)
    for row, (name, neurons) in enumerate(neuron_sets.items()):
        for index, scale in enumerate(scales):
            if scale == 1:
                continue
            for draw, edited in enumerate([neurons, *draws[name]]):
                bar.set_postfix_str(
                    f"{name}, scale {scale:g}, " + ("its ISNs" if draw == 0 else f"control {draw}")
                )
                with intervene(model, edited, scale):
                    changed = loss(model) - intact
                if draw == 0:
                    delta[index, row] = changed
                else:
                    control[index, draw - 1, row] = changed
                bar.update()
    bar.close()
    sizes = [int(sum(int(chosen.sum()) for chosen in s.values())) for s in neuron_sets.values()]
    return LossChanges(list(neuron_sets), list(loss.categories), scales, intact, delta, control, sizes)


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
    epsilon: float,
    selection_mode: str = "threshold",
    scales: Sequence[float] = DEFAULT_SCALES,
    control_draws: int = 10,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
    isn_set: str = "frequent",
) -> list[dict]:
    """For each category's ISNs (selected from ``snapshot``) and each scale, the loss change on every
    category's ``records`` (held-out instructions: see ``held_out``), with the random-neuron control's
    mean and standard deviation over ``control_draws`` draws. Rows have the keys of ``COLUMNS``."""
    scales = check_scales(scales)
    sets = category_isns(snapshot, epsilon, selection_mode, isn_set)
    loss = ResponseLoss(tokenizer, records, snapshot.categories, batch_size, max_length)
    return dose_response_rows(loss_changes(model, loss, sets, scales, control_draws, seed))


def dose_response_rows(changes: LossChanges) -> list[dict]:
    """One row per (steered, evaluated, scale), in that order, with the change's z-score against its
    random-neuron draws."""
    from sparcom.ablation import z_scores

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


def steering_dominance(rows: list[dict], draws: int, alpha: float = 0.05) -> dict[float, dict]:
    """Scale -> whether the steered category's own loss moves beyond its control further than any
    other category's does (``sparcom.ablation.dominance``, two-sided: amplifying may lower a loss as
    well as raise it); scale 1 changes nothing and is left out."""
    from sparcom.ablation import dominance

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
