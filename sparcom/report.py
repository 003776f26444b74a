"""Renderings of results: CSV and Markdown tables, figures, summary.json and self-contained HTML
pages, plus the index page of an analysis folder. Results come in as typed objects
(``sparcom.comparison.Comparison``); nothing here computes a statistic."""

from __future__ import annotations

import base64
import csv
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparcom import figures
from sparcom.comparison import SIDES, Comparison
from sparcom.findings import findings

PAGE = "report.html"


@dataclass(frozen=True)
class Table:
    """A table as data: written as ``<name>.csv`` and ``<name>.md``, and shown in the page."""

    name: str
    header: list[str]
    rows: list[list]

    def write(self, folder: Path) -> None:
        with open(folder / f"{self.name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.header)
            writer.writerows([["" if v is None else v for v in row] for row in self.rows])
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        (folder / f"{self.name}.md").write_text("\n".join(lines) + "\n")

    def html(self, shown: list[list] | None = None) -> str:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>"
            for row in shown or self.rows
        )
        return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return (
            "nan"
            if value != value
            else f"{value:.3f}"
            if abs(value) >= 0.01 or value == 0
            else f"{value:.2e}"
        )
    if isinstance(value, tuple):
        return f"[{cell(value[0])}, {cell(value[1])}]"
    return str(value)


# ------------------------------------------------------------------------------- comparison


def comparison_tables(c: Comparison) -> list[Table]:
    """The comparison's tables: one row per category and epsilon (tidy), for machines and people."""
    ci = ("ci95_low", "ci95_high")
    rows = [
        [category, epsilon, e.value, *(e.ci95 or (None, None)), e.chance, e.stability_base, e.stability_tuned]
        for epsilon in c.settings.epsilons
        for category, e in ((k, c.isn_jaccard[k][epsilon]) for k in c.isn_jaccard)
    ]
    tables = [
        Table(
            "isn_jaccard",
            ["category", "epsilon", "jaccard", *ci, "chance", "stability_base", "stability_tuned"],
            rows,
        )
    ]
    if c.ise_pearson is not None:
        rows = [[category, e.value, *(e.ci95 or (None, None))] for category, e in c.ise_pearson.items()]
        tables.append(Table("ise_pearson", ["category", "pearson_r", *ci], rows))
    rows = [
        [category, *[c.isn_counts[side][category][i] for side in SIDES for i in (0, 1)]]
        for category in c.categories
    ]
    rows.append(["general (all categories)", c.general["base"], None, c.general["tuned"], None])
    tables.append(
        Table("general_unique", ["category", "isns_base", "unique_base", "isns_tuned", "unique_tuned"], rows)
    )
    rows = [
        [side, category, *p.counts, p.margin, *(p.ci95 or (None, None)), p.three_phase]
        for side, profiles in c.layer_profile.items()
        for category, p in profiles.items()
    ]
    layers = [f"layer_{i}" for i in range(len(next(iter(c.layer_profile["base"].values())).counts))]
    tables.append(Table("layer_profile", ["side", "category", *layers, "margin", *ci, "three_phase"], rows))
    if c.overlap is not None and c.overlap["base"].per_category is not None:
        rows = [
            [side, category, t.statistic, t.p_value, t.p_holm]
            for side, o in c.overlap.items()
            for category, t in o.per_category.items()
        ]
        rows += [
            [
                side,
                "all (diagonal - off-diagonal)",
                o.diagonal_dominance.statistic,
                o.diagonal_dominance.p_value,
                None,
            ]
            for side, o in c.overlap.items()
        ]
        tables.append(
            Table("uniqueness_tests", ["side", "category", "within_minus_between", "p_value", "p_holm"], rows)
        )
    return tables


