"""Renderings of results: CSV and Markdown tables, figures, summary.json and self-contained HTML
pages, plus the index page of an analysis folder. Results come in as typed objects
(``sparcom.stats.comparison.Comparison``); nothing here computes a statistic."""

from __future__ import annotations

import base64
import csv
import html
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sparcom.report import figures
from sparcom.report.findings import dominance_sentence, findings, token_control_sentence
from sparcom.stats.comparison import SIDES, Comparison

if TYPE_CHECKING:
    from sparcom.edit.ablation import Ablation
    from sparcom.edit.effects import Dominance

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
            writer.writerows([[_csv_cell(v) for v in row] for row in self.rows])
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


def _csv_cell(value: object) -> object:
    """A CSV cell: empty for None, an interval as JSON ``[lo, hi]`` at full precision."""
    if value is None:
        return ""
    return json.dumps(list(value)) if isinstance(value, tuple) else value


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
        [
            category,
            epsilon,
            e.value,
            *(e.ci95 or (None, None)),
            e.chance,
            e.value_half,
            e.stability_base,
            e.stability_tuned,
        ]
        for epsilon in c.settings.epsilons
        for category, e in ((k, c.isn_jaccard[k][epsilon]) for k in c.isn_jaccard)
    ]
    tables = [
        Table(
            "isn_jaccard",
            [
                "category",
                "epsilon",
                "jaccard",
                *ci,
                "chance",
                "jaccard_half",
                "stability_base",
                "stability_tuned",
            ],
            rows,
        )
    ]
    if c.ise_pearson is not None:
        rows = [[category, e.value, *(e.ci95 or (None, None))] for category, e in c.ise_pearson.items()]
        tables.append(Table("ise_pearson", ["category", "pearson_r", *ci], rows))
    if c.unique_isn_jaccard:
        rows = [[k, e.value, e.chance] for k, e in c.unique_isn_jaccard.items()]
        tables.append(Table("unique_isn_jaccard", ["category", "jaccard", "chance"], rows))
    rows = [
        [category, *[c.isn_counts[side][category][i] for side in SIDES for i in (0, 1)]]
        for category in c.categories
    ]
    rows.append(["general (all categories)", c.general["base"], None, c.general["tuned"], None])
    tables.append(
        Table("general_unique", ["category", "isns_base", "unique_base", "isns_tuned", "unique_tuned"], rows)
    )
    rows = [
        [
            side,
            category,
            *p.counts,
            *(p.boundaries or (None, None)),
            p.margin,
            *(p.ci95 or (None, None)),
            p.three_phase,
        ]
        for side, profiles in c.layer_profile.items()
        for category, p in profiles.items()
    ]
    layers = [f"layer_{i}" for i in range(len(next(iter(c.layer_profile["base"].values())).counts))]
    header = [
        "side",
        "category",
        *layers,
        "first_middle_layer",
        "first_late_layer",
        "margin",
        *ci,
        "three_phase",
    ]
    tables.append(Table("layer_profile", header, rows))
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
        "the Jaccard between ISN sets of two disjoint halves of a category's instructions, one model. "
        "jaccard_half: base against tuned with both sets selected on the same half (the stability's halves): "
        "set against the stability at a matched sample size, a jaccard_half below it moved the ISNs more "
        "than swapping the instructions does.</p>"
    )
    sections.append(("Alteration: base vs tuned (the paper's Tables 1 and 2)", blocks))

    path = figures.lines(
        c.settings.sweep_epsilons,
        {"ISN Jaccard, base vs tuned": c.sweep},
        figures_dir / "epsilon_sweep.png",
        ("epsilon", "Jaccard"),
        reference=("chance (mean)", c.sweep_chance),
        ylim=(0, 1.02),
    )
    caption = (
        "ISN Jaccard of base and tuned at every epsilon, computed from the stored counts. Dashed: chance, the "
        "Jaccard of random sets of the same per-site sizes (mean of the categories); it follows the set sizes, "
        "not any agreement between the models: near 1 where the sets hold most of each site's neurons (low "
        "epsilon), falling as they shrink, and rising again where the remaining ISNs crowd into a few sites "
        "(random sets confined to a small part of the model overlap more)."
    )
    if "epsilon_sweep" in c.notes:
        caption += " Gaps: " + c.notes["epsilon_sweep"] + "."
    sections.append(("Epsilon sweep, from the stored counts", [_figure(path, caption)]))

    blocks = [tables["general_unique"].html()]
    if "unique_isn_jaccard" in tables:
        blocks += [
            '<p class="note">The unique ISNs of each category, base against tuned (point estimates; the '
            "chance level is that of random sets of the unique sets' per-site sizes):</p>",
            tables["unique_isn_jaccard"].html(),
        ]
    sections.append((f"General and unique ISNs (eps={epsilon:g})", blocks))

    profiles = {
        f"{side} ({_side_text(c, side)})": {k: p.counts for k, p in c.layer_profile[side].items()}
        for side in SIDES
    }
    layers = range(len(c.layer_profile["base"][c.categories[0]].counts))
    title = f"ISNs per layer (eps={epsilon:g})"
    path = figures.lines(
        layers, profiles, figures_dir / "layer_profile.png", ("layer", "ISN count"), title, "integer"
    )
    phase_rows = [
        [
            side,
            k,
            *(_phase_layers(p) if p.boundaries else ("–", "–", "–")),
            p.margin,
            p.ci95,
            "yes" if p.three_phase else "no",
        ]
        for side in SIDES
        for k, p in c.layer_profile[side].items()
    ]
    phase = Table(
        "",
        [
            "side",
            "category",
            "early layers",
            "middle layers",
            "late layers",
            "margin min(early, late) - middle",
            "95% CI",
            "three-phase",
        ],
        phase_rows,
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
        sections.append(("Drift over training", _drift_figures(c, figures_dir)))
    mean = c.isn_jaccard["mean"].get(c.settings.overlap_epsilon) or next(iter(c.isn_jaccard["mean"].values()))
    description = (
        f"comparison: {_side_text(c, 'base')} vs {_side_text(c, 'tuned')}, {sum(c.settings.instructions.values())} "
        f"instructions; mean ISN Jaccard {cell(mean.value)} (chance {cell(mean.chance)})"
    )
    return write_page(out / PAGE, _title(c), sections, header=_header(c), description=description)


def _phase_layers(p) -> tuple[str, str, str]:
    """The three segments' layers, mean ISNs per layer, and the boundaries' intervals."""
    a, b = p.boundaries
    last = len(p.counts) - 1
    early, middle, late = p.means
    where = ""
    if p.boundaries_ci:
        (a_lo, a_hi), (b_lo, b_hi) = p.boundaries_ci
        where = f" (starts {a_lo:.0f}-{a_hi:.0f})"
    late_where = (
        f" (starts {p.boundaries_ci[1][0]:.0f}-{p.boundaries_ci[1][1]:.0f})" if p.boundaries_ci else ""
    )
    return (
        f"0-{a - 1}: {early:.1f}",
        f"{a}-{b - 1}: {middle:.1f}{where}",
        f"{b}-{last}: {late:.1f}{late_where}",
    )


def _overlap_blocks(c: Comparison, figures_dir: Path, tables: dict[str, Table]) -> list[str]:
    epsilon = c.settings.overlap_epsilon
    marks = None
    if c.overlap["base"].per_category is not None:
        marks = {
            f"{side}": np.diag([c.overlap[side].per_category[k].significant for k in c.categories])
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
            "; outlined: within-category overlap above between-category overlap "
            f"(Holm-adjusted p < {c.settings.statistics['alpha']:g})"
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
            if control.survives is not None:
                text += " " + token_control_sentence(control, c.settings.statistics["permutations"])
            blocks.append(f'<p class="note">{html.escape(text)}</p>')
    return blocks


def _drift_figures(c: Comparison, figures_dir: Path) -> list[str]:
    """The drift of a run, page-wide: ISN Jaccard against step 0 per epsilon with its chance level and
    sampling stability, the held-out loss below it; ISE Pearson (MoE models) on its own zoomed axis."""
    steps = [p.step for p in c.drift]
    epsilons = list(c.drift[0].isn_jaccard["base"])
    jaccard = {e: {k: [p.isn_jaccard["base"][e][k] for p in c.drift] for k in c.categories} for e in epsilons}
    chance = {e: [_mean_of(p.isn_chance[e].values()) for p in c.drift] for e in epsilons}
    stability = {e: _mean_of(values.values()) for e, values in c.drift[0].isn_stability.items()}
    loss = {k: [p.held_out_loss.get(k) for p in c.drift] for k in c.categories}
    measured = any(v is not None for values in loss.values() for v in values)
    path = figures.drift(
        steps, jaccard, chance, stability, loss if measured else {}, figures_dir / "drift_isn.png"
    )
    caption = (
        "Top: each category's ISN set against its step-0 set (1 = unchanged), on the full 0-1 axis; dashed: chance, "
        "the Jaccard that random sets of the same per-site sizes would have (mean of the categories); dotted: "
        "the split-half stability at step 0, the Jaccard between sets selected on two disjoint halves of the "
        "probe instructions (mean of the categories): how far sampling alone moves the sets. It is measured on "
        "half the probe, so set it against the alteration on the same halves (jaccard_half in the table above), "
        "not against these full-probe curves."
    )
    if measured:
        caption += (
            " Bottom: response loss on the held-out instructions, never trained on, in the same colours."
        )
    blocks = [_figure(path, caption)]
    if c.drift[0].ise_pearson:
        series = {k: [p.ise_pearson["base"][k] for p in c.drift] for k in c.categories}
        path, (low, high) = figures.zoomed_lines(
            steps,
            series,
            figures_dir / "drift_ise.png",
            "training step",
            "Pearson r vs step 0",
            "Expert-frequency correlation with the base model",
        )
        blocks.append(
            _figure(
                path,
                f"Pearson r of each category's expert frequencies against step 0. The axis is zoomed to "
                f"{low:.3f}-{high:.3f} (r can range from -1 to 1): differences this small look large here.",
            )
        )
    return blocks


def _mean_of(values) -> float:
    defined = [v for v in values if v is not None and v == v]
    return sum(defined) / len(defined) if defined else float("nan")


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
nav.contents { background: #f7f7f7; padding: 0.5em 1em; columns: 3; font-size: 0.9em; }
nav.contents ul { margin: 0.3em 0; padding-left: 1.2em; }
td.wrap, th.wrap { white-space: normal; text-align: left; }
"""


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    alt = html.escape(caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'
    )


def write_page(
    path: Path,
    title: str,
    sections: list[tuple[str, list[str]]],
    header: str = "",
    description: str = "",
    contents: bool = False,
) -> Path:
    """One self-contained page: every figure embedded, no external file or network request.
    ``description``: one line on what the page holds (the index page lists it); ``contents``: a table
    of contents linking every section (for long pages)."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f'<meta name="description" content="{html.escape(description)}">',
        f'<meta name="created" content="{time.strftime("%Y-%m-%d %H:%M")}">',
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{header}",
    ]
    anchors = [f"section-{index}" for index in range(len(sections))]
    if contents and sections:
        links = "".join(
            f'<li><a href="#{anchor}">{html.escape(heading)}</a> ({_count_of(blocks)})</li>'
            for anchor, (heading, blocks) in zip(anchors, sections, strict=True)
        )
        parts.append(f'<nav class="contents"><b>Contents</b><ul>{links}</ul></nav>')
    for anchor, (heading, blocks) in zip(anchors, sections, strict=True):
        parts.append(f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>{"".join(blocks)}</section>')
    parts.append("</body></html>")
    Path(path).write_text("".join(parts), encoding="utf-8")
    return Path(path)


def _count_of(blocks: list[str]) -> str:
    return f"{len(blocks)} item{'s' if len(blocks) != 1 else ''}"


_META = re.compile(r'<meta name="(description|created)" content="([^"]*)">')


def write_index(root: Path) -> Path:
    """``index.html`` of an analysis folder: every report below it, with what it holds and when it
    was written (from the page's own description), newest first within each mode."""
    reports = sorted(root.rglob(PAGE), key=lambda p: p.stat().st_mtime, reverse=True)
    rows = []
    for report in reports:
        meta = dict(_META.findall(report.read_text(encoding="utf-8", errors="replace")[:4000]))
        where = str(report.parent.relative_to(root))
        rows.append(
            f'<tr><td><a href="{html.escape(str(report.relative_to(root)))}">{html.escape(where)}</a></td>'
            f'<td class="wrap">{meta.get("description", "") or "–"}</td><td>{meta.get("created", "") or "–"}</td></tr>'
        )
    table = (
        '<div class="table-wrap"><table><thead><tr><th>report</th><th class="wrap">what it holds</th><th>written</th></tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table></div>"
        if rows
        else '<p class="note">No report here yet.</p>'
    )
    return write_page(root / "index.html", f"sparcom analysis: {root}", [("Reports", [table])])


# ---------------------------------------------------------------------------------- ablation


ISN_SET_TEXT = {
    "frequent": "ISNs (every neuron that fires often on the category)",
    "unique": "unique ISNs (ISNs of no other category)",
}


def write_ablation(
    result: Ablation,
    categories: list[str],
    out: Path,
    *,
    model: str,
    epsilon: float,
    held_out: bool,
    isn_set: str = "frequent",
    total_neurons: int | None = None,
) -> Path:
    """The causal check: loss changes with each category's ISNs zeroed, against random-neuron draws.
    Each row says how many neurons it silences, and what share of the model's that is."""
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    share = (lambda n: f", {100 * n / total_neurons:.1f}%") if total_neurons else (lambda n: "")
    rows = [f"zero {k} ({n}{share(n)})" for k, n in zip(categories, result.neurons, strict=True)]
    matrices = {
        "isn_delta": result.delta,
        "control_mean": result.control,
        "control_sd": result.control_sd,
        "z": result.z,
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
        [[k, float(v)] for k, v in zip(categories, result.intact, strict=True)],
    )
    intact.write(out / "tables")
    dominance, verdict = result.dominance, dominance_sentence(result.dominance)
    summary = {
        "model": model,
        "epsilon": epsilon,
        "isn_set": isn_set,
        "total_neurons": total_neurons,
        "held_out": held_out,
        "categories": categories,
        "neurons": result.neurons,
        "intact_loss": [float(v) for v in result.intact],
        **{name: m.tolist() for name, m in matrices.items()},
        "dominance": asdict(dominance) | {"verdict": verdict},
    }
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    changes = figures.heatmaps(
        {"ISNs zeroed": result.delta.numpy(), "random neurons (mean of draws)": result.control.numpy()},
        categories,
        out / "figures" / "loss_change.png",
        "response-loss change (nats/token)",
        "Loss change when a category's neurons are zeroed",
        row_labels=rows,
        diverging=True,
    )
    marks = {"z": np.diag(dominance.rows)}
    z = figures.heatmaps(
        {"z": result.z.numpy()},
        categories,
        out / "figures" / "z.png",
        "z-score against the random-neuron draws",
        "ISN loss change in control SDs",
        row_labels=rows,
        diverging=True,
        marks=marks,
    )
    sections = [
        ("Verdict", [f'<p class="note">{html.escape(verdict)}</p>']),
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
        f"<p>Model {html.escape(model)}; {ISN_SET_TEXT[isn_set]} at eps={epsilon:g}"
        + (f", out of {total_neurons:,} FFN and expert neurons" if total_neurons else "")
        + "; loss on "
        + (
            "held-out instructions (not used to select the ISNs)"
            if held_out
            else "instructions that include the probe set"
        )
        + f"; {len(result.control_draws)} random-neuron draws per row with the same per-site counts.</p>"
    )
    description = f"ablation: each category's ISNs (eps={epsilon:g}) zeroed; " + verdict.split(":")[0]
    return write_page(
        out / PAGE, f"SPARCOM ablation: {model}", sections, header=setting, description=description
    )


def write_steering(
    rows: list[dict],
    figure_paths: dict,
    verdicts: dict[float, Dominance],
    out: Path,
    *,
    model: str,
    epsilon: float,
    held_out: bool,
    isn_set: str = "frequent",
) -> Path:
    """The dose-response page: per scale, the verdict and the z-score matrix (steered x evaluated);
    per steered category, the loss change on every category against scale. ``held_out``: whether
    the loss was measured on instructions the snapshot that selected the ISNs never saw."""
    steered = list(dict.fromkeys(r["steered"] for r in rows))
    evaluated = list(dict.fromkeys(r["evaluated"] for r in rows))
    panels = {}
    for scale in verdicts:
        z = np.full((len(steered), len(evaluated)), np.nan)
        for r in rows:
            if r["scale"] == scale:
                z[steered.index(r["steered"]), evaluated.index(r["evaluated"])] = r["z"]
        panels[f"scale {scale:g}"] = z
    z_path = figures.heatmaps(
        panels,
        evaluated,
        out / "figures" / "z.png",
        "z-score against the random-neuron draws",
        "Loss change in control SDs, per scale",
        row_labels=[f"steer {k}" for k in steered],
        diverging=True,
        marks={name: np.diag(v.rows) for name, v in zip(panels, verdicts.values(), strict=True)},
    )
    verdict_items = "".join(
        f"<li><b>scale {scale:g}</b>: {html.escape(dominance_sentence(v))}</li>"
        for scale, v in verdicts.items()
    )
    own = [r for r in rows if r["steered"] == r["evaluated"]]
    table = Table(
        "",
        ["steered = evaluated", "scale", "loss change", "control mean", "control SD", "z"],
        [
            [r["steered"], r["scale"], r["loss_delta"], r["control_mean"], r["control_sd"], r["z"]]
            for r in own
        ],
    )
    figures_html = "".join(
        _figure(
            path,
            f"{name} ISNs scaled. Solid: the loss change on each evaluated category (bold: {name} itself); "
            "dashed, same colour: random neurons of the same per-site sizes, mean of the draws; band: 1 SD.",
        )
        for name, path in figure_paths.items()
    )
    setting = (
        f"<p>Model {html.escape(model)}; {ISN_SET_TEXT[isn_set]} at eps={epsilon:g}; the response loss on "
        + (
            "held-out instructions (not used to select the ISNs)"
            if held_out
            else "instructions that include the probe set (too few unseen ones to hold out)"
        )
        + f" of every category; null: {next(iter(verdicts.values())).draws} random-neuron sets of the same "
        "per-site sizes per steered category, scaled alike. All rows, with their z-scores, are in "
        "dose_response.csv.</p>"
    )
    sections = [
        ("Verdict", [f'<ul class="findings">{verdict_items}</ul>']),
        (
            "z-scores",
            [
                _figure(
                    z_path,
                    "Rows: whose ISNs are scaled; columns: evaluated category. Outlined: rows that pass.",
                )
            ],
        ),
        ("Dose response", [f'<div class="grid">{figures_html}</div>']),
        ("On the steered category", [table.html()]),
    ]
    return write_page(
        out / PAGE,
        f"SPARCOM steering: {model}",
        sections,
        header=setting,
        description=f"steering: {len(steered)} categories' ISNs scaled by {', '.join(f'{x:g}' for x in sorted({r['scale'] for r in rows}))}; "
        + "; ".join(
            f"scale {k:g}: {'dominates' if v.dominant else 'does not dominate'}" for k, v in verdicts.items()
        ),
    )
