"""Figures: heatmaps on one shared colour scale, line plots, layer profiles.

matplotlib's object API only (no pyplot): no global state, safe off the training thread. Things
meant to be compared are drawn as panels of one figure with one colour bar or one y axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.colors
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator


def decimals(values: Sequence[float], significant: int = 3) -> int:
    """Decimals that show ``significant`` digits of the largest magnitude (at least 2): 0.61 -> 3
    decimals, 0.0041 -> 5, so small effects do not all print as 0.00."""
    finite = [abs(v) for v in values if np.isfinite(v) and v != 0]
    largest = max(finite, default=1.0)
    return max(2, significant - 1 - int(np.floor(np.log10(largest))))


def heatmaps(
    panels: dict[str, np.ndarray],
    labels: Sequence[str],
    path: str | Path,
    colorbar: str,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    diverging: bool = False,
    marks: dict[str, np.ndarray] | None = None,
) -> Path:
    """Annotated ``[R, C]`` heatmaps side by side on one colour scale (diverging: centred on 0).

    ``marks[panel]``: ``[R, C]`` bool, cells outlined (e.g. significant after correction).
    """
    values = {name: np.asarray(matrix, dtype=float) for name, matrix in panels.items()}
    everything = np.concatenate([v.ravel() for v in values.values()])
    if diverging:
        limit = max(float(np.nanmax(np.abs(everything))), 1e-12)
        norm, cmap = matplotlib.colors.Normalize(-limit, limit), matplotlib.colormaps["RdBu_r"]
    else:
        low, high = float(np.nanmin(everything)), float(np.nanmax(everything))
        norm = matplotlib.colors.Normalize(low, high if high > low else low + 1e-12)
        cmap = matplotlib.colormaps["viridis"]
    places = decimals(everything.tolist())
    rows = list(row_labels or labels)
    # Cells of a fixed size, so one panel and two panels show their numbers at the same scale.
    width = 1.6 + 0.8 * len(labels) * len(values) + (1.4 if row_labels else 0.9)
    figure = Figure(figsize=(width, 1.9 + 0.5 * len(rows)), dpi=110, layout="constrained")
    axes_list = figure.subplots(1, len(values), squeeze=False)[0]
    for index, (axes, (name, matrix)) in enumerate(zip(axes_list, values.items(), strict=True)):
        image = axes.imshow(matrix, cmap=cmap, norm=norm)
        axes.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
        axes.set_yticks(range(len(rows)), rows if index == 0 else [])
        axes.set_title(name, fontsize=10)
        for (a, b), value in np.ndenumerate(matrix):
            red, green, blue, _ = cmap(norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # perceived luminance
            colour = "white" if dark else "black"
            axes.text(b, a, f"{value:.{places}f}", ha="center", va="center", fontsize=7.5, color=colour)
        if marks and name in marks:
            for a, b in np.argwhere(np.asarray(marks[name])):
                axes.add_patch(
                    Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="#ff2d55", linewidth=2.2)
                )
    figure.colorbar(image, ax=list(axes_list), label=colorbar, shrink=0.9)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.savefig(path)
    return Path(path)


def lines(
    x: Sequence[float],
    panels: dict[str, dict[str, Sequence[float]]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    integer_x: bool = False,
    reference: tuple[str, Sequence[float]] | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One subplot per panel, one line per series, all panels on one y axis.

    ``reference``: a named dashed line drawn in every panel (e.g. the chance level).
    """
    figure = Figure(figsize=(max(6.4, 5.2 * len(panels)), 4.2), dpi=120, layout="constrained")
    axes_list = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for axes, (panel_title, series) in zip(axes_list, panels.items(), strict=True):
        for name, values in series.items():
            axes.plot(list(x), list(values), marker="o", markersize=3, label=name)
        if reference:
            axes.plot(list(x), list(reference[1]), linestyle="--", color="grey", label=reference[0])
        if len(panels) > 1 or not title:
            axes.set_title(panel_title, fontsize=10)
        axes.set_xlabel(xlabel)
        axes.grid(alpha=0.3)
        if integer_x:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ylim:
            axes.set_ylim(*ylim)
    axes_list[0].set_ylabel(ylabel)
    axes_list[-1].legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.savefig(path)
    return Path(path)


def overlap_heatmap(matrix, categories: Sequence[str], title: str, path: str | Path) -> Path:
    """One 6x6 ISN overlap matrix (mean pairwise Jaccard of per-instruction ISN sets)."""
    return heatmaps({title: np.asarray(matrix)}, categories, path, "mean pairwise Jaccard of ISN sets")


def layer_profile_plot(profiles: dict[str, list[int]], title: str, path: str | Path) -> Path:
    """ISN count per layer, one line per category."""
    layers = range(len(next(iter(profiles.values()))))
    return lines(layers, {title: profiles}, path, "layer", "ISN count", integer_x=True)
