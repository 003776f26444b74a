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
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter


def decimals(values: Sequence[float], significant: int = 3) -> int:
    """Decimals that show ``significant`` digits of the largest magnitude (at least 2): 0.61 -> 3
    decimals, 0.0041 -> 5, so small effects do not all print as 0.00."""
    finite = [abs(v) for v in values if np.isfinite(v) and v != 0]
    largest = max(finite, default=1.0)
    return max(2, significant - 1 - int(np.floor(np.log10(largest))))


def cell_text(value: float, places: int) -> str:
    """A number with ``places`` decimals; one that rounds to zero prints as "0", never "-0.00000"."""
    text = f"{value:.{places}f}"
    return "0" if float(text) == 0 else text


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
    """Annotated ``[R, C]`` heatmaps side by side on one colour scale (diverging: centred on 0, and
    clipped where a few cells lie far beyond the rest, so that one outlier does not bleach every
    other cell; the colour bar says so, and every cell prints its value).

    ``marks[panel]``: ``[R, C]`` bool, cells outlined (e.g. significant after correction).
    """
    values = {name: np.asarray(matrix, dtype=float) for name, matrix in panels.items()}
    everything = np.concatenate([v.ravel() for v in values.values()])
    if diverging:
        limit = diverging_limit(everything)
        if limit < float(np.nanmax(np.abs(everything))):
            colorbar += f"\n(colours clipped at ±{limit:.3g})"
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
            axes.text(b, a, cell_text(value, places), ha="center", va="center", fontsize=7.5, color=colour)
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


def diverging_limit(values: np.ndarray, reach: float = 3.0) -> float:
    """The colour limit of a diverging heatmap: the largest ``|value|``, unless that lies beyond
    ``reach`` times the 90th percentile of ``|values|`` (a few outliers): then that multiple."""
    magnitudes = np.abs(values[np.isfinite(values)])
    if magnitudes.size == 0:
        return 1e-12
    largest, typical = float(magnitudes.max()), float(np.percentile(magnitudes, 90))
    return max(min(largest, reach * typical) if typical > 0 else largest, 1e-12)