def write_comparison(c: Comparison, out: Path) -> Path:
    """Tables, figures, summary.json and report.html of a comparison in ``out``."""
    tables_dir, figures_dir = out / "tables", out / "figures"
    tables_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(exist_ok=True)
    tables = {t.name: t for t in comparison_tables(c)}
    for table in tables.values():
        table.write(tables_dir)
    (out / "summary.json").write_text(
        json.dumps(c.summary() | {"findings": findings(c)}, indent=2, default=str)
    )

    epsilon = c.settings.overlap_epsilon
    sections = [
        (
            "Findings",
            ['<ul class="findings">' + "".join(f"<li>{html.escape(s)}</li>" for s in findings(c)) + "</ul>"],
        )
    ]
    blocks = [tables["isn_jaccard"].html()]
    if c.ise_pearson is not None:
        blocks.append(tables["ise_pearson"].html())
    blocks.append(
        '<p class="note">Chance: the Jaccard of random sets of the same sizes in each site. Stability: '
        "the Jaccard between ISN sets of two disjoint halves of a category's instructions, one model; "
        "an alteration below it moved the ISNs more than swapping half the instructions does.</p>"
    )
    sections.append(("Alteration: base vs tuned (the paper's Tables 1 and 2)", blocks))

    path = figures.lines(
        c.settings.sweep_epsilons,
        {"ISN Jaccard, base vs tuned": c.sweep},
        figures_dir / "epsilon_sweep.png",
        "epsilon",
        "Jaccard",
        reference=("chance (mean)", c.sweep_chance),
        ylim=(0, 1.02),
    )
    sections.append(
        (
            "Epsilon sweep, from the stored counts",
            [_figure(path, "ISN Jaccard base vs tuned at every epsilon")],
        )
    )

    sections.append((f"General and unique ISNs (eps={epsilon:g})", [tables["general_unique"].html()]))

    profiles = {
        f"{side} ({_side_text(c, side)})": {k: p.counts for k, p in c.layer_profile[side].items()}
        for side in SIDES
    }
    layers = range(len(c.layer_profile["base"][c.categories[0]].counts))
    title = f"ISNs per layer (eps={epsilon:g})"
    path = figures.lines(
        layers, profiles, figures_dir / "layer_profile.png", "layer", "ISN count", title, integer_x=True
    )
    phase_rows = [
        [side, k, p.margin, p.ci95, "yes" if p.three_phase else "no"]
        for side in SIDES
        for k, p in c.layer_profile[side].items()
    ]
    phase = Table(
        "", ["side", "category", "margin min(early, late) - middle", "95% CI", "three-phase"], phase_rows
    )
    sections.append(
        (
            "Layer profile",
            [_figure(path, "ISN count per layer and category, base and tuned, one y axis"), phase.html()],
        )
    )

    if c.overlap is not None:
        sections.append(
            ("Generality and uniqueness: overlap matrices", _overlap_blocks(c, figures_dir, tables))
        )
    elif "overlap" in c.notes:
        sections.append(
            (
                "Generality and uniqueness",
                [f'<p class="note">Not shown: {html.escape(c.notes["overlap"])}.</p>'],
            )
        )
    if c.drift and len(c.drift) > 1:
        sections.append(("Drift over training", [_drift_figures(c, figures_dir)]))
    return write_page(out / PAGE, _title(c), sections, header=_header(c))


def _overlap_blocks(c: Comparison, figures_dir: Path, tables: dict[str, Table]) -> list[str]:
    epsilon = c.settings.overlap_epsilon
    marks = None
    if c.overlap["base"].per_category is not None:
        marks = {
            f"{side}": np.diag([c.overlap[side].per_category[k].p_holm < 0.05 for k in c.categories])
            for side in SIDES
        }
    panels = {side: np.asarray(c.overlap[side].matrix) for side in SIDES}
    path = figures.heatmaps(
        panels,
        c.categories,
        figures_dir / "overlap.png",
        "mean pairwise Jaccard of ISN sets",
        f"ISN overlap between categories (eps={epsilon:g})",
        marks=marks,
    )
    caption = "Mean pairwise Jaccard of per-instruction ISN sets; base and tuned on one colour scale"
    if marks is not None:
        caption += (
            "; outlined: within-category overlap above between-category overlap (Holm-adjusted p < 0.05)"
        )
    blocks = [_figure(path, caption)]
    if "uniqueness_tests" in tables:
        blocks.append(tables["uniqueness_tests"].html())
    if c.token_overlap is not None:
        path = figures.heatmaps(
            {"token sets": np.asarray(c.token_overlap)},
            c.categories,
            figures_dir / "token_overlap.png",
            "mean pairwise Jaccard of token sets",
            "Vocabulary overlap between categories",
        )
        blocks.append(
            _figure(path, "Token-overlap control: the same statistic on the instructions' token sets")
        )
        for side, control in c.token_control.items():
            text = (
                f"{side}: the ISN and vocabulary overlap matrices correlate at r = {control.correlation:.3f}."
            )
            if control.verdict:
                text += " " + control.verdict
            blocks.append(f'<p class="note">{html.escape(text)}</p>')
    return blocks


