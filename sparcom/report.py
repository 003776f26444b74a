"""Figures and tables. Matplotlib with the Agg backend, so it works on headless machines."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

# Figures are built with the object API (no pyplot): no global state, safe off the main thread.


def overlap_heatmap(matrix: torch.Tensor, categories: list[str], title: str, path: str | Path) -> Path:
    """Save a ``[C, C]`` overlap matrix as an annotated heatmap with a colour bar."""
    figure = Figure(figsize=(6.4, 5.4), dpi=120)
    axes = figure.subplots()
    image = axes.imshow(matrix.numpy(), cmap="viridis", vmin=0, vmax=max(float(matrix.max()), 1e-9))
    axes.set_xticks(range(len(categories)), categories, rotation=35, ha="right")
    axes.set_yticks(range(len(categories)), categories)
    axes.set_xlabel("category b")
    axes.set_ylabel("category a")
    axes.set_title(title)
    bright = 0.6 * max(float(matrix.max()), 1e-9)
    for a in range(len(categories)):
        for b in range(len(categories)):
            value = float(matrix[a, b])
            colour = "black" if value > bright else "white"  # readable on viridis' yellow end
            axes.text(b, a, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
    figure.colorbar(image, ax=axes, label="mean pairwise Jaccard of ISN sets")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def layer_profile_plot(profiles: dict[str, list[int]], title: str, path: str | Path) -> Path:
    """Save ISN count per layer, one line per category."""
    figure = Figure(figsize=(6.4, 4.0), dpi=120)
    axes = figure.subplots()
    for category, profile in profiles.items():
        axes.plot(range(len(profile)), profile, marker="o", label=category)
    axes.set_xlabel("layer")
    axes.set_ylabel("ISN count")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def markdown_table(rows: list[list[object]], header: list[str]) -> str:
    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])
