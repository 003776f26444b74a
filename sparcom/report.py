"""Figures, tables and the self-contained HTML report.

Figures use matplotlib's object API (no pyplot): no global state, safe off the main thread.
"""

from __future__ import annotations

import base64
import csv
import html
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure


def heatmap(matrix: torch.Tensor, labels: list[str], title: str, path: str | Path, colorbar: str,
            row_labels: list[str] | None = None, diverging: bool = False) -> Path:  # fmt: skip
    """Save an annotated ``[R, C]`` heatmap with a colour bar (diverging maps are centred on 0)."""
    values = matrix.double()
    figure = Figure(figsize=(6.6, 5.4), dpi=120)
    axes = figure.subplots()
    if diverging:
        limit = max(float(values.abs().max()), 1e-9)
        image = axes.imshow(values.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
    else:
        image = axes.imshow(values.numpy(), cmap="viridis", vmin=0, vmax=max(float(values.max()), 1e-9))
    axes.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    axes.set_yticks(range(len(row_labels or labels)), row_labels or labels)
    axes.set_title(title)
    low, high = image.get_clim()
    for a in range(values.shape[0]):
        for b in range(values.shape[1]):
            value = float(values[a, b])
            shade = (value - low) / max(high - low, 1e-12)
            dark_background = (0.25 < shade < 0.75) if diverging else shade < 0.6
            colour = "white" if dark_background and not diverging else "black"
            axes.text(b, a, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
    figure.colorbar(image, ax=axes, label=colorbar)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def overlap_heatmap(matrix: torch.Tensor, categories: list[str], title: str, path: str | Path) -> Path:
    """The 6x6 ISN overlap matrix (mean pairwise Jaccard of per-instruction ISN sets)."""
    return heatmap(matrix, categories, title, path, colorbar="mean pairwise Jaccard of ISN sets")


def lines(x: Sequence[float], series: dict[str, Sequence[float]], title: str, xlabel: str, ylabel: str,
          path: str | Path, panels: dict[str, dict[str, Sequence[float]]] | None = None) -> Path:  # fmt: skip
    """Save one line per series; with ``panels``, one subplot per panel sharing the y axis."""
    panels = panels or {title: series}
    figure = Figure(figsize=(6.4 * len(panels) if len(panels) > 1 else 6.4, 4.2), dpi=120)
    axes_list = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for axes, (panel_title, panel) in zip(axes_list, panels.items(), strict=True):
        for name, values in panel.items():
            axes.plot(list(x), list(values), marker="o", markersize=3, label=name)
        axes.set_title(panel_title)
        axes.set_xlabel(xlabel)
        axes.grid(alpha=0.3)
    axes_list[0].set_ylabel(ylabel)
    axes_list[-1].legend(fontsize=8)
    if len(panels) > 1:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def layer_profile_plot(profiles: dict[str, list[int]], title: str, path: str | Path) -> Path:
    """ISN count per layer, one line per category."""
    layers = range(len(next(iter(profiles.values()))))
    return lines(layers, profiles, title, "layer", "ISN count", path)


def markdown_table(rows: list[list[object]], header: list[str]) -> str:
    lines_ = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines_ + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows])


def write_table(rows: list[list[object]], header: list[str], stem: Path) -> tuple[Path, Path]:
    """Write a table as ``stem.csv`` and ``stem.md``."""
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    stem.with_suffix(".md").write_text(markdown_table(rows, header) + "\n")
    return stem.with_suffix(".csv"), stem.with_suffix(".md")


def _cell(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------ HTML

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.9em; color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; } .grid figure { flex: 1 1 480px; }
.table-wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f4f4; }
.note { background: #f8f8f0; border-left: 4px solid #cc9; padding: 0.5em 1em; }
"""


def html_table(rows: list[list[object]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def html_figure(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    alt = html.escape(caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'
    )


def write_html(path: str | Path, title: str, sections: list[tuple[str, list[str]]]) -> Path:
    """One self-contained page: every figure embedded, no external file or network request."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]  # fmt: skip
    for heading, blocks in sections:
        parts.append(f"<section><h2>{html.escape(heading)}</h2>{''.join(blocks)}</section>")
    parts.append("</body></html>")
    Path(path).write_text("".join(parts), encoding="utf-8")
    return Path(path)