def _drift_figures(c: Comparison, figures_dir: Path) -> str:
    steps = [p.step for p in c.drift]
    panels = {
        f"eps={e:g}": {k: [p.isn_jaccard["base"][e][k] for p in c.drift] for k in c.categories}
        for e in c.drift[0].isn_jaccard["base"]
    }
    path = figures.lines(
        steps,
        panels,
        figures_dir / "drift_isn.png",
        "training step",
        "ISN Jaccard vs step 0",
        "ISN drift over training",
        integer_x=True,
        ylim=(0, 1.02),
    )
    blocks = [_figure(path, "ISN Jaccard of each category's set against the base model, per epsilon")]
    if c.drift[0].ise_pearson:
        series = {k: [p.ise_pearson["base"][k] for p in c.drift] for k in c.categories}
        path = figures.lines(
            steps,
            {"ISE Pearson vs step 0": series},
            figures_dir / "drift_ise.png",
            "training step",
            "Pearson r",
            integer_x=True,
        )
        blocks.append(_figure(path, "Expert-frequency correlation with the base model over training"))
    return '<div class="grid">' + "".join(blocks) + "</div>"


def _side_text(c: Comparison, side: str) -> str:
    info = getattr(c, side)
    return info.label + (f", step {info.step}" if info.step is not None else "")


def _title(c: Comparison) -> str:
    return f"SPARCOM: {_side_text(c, 'base')} vs {_side_text(c, 'tuned')}"