def lines(
    x: Sequence[float],
    panels: dict[str, dict[str, Sequence[float]]],
    path: str | Path,
    labels: tuple[str, str],
    title: str | None = None,
    x_scale: str = "linear",
    reference: tuple[str, Sequence[float]] | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One subplot per panel, one line per series, all panels on one y axis.

    ``labels``: the x and y axes' labels; ``x_scale``: "linear", "integer" (steps, layers) or "log"
    (a learning rate); ``reference``: a named dashed line drawn in every panel (the chance level).
    """
    xlabel, ylabel = labels
    figure = Figure(figsize=(min(12, max(6.4, 4.4 * len(panels))), 4.2), dpi=100, layout="constrained")
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
        if ylim:
            axes.set_ylim(*ylim)
        if x_scale == "integer":
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            if x_scale == "log":
                axes.set_xscale("log")
            _settings_axis(axes, x)
    axes_list[0].set_ylabel(ylabel)
    axes_list[-1].legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.savefig(path)
    return Path(path)


def _settings_axis(axes, x: Sequence[float]) -> None:
    """An axis of setting values (epsilons, learning rates): with a few distinct values, a tick at
    each, with many at most 5; labels of 3 significant digits, values below 0.01 in the tables'
    1.25e-04 form (matplotlib's defaults write 1.2e-4..2.7e-4 as eight run-together 0.00012...)."""
    values = sorted(set(float(v) for v in x))
    compact = FuncFormatter(lambda v, _: f"{v:.3g}" if v == 0 or abs(v) >= 0.01 else f"{v:.2e}")
    axes.xaxis.set_minor_formatter(NullFormatter())
    if len(values) <= 8:
        axes.set_xticks(values)
        if len(values) > 4:
            axes.tick_params(axis="x", labelrotation=30)
    else:
        axes.xaxis.set_major_locator(MaxNLocator(5))
    axes.xaxis.set_major_formatter(compact)


def overlap_heatmap(matrix, categories: Sequence[str], title: str, path: str | Path) -> Path:
    """One 6x6 ISN overlap matrix (mean pairwise Jaccard of per-instruction ISN sets)."""
    return heatmaps({title: np.asarray(matrix)}, categories, path, "mean pairwise Jaccard of ISN sets")


def layer_profile_plot(profiles: dict[str, list[int]], title: str, path: str | Path) -> Path:
    """ISN count per layer, one line per category."""
    layers = range(len(next(iter(profiles.values()))))
    return lines(layers, {title: profiles}, path, ("layer", "ISN count"), x_scale="integer")


def category_colours(categories: Sequence[str]) -> dict[str, str]:
    """One colour per category, the same in every panel of a figure."""
    return {category: f"C{index}" for index, category in enumerate(categories)}


def drift(
    steps: Sequence[int],
    jaccard: dict[float, dict[str, Sequence[float]]],
    chance: dict[float, Sequence[float]],
    stability: dict[float, float],
    loss: dict[str, Sequence[float | None]],
    path: str | Path,
) -> Path:
    """``drift_plot`` saved to ``path``."""
    drift_plot(steps, jaccard, chance, stability, loss).savefig(path)
    return Path(path)


def drift_plot(
    steps: Sequence[int],
    jaccard: dict[float, dict[str, Sequence[float]]],
    chance: dict[float, Sequence[float]],
    stability: dict[float, float],
    loss: dict[str, Sequence[float | None]],
) -> Figure:
    """ISN drift and capability on one page-wide figure. Top row: per epsilon, each category's ISN
    Jaccard against step 0 on the full 0-1 axis, with the chance level (mean over categories, per
    step, dashed) and the split-half stability at step 0 (mean over categories, dotted). Bottom row:
    each category's held-out response loss, in the same colours (omitted without it)."""
    categories = list(next(iter(jaccard.values())))
    colours = category_colours(categories)
    rows = 2 if loss else 1
    figure = Figure(figsize=(12, 3.9 * rows + 0.6), dpi=100, layout="constrained")
    grid = figure.add_gridspec(rows, len(jaccard))
    first = None
    for column, (epsilon, series) in enumerate(jaccard.items()):
        axes = figure.add_subplot(grid[0, column], sharey=first)
        first = first or axes
        for category, values in series.items():
            axes.plot(steps, values, marker="o", markersize=3, color=colours[category], label=category)
        axes.plot(steps, chance[epsilon], linestyle="--", color="grey", label="chance (mean of categories)")
        if epsilon in stability:
            axes.axhline(
                stability[epsilon], linestyle=":", color="black", label="split-half stability, step 0 (mean)"
            )
        axes.set_ylim(0, 1.02)
        axes.set_title(f"ISN Jaccard vs step 0, eps={epsilon:g}", fontsize=10)
        axes.set_xlabel("training step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if column == 0:
            axes.set_ylabel("Jaccard (0-1, full axis)")
    handles, labels = first.get_legend_handles_labels()
    if loss:
        axes = figure.add_subplot(grid[1, :])
        for category, values in loss.items():
            points = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", markersize=3, color=colours[category])
        axes.set_title("Held-out response loss (instructions never trained on)", fontsize=10)
        axes.set_xlabel("training step")
        axes.set_ylabel("nats/token")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    figure.legend(handles, labels, loc="outside right upper", fontsize=9)
    return figure


def zoomed_lines(
    x: Sequence[int],
    series: dict[str, Sequence[float]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str,
) -> tuple[Path, tuple[float, float]]:
    """One panel, page-wide, with its y axis fitted to the data rather than to the measure's range:
    the axis label says so and gives the range, and the range is returned for the caption."""
    colours = category_colours(list(series))
    values = [v for line in series.values() for v in line if v == v]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    margin = max(0.1 * (high - low), 1e-4)
    low, high = low - margin, high + margin
    figure = Figure(figsize=(12, 3.8), dpi=100, layout="constrained")
    axes = figure.subplots()
    for name, line in series.items():
        axes.plot(list(x), list(line), marker="o", markersize=3, color=colours[name], label=name)
    axes.set_ylim(low, high)
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(f"{ylabel}\n(axis zoomed to {low:.3f}-{high:.3f})")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize=9)
    figure.savefig(path)
    return Path(path), (low, high)
