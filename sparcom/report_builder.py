"""analyze.py's two reports: a base-vs-tuned comparison and the ablation check, each written as
CSV/Markdown tables, PNG figures and one self-contained HTML page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from sparcom import analysis, report
from sparcom.ablation import ablation_matrices, diagonal_dominance
from sparcom.drift import drift_metrics
from sparcom.metrics import overlap_matrix
from sparcom.snapshot import Snapshot, SnapshotError, check_comparable, snapshot_series

if TYPE_CHECKING:
    from sparcom.config import AnalyzeConfig


def run_inputs(run: Path) -> dict:
    """A train.py run folder: its snapshot series, base (first) and tuned (last) snapshots, the
    tokenizer and the model of the latest checkpoint."""
    from sparcom.models import load_tokenizer

    series = snapshot_series(run / "snapshots")
    if not series:
        raise SnapshotError(f"no snapshots in {run / 'snapshots'}; is {run} a train.py run folder?")
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    model = config.get("model", {"name_or_path": Snapshot.load(next(iter(series.values()))).meta["model"]})
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    tuned_model = {**model, "name_or_path": str(checkpoints[-1])} if checkpoints else model
    return {
        "series": series,
        "base": Snapshot.load(series[min(series)]),
        "tuned": Snapshot.load(series[max(series)]),
        "tokenizer": load_tokenizer(tuned_model["name_or_path"], model.get("chat_template_from")),
        "tuned_model": tuned_model,
    }


def load_for_analysis(spec: dict, dtype: str | None = None):
    """``(model, tokenizer)`` of a model spec, on the GPU when there is one. ``dtype`` (the
    command line's) wins over the spec's; with neither, bfloat16 on a GPU and float32 on CPU."""
    import torch

    from sparcom.models import load_model

    dtype = dtype or spec.get("dtype") or ("bfloat16" if torch.cuda.is_available() else "float32")
    model, tokenizer = load_model(spec["name_or_path"], dtype, spec.get("chat_template_from"))
    return (model.cuda() if torch.cuda.is_available() else model), tokenizer


def _tokenizer(spec, snapshot: Snapshot):
    from sparcom.models import load_tokenizer

    if spec is None:
        return load_tokenizer(snapshot.meta["model"])
    if isinstance(spec, dict):
        return load_tokenizer(spec["name_or_path"], spec.get("chat_template_from"))
    return spec


def comparison_report(cfg: AnalyzeConfig, out: Path, records: list[dict], base: Snapshot, tuned: Snapshot, tokenizer,
                      series: dict[int, Path] | None) -> Path:  # fmt: skip
    """Tables 1 and 2 of the paper, overlap and token-overlap matrices, layer profiles, general and
    unique ISNs, the epsilon sweep and (for runs) drift over training steps."""
    check_comparable(base, tuned)
    mode, epsilon = cfg.sparcom.selection_mode, cfg.sparcom.overlap_epsilon
    tables, figures = out / "tables", out / "figures"
    tables.mkdir(exist_ok=True)
    figures.mkdir(exist_ok=True)
    sections: list[tuple[str, list[str]]] = []
    summary: dict = {"base": base.meta, "tuned": tuned.meta}

    header = ["category", *[f"Jaccard eps={e:g}" for e in cfg.sparcom.epsilons]]
    isn_rows = analysis.isn_table(base, tuned, list(cfg.sparcom.epsilons), mode)
    report.write_table(isn_rows, header, tables / "isn_jaccard")
    blocks = [report.html_table(isn_rows, header)]
    ise_rows = analysis.ise_table(base, tuned)
    if ise_rows:
        report.write_table(ise_rows, ["category", "Pearson r of expert frequencies"], tables / "ise_pearson")
        blocks.append(report.html_table(ise_rows, ["category", "ISE Pearson r"]))
    summary["isn_jaccard"], summary["ise_pearson"] = isn_rows, ise_rows
    sections.append(("Alteration: base vs tuned (paper Tables 1 and 2)", blocks))

    sweep = analysis.epsilon_sweep(base, tuned, list(cfg.sweep_epsilons), mode)
    path = report.lines(cfg.sweep_epsilons, sweep, "ISN Jaccard (base vs tuned) across epsilon", "epsilon",
                        "Jaccard", figures / "epsilon_sweep.png")  # fmt: skip
    sections.append(
        ("Epsilon sweep, from stored counts", [report.html_figure(path, "Jaccard vs epsilon per category")])
    )

    gu_base = analysis.general_unique_rows(base, epsilon, mode)
    gu_tuned = analysis.general_unique_rows(tuned, epsilon, mode)
    gu_rows = [[b[0], b[1], b[2], t[1], t[2]] for b, t in zip(gu_base, gu_tuned, strict=True)]
    gu_header = ["category", "ISNs base", "unique base", "ISNs tuned", "unique tuned"]
    report.write_table(gu_rows, gu_header, tables / "general_unique")
    summary["general_unique"] = gu_rows
    sections.append((f"General and unique ISNs (eps={epsilon:g})", [report.html_table(gu_rows, gu_header)]))

    profiles = {
        "base": analysis.layer_profiles(base, epsilon, mode),
        "tuned": analysis.layer_profiles(tuned, epsilon, mode),
    }
    layers = range(len(next(iter(profiles["base"].values()))))
    path = report.lines(layers, {}, f"ISNs per layer (eps={epsilon:g})", "layer", "ISN count",
                        figures / "layer_profile.png", panels=profiles)  # fmt: skip
    sections.append(
        ("Layer profile", [report.html_figure(path, "ISN count per layer and category, base and tuned")])
    )

    if base.instruction_counts is not None and tuned.instruction_counts is not None:
        sections.append(
            _overlap_section(
                base, tuned, records, _tokenizer(tokenizer, tuned), epsilon, mode, figures, summary
            )
        )
    if series and len(series) > 1:
        sections.append(_drift_section(series, base, list(cfg.sparcom.epsilons), mode, figures))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    title = f"SPARCOM: {base.meta.get('model', 'base')} vs {tuned.meta.get('model', 'tuned')}"
    return report.write_html(out / "report.html", title, sections)


def _overlap_section(
    base, tuned, records, tokenizer, epsilon, mode, figures, summary
) -> tuple[str, list[str]]:
    blocks = []
    matrices = {}
    for name, snapshot in (("base", base), ("tuned", tuned)):
        matrices[name] = overlap_matrix(snapshot, epsilon, mode)
        path = report.overlap_heatmap(matrices[name], snapshot.categories, f"ISN overlap, {name} (eps={epsilon:g})",
                                      figures / f"overlap_{name}.png")  # fmt: skip
        blocks.append(
            report.html_figure(path, f"6x6 mean pairwise Jaccard of per-instruction ISN sets, {name}")
        )
    by_id = {r["id"]: r for r in records}
    if all(i in by_id for i in tuned.instruction_ids):
        tokens = analysis.token_overlap(tuned, by_id, tokenizer)
        path = report.heatmap(tokens, tuned.categories, "Vocabulary overlap (token sets)", figures / "token_overlap.png",
                              colorbar="mean pairwise Jaccard of token sets")  # fmt: skip
        blocks.append(report.html_figure(path, "Token-overlap control: the same statistic on token sets"))
        r_base = analysis.matrix_correlation(matrices["base"], tokens)
        r_tuned = analysis.matrix_correlation(matrices["tuned"], tokens)
        summary["token_overlap_correlation"] = {"base": r_base, "tuned": r_tuned}
        blocks.append(
            f'<p class="note">Correlation between the ISN overlap matrix and the vocabulary overlap matrix: '
            f"r = {r_base:.3f} (base), {r_tuned:.3f} (tuned). A high r means category overlap in ISNs may "
            f"largely reflect shared tokens; a low r points to functional specialisation.</p>"
        )
    summary["overlap"] = {k: v.tolist() for k, v in matrices.items()}
    return "Generality and uniqueness: overlap matrices", [
        '<div class="grid">' + "".join(blocks[:2]) + "</div>",
        *blocks[2:],
    ]


def _drift_section(series: dict[int, Path], base: Snapshot, epsilons, mode, figures) -> tuple[str, list[str]]:
    steps = list(series)
    rows = [drift_metrics(base, Snapshot.load(series[s]), epsilons, mode, "base") for s in steps]
    blocks = []
    for epsilon in epsilons:
        prefix = f"sparcom/isn_jaccard/base/eps={epsilon:g}/"
        curves = {c: [row[prefix + c] for row in rows] for c in base.categories}
        path = report.lines(steps, curves, f"ISN Jaccard vs the base model (eps={epsilon:g})", "training step",
                            "Jaccard", figures / f"drift_isn_eps{epsilon:g}.png")  # fmt: skip
        blocks.append(report.html_figure(path, f"ISN drift over training, eps={epsilon:g}"))
    if any(k.startswith("sparcom/ise_pearson") for k in rows[0]):
        curves = {c: [row[f"sparcom/ise_pearson/base/{c}"] for row in rows] for c in base.categories}
        path = report.lines(steps, curves, "ISE Pearson vs the base model", "training step", "Pearson r",
                            figures / "drift_ise.png")  # fmt: skip
        blocks.append(report.html_figure(path, "Expert-frequency correlation over training"))
    return "Drift over training", ['<div class="grid">' + "".join(blocks) + "</div>"]


def ablation_report(
    cfg: AnalyzeConfig, out: Path, records: list[dict], snapshot: Snapshot, model_spec: dict | None
) -> Path:
    """Zero each category's ISNs (and, as a control, as many random neurons from the same sites) and
    report the change in response loss on every category."""
    from sparcom.training import probe_set

    if model_spec is None:
        raise ValueError(
            "mode=ablate needs a model (a run folder, preset, path or hub id), not only a snapshot"
        )
    model, tokenizer = load_for_analysis(model_spec, cfg.dtype)
    seen = set(snapshot.instruction_ids)
    held_out = [r for r in records if r["id"] not in seen]
    per_category = {c: sum(r["category"] == c for r in held_out) for c in snapshot.categories}
    pool = held_out if min(per_category.values()) >= cfg.ablate.per_category else records
    probe = probe_set(pool, cfg.ablate.per_category, cfg.ablate.seed)
    result = ablation_matrices(model, tokenizer, probe, snapshot, cfg.ablate.epsilon, cfg.sparcom.selection_mode,
                               cfg.ablate.seed, cfg.ablate.batch_size)  # fmt: skip
    categories = snapshot.categories
    figures, tables = out / "figures", out / "tables"
    figures.mkdir(exist_ok=True)
    tables.mkdir(exist_ok=True)
    rows_labels = [f"zero {c} ({n})" for c, n in zip(categories, result["neurons"], strict=True)]
    blocks = []
    for name, title in (("delta", "ISNs zeroed"), ("control", "random neurons zeroed (control)")):
        matrix = result[name]
        path = report.heatmap(matrix, categories, f"Response-loss change: {title}", figures / f"ablation_{name}.png",
                              colorbar="loss change (nats/token)", row_labels=rows_labels, diverging=True)  # fmt: skip
        blocks.append(
            report.html_figure(
                path, f"Rows: category whose neurons are zeroed; columns: evaluated category ({title})"
            )
        )
        report.write_table([[label, *row] for label, row in zip(rows_labels, matrix.tolist(), strict=True)],
                           ["zeroed", *categories], tables / f"ablation_{name}")  # fmt: skip
    isn, control = diagonal_dominance(result["delta"]), diagonal_dominance(result["control"])
    verdict = (
        f"ISN ablation: the diagonal is the largest entry in {isn['rows_with_diagonal_max']}/{isn['rows']} rows "
        f"(mean diagonal {isn['mean_diagonal']:+.4f} vs off-diagonal {isn['mean_off_diagonal']:+.4f}); "
        f"random control: {control['rows_with_diagonal_max']}/{control['rows']} rows "
        f"({control['mean_diagonal']:+.4f} vs {control['mean_off_diagonal']:+.4f}). "
        + (
            "The diagonal dominates."
            if isn["rows_with_diagonal_max"] > isn["rows"] / 2
            and isn["mean_diagonal"] > isn["mean_off_diagonal"]
            else "The diagonal does not dominate."
        )  # fmt: skip
    )
    intact = [[c, float(v)] for c, v in zip(categories, result["intact"], strict=True)]
    summary = {"isn": isn, "control": control, "verdict": verdict, "intact_loss": intact, "neurons": result["neurons"],
               "delta": result["delta"].tolist(), "control_delta": result["control"].tolist(),
               "epsilon": cfg.ablate.epsilon, "held_out": pool is held_out}  # fmt: skip
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    sections = [
        ("Verdict", [f'<p class="note">{verdict}</p>']),
        ("Loss changes", ['<div class="grid">' + "".join(blocks) + "</div>"]),
        ("Intact response loss", [report.html_table(intact, ["category", "loss (nats/token)"])]),
    ]
    print(verdict)
    return report.write_html(out / "report.html", f"SPARCOM ablation: {model_spec['name_or_path']}", sections)