def _header(c: Comparison) -> str:
    """What was compared: both sides, the run's settings, the probe, selection and statistics."""
    s = c.settings
    instructions = sorted(set(s.instructions.values()))
    rows = [
        ("base", f"{_side_text(c, 'base')} — model {c.base.model}"),
        ("tuned", f"{_side_text(c, 'tuned')} — model {c.tuned.model}"),
    ]
    if s.run:
        rows.append(("training run", ", ".join(f"{k} {v}" for k, v in s.run.items())))
    per_category = instructions[0] if len(instructions) == 1 else f"{instructions[0]}-{instructions[-1]}"
    rows += [
        (
            "probe",
            f"{sum(s.instructions.values())} instructions ({per_category} per category), {s.token_scope} tokens"
            + (
                ": each model counted on its own greedy continuation, so the tokens differ between the two"
                if s.token_scope == "generated"
                else ""
            ),
        ),
        (
            "selection",
            f"{s.selection_mode}, epsilons {', '.join(f'{e:g}' for e in s.epsilons)}; "
            f"overlap, profiles and counts at {s.overlap_epsilon:g}",
        ),
        (
            "statistics",
            ", ".join(f"{k} {v}" for k, v in s.statistics.items()) if s.statistics else "not computed",
        ),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="header">{body}</table>'


# ------------------------------------------------------------------------------------ pages

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1180px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.9em; color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; } .grid figure { flex: 1 1 480px; }
.table-wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f4f4; }
table.header th { background: #f4f4f4; text-align: left; } table.header td { text-align: left; white-space: normal; }
.note { background: #f8f8f0; border-left: 4px solid #cc9; padding: 0.5em 1em; }
.findings li { margin: 0.4em 0; line-height: 1.4; }
"""


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    alt = html.escape(caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'
    )


def write_page(path: Path, title: str, sections: list[tuple[str, list[str]]], header: str = "") -> Path:
    """One self-contained page: every figure embedded, no external file or network request."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{header}",
    ]
    for heading, blocks in sections:
        parts.append(f"<section><h2>{html.escape(heading)}</h2>{''.join(blocks)}</section>")
    parts.append("</body></html>")
    Path(path).write_text("".join(parts), encoding="utf-8")
    return Path(path)


def write_index(root: Path) -> Path:
    """``index.html`` of an analysis folder: a link to every report below it, by mode."""
    reports = sorted(p for p in root.rglob(PAGE))
    items = "".join(
        f'<li><a href="{html.escape(str(p.relative_to(root)))}">{html.escape(str(p.parent.relative_to(root)))}</a></li>'
        for p in reports
    )
    return write_page(root / "index.html", f"sparcom analysis: {root}", [("Reports", [f"<ul>{items}</ul>"])])


# ---------------------------------------------------------------------------------- ablation


def write_ablation(
    result: dict, categories: list[str], out: Path, *, model: str, epsilon: float, held_out: bool
) -> Path:
    """The causal check: loss changes with each category's ISNs zeroed, against random-neuron draws."""
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    rows = [f"zero {k} ({n})" for k, n in zip(categories, result["neurons"], strict=True)]
    matrices = {
        "isn_delta": result["delta"],
        "control_mean": result["control"],
        "control_sd": result["control_sd"],
        "z": result["z"],
    }
    for name, matrix in matrices.items():
        Table(
            f"ablation_{name}",
            ["zeroed", *categories],
            [[r, *v] for r, v in zip(rows, matrix.tolist(), strict=True)],
        ).write(out / "tables")
    intact = Table(
        "intact_loss",
        ["category", "loss (nats/token)"],
        [[k, float(v)] for k, v in zip(categories, result["intact"], strict=True)],
    )
    intact.write(out / "tables")
    dominance = result["dominance"]
    summary = {
        "model": model,
        "epsilon": epsilon,
        "held_out": held_out,
        "categories": categories,
        "neurons": result["neurons"],
        "intact_loss": [float(v) for v in result["intact"]],
        **{name: m.tolist() for name, m in matrices.items()},
        "dominance": dominance,
    }
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    changes = figures.heatmaps(
        {"ISNs zeroed": result["delta"].numpy(), "random neurons (mean of draws)": result["control"].numpy()},
        categories,
        out / "figures" / "loss_change.png",
        "response-loss change (nats/token)",
        "Loss change when a category's neurons are zeroed",
        row_labels=rows,
        diverging=True,
    )
    marks = {"z": np.diag(dominance["rows"])}
    z = figures.heatmaps(
        {"z": result["z"].numpy()},
        categories,
        out / "figures" / "z.png",
        "z-score against the random-neuron draws",
        "ISN loss change in control SDs",
        row_labels=rows,
        diverging=True,
        marks=marks,
    )
    sections = [
        ("Verdict", [f'<p class="note">{html.escape(dominance["verdict"])}</p>']),
        (
            "Loss changes",
            [
                _figure(
                    changes,
                    "Rows: whose neurons are zeroed (their count); columns: evaluated category. One colour scale.",
                ),
                _figure(z, "Outlined: rows where the diagonal passes the rule"),
            ],
        ),
        ("Intact response loss", [intact.html()]),
    ]
    setting = (
        f"<p>Model {html.escape(model)}; ISNs at eps={epsilon:g}; loss on "
        + (
            "held-out instructions (not used to select the ISNs)"
            if held_out
            else "instructions that include the probe set"
        )
        + f"; {len(result['control_draws'])} random-neuron draws per row with the same per-site counts.</p>"
    )
    return write_page(out / PAGE, f"SPARCOM ablation: {model}", sections, header=setting)


def write_steering(
    rows: list[dict], figure_paths: dict, out: Path, *, model: str, epsilon: float, control_draws: int
) -> Path:
    """The dose-response page: per steered category, the loss change on every category against scale."""
    own = [r for r in rows if r["steered"] == r["evaluated"]]
    table = Table(
        "",
        ["steered = evaluated", "scale", "loss change", "control mean", "control SD"],
        [[r["steered"], r["scale"], r["loss_delta"], r["control_mean"], r["control_sd"]] for r in own],
    )
    figures_html = "".join(
        _figure(path, f"{name} ISNs scaled; bold: the loss on {name} itself; one y-scale for every category")
        for name, path in figure_paths.items()
    )
    setting = (
        f"<p>Model {html.escape(model)}; ISNs at eps={epsilon:g}; the response loss on held-out instructions "
        f"of every category; dashed lines and bands: {control_draws} random-neuron sets of the same per-site "
        "sizes (mean, 1 SD). All rows are in dose_response.csv.</p>"
    )
    sections = [
        ("Dose response", [f'<div class="grid">{figures_html}</div>']),
        ("On the steered category", [table.html()]),
    ]
    return write_page(out / PAGE, f"SPARCOM steering: {model}", sections, header=setting)
