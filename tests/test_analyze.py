"""analyze.py on a real training run and on recorded models: tables, figures, the causal check,
comparability errors, and the HTML report rendered in headless Chromium."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import sparcom
from analyze import analyze
from sparcom.cli import compose
from sparcom.edit.intervention import intervene
from sparcom.models.loading import load_model
from sparcom.recording.probe import Recording
from sparcom.snapshot import Snapshot, SnapshotError, check_comparable, snapshot_series
from sparcom.stats.estimates import expected_jaccard
from sparcom.stats.metrics import jaccard
from sparcom.stats.select import category_isn
from train import train

from helpers.models import per_category

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")


def analyzed(*overrides: str) -> list[Path]:
    """analyze.py's work, in-process: the typed config of the overrides, written where the CLI writes."""
    cfg = compose("analyze", overrides)
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "analysis"
    return analyze(cfg, out)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One real 6-step SFT run of the tiny MoE (checkpoints at 3 and 6)."""
    folder = tmp_path_factory.mktemp("run") / "run"
    return train(compose("train", ["experiment=smoke", "logger=disabled"]), folder).run_dir


@pytest.mark.slow
def test_run_report_has_the_tables_figures_and_what_was_compared(run):
    assert analyzed(f"run={run}") == [run / "analysis" / "compare" / "report.html"]
    out = run / "analysis" / "compare"
    with open(out / "tables" / "isn_jaccard.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["category"], r["epsilon"]) for r in rows] == [
        (c, e) for e in ("0.3", "0.5", "0.7") for c in [*sparcom.data.CATEGORIES, "mean"]
    ]
    assert (out / "tables" / "ise_pearson.md").read_text().startswith("| category |")
    for figure in ("epsilon_sweep", "layer_profile", "overlap", "token_overlap", "drift_isn", "drift_ise"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 10_000, figure
    # The tables are the stored counts' values: recompute a cell and its chance level from the
    # snapshots, through the category's ISN sets themselves.
    series = snapshot_series(run / "snapshots")
    base, tuned = Snapshot.load(series[0]), Snapshot.load(series[6])
    a, b = category_isn(base, "math", 0.5), category_isn(tuned, "math", 0.5)
    cell = next(r for r in rows if r["category"] == "math" and r["epsilon"] == "0.5")
    assert float(cell["jaccard"]) == pytest.approx(jaccard(a, b))
    sizes = [torch.tensor([int(s[site].sum()) for site in a]) for s in (a, b)]
    widths = torch.tensor([a[site].numel() for site in a])
    assert float(cell["chance"]) == pytest.approx(expected_jaccard(*sizes, widths))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base"]["step"] == 0 and summary["tuned"]["step"] == 6
    # The documented schema: every number with its interval, chance level, stability or p-value.
    cell = summary["isn_jaccard"]["math"]["eps=0.5"]
    assert (
        cell["value"] == pytest.approx(jaccard(a, b)) and cell["ci95"][0] <= cell["value"] <= cell["ci95"][1]
    )
    assert 0 < cell["chance"] < 1 and 0 < cell["stability_base"] <= 1 and 0 < cell["stability_tuned"] <= 1
    assert set(summary["isn_jaccard"]) == {*sparcom.data.CATEGORIES, "mean"}
    assert set(summary["ise_pearson"]["code"]) == {"value", "ci95"}
    for side in ("base", "tuned"):
        overlap = summary["overlap"][side]
        assert set(overlap["diagonal_dominance"]) == {"statistic", "p_value", "significant"}
        assert (
            0 < overlap["per_category"]["math"]["p_value"] <= overlap["per_category"]["math"]["p_holm"] <= 1
        )
        assert {"category_effect", "p_value", "correlation", "survives", "alpha"} <= set(
            summary["token_control"][side]
        )
        assert {"three_phase", "margin", "ci95", "counts"} <= set(summary["layer_profile"][side]["math"])
    assert len(summary["findings"]) >= 5 and summary["settings"]["statistics"]["resamples"] == 200
    page = (out / "report.html").read_text()
    for shown in (
        "run, step 0",
        "run, step 6",
        "learning_rate 0.0001",
        "length 6 steps (max_steps;",  # what governed the run, not TRL's default num_train_epochs
        "4 per category",
        "prompt tokens",
        "threshold, epsilons 0.3, 0.5, 0.7",
        "Findings",
    ):
        assert shown in page, shown
    assert "num_train_epochs" not in page
    index = (run / "analysis" / "index.html").read_text()
    assert 'href="compare/report.html"' in index and "comparison: run, step 0 vs run, step 6" in index
    assert re.search(r"<td>\d{4}-\d\d-\d\d \d\d:\d\d</td>", index)  # when it was written
    json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)  # no NaN: strict JSON


@pytest.mark.slow
def test_drift_figures_are_page_wide_and_read_against_chance_stability_and_held_out_loss(run):
    analyzed(f"run={run}")
    page = (run / "analysis" / "compare" / "report.html").read_text()
    drift = page[page.index("Drift over training") :]
    assert '<div class="grid">' not in drift  # not squeezed into a half-width column
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', drift)
    assert len(images) == 2  # ISN drift with the held-out loss, and ISE Pearson (an MoE)
    for data in images:
        width = struct.unpack(">I", base64.b64decode(data)[16:20])[0]  # the PNG header's width
        assert width >= 1100, width
    for said in (
        "chance",
        "split-half stability",
        "held-out instructions, never trained on",
        "axis is zoomed",
    ):
        assert said in drift, said
    points = json.loads(page and (run / "analysis" / "compare" / "summary.json").read_text())["drift"]
    assert all(set(p["held_out_loss"]) == set(sparcom.data.CATEGORIES) for p in points)


def test_drift_plot_draws_chance_stability_and_the_held_out_loss():
    from sparcom.report.figures import drift_plot

    steps = [0, 5, 10]
    jaccard = {0.5: {"math": [1.0, 0.8, 0.7], "code": [1.0, 0.9, 0.85]}}
    figure = drift_plot(
        steps,
        jaccard,
        {0.5: [0.3, 0.3, 0.31]},
        {0.5: 0.75},
        {"math": [2.0, 1.5, None], "code": [1.0, 0.9, 0.8]},
    )
    labels = [t.get_text() for legend in figure.legends for t in legend.get_texts()]
    assert labels == ["math", "code", "chance (mean of categories)", "split-half stability, step 0 (mean)"]
    top, bottom = figure.axes
    assert top.get_ylim() == (0, 1.02)  # the full axis: a small change does not look like a fall
    assert [list(line.get_ydata()) for line in bottom.get_lines()] == [[2.0, 1.5], [1.0, 0.9, 0.8]]


def test_an_epsilon_where_both_sets_are_empty_has_no_jaccard(tmp_path):
    """Every frequency below 0.8: at eps 0.9 no neuron is an ISN in either model; the sweep leaves a
    gap there (nan, null in summary.json) and says why, rather than plotting 1.0."""
    import numpy as np

    from sparcom.report.pages import write_comparison
    from sparcom.stats.comparison import Selection, compare

    from helpers.synthetic import draw, moe_sites, random_population

    rng = np.random.default_rng(0)
    kinds, shapes, layers = moe_sites()
    population = random_population(rng, list(sparcom.data.CATEGORIES), shapes, kinds, layers)
    capped = population.with_frequencies({s: 0.75 * f for s, f in population.frequencies.items()})
    base, tuned = draw([capped, capped], 10, rng)
    result = compare(
        base,
        tuned,
        labels=("a", "b"),
        selection=Selection(epsilons=(0.5,), sweep_epsilons=(0.3, 0.9)),
        statistics=None,
    )
    assert all(values[0] == values[0] and values[1] != values[1] for values in result.sweep.values())
    assert (
        "neither model has an ISN" in result.notes["epsilon_sweep"]
        and "math at eps 0.9" in result.notes["epsilon_sweep"]
    )
    page = write_comparison(result, tmp_path).read_text()
    assert (
        "Gaps: null where neither model has an ISN" in page
        and "rising again where the remaining ISNs crowd" in page
    )
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)
    assert summary["epsilon_sweep"]["math"][1] is None and summary["epsilon_sweep"]["math"][0] > 0


def test_statistics_fields_are_null_with_the_reason_without_per_instruction_counts(small_records, tmp_path):
    base_model, tokenizer = load_model("tiny-olmoe")
    tuned_model, _ = load_model("tiny-olmoe", seed=1)
    snapshots = [
        sparcom.record(m, tokenizer, small_records, Recording(per_instruction=False), progress=False).save(
            tmp_path / f"{n}.safetensors"
        )
        for n, m in (("a", base_model), ("b", tuned_model))
    ]
    [page] = analyzed(f"base={snapshots[0]}", f"tuned={snapshots[1]}", f"out={tmp_path / 'out'}")
    summary = json.loads((page.parent / "summary.json").read_text())
    assert summary["isn_jaccard"]["math"]["eps=0.5"]["ci95"] is None
    assert 0 <= summary["isn_jaccard"]["math"]["eps=0.5"]["chance"] <= 1  # needs category counts only
    assert summary["overlap"] is None and summary["token_control"] is None
    assert "per-instruction counts" in summary["notes"]["statistics"]
    assert "per_instruction=false" in page.read_text()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed")
def test_html_report_renders_with_visible_figures(run, tmp_path):
    analyzed(f"run={run}")
    page = (run / "analysis" / "compare" / "report.html").read_text()
    assert 'src="data:image/png;base64,' in page and "<link" not in page  # self-contained
    probe = """<script>
    window.addEventListener('load', () => {
      const images = [...document.images].map(img => {
        const box = img.getBoundingClientRect(), style = getComputedStyle(img);
        return img.complete && img.naturalWidth > 100 && box.width > 100 && box.height > 100
               && style.visibility !== 'hidden' && style.display !== 'none';
      });
      const width = document.documentElement.clientWidth;
      const tables = [...document.querySelectorAll('table')].map(t => t.getBoundingClientRect().right <= width);
      const out = document.createElement('pre'); out.id = 'probe';
      out.textContent = JSON.stringify({images, tables});
      document.body.appendChild(out);
    });</script>"""
    checked = tmp_path / "report.html"
    checked.write_text(page.replace("</body>", probe + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,900",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    result = json.loads(dom.split('<pre id="probe">')[1].split("</pre>")[0])
    assert len(result["images"]) >= 6 and all(result["images"]), result
    assert result["tables"] and all(result["tables"]), result


@pytest.mark.slow
def test_base_and_tuned_models_are_recorded_and_compared(run, tmp_path):
    out = tmp_path / "out"
    analyzed(
        "base=tiny-qwen2-moe",
        f"tuned={run / 'checkpoint-6'}",
        "sparcom.probe.per_category=4",
        f"out={out}",
    )
    # Same weights, same probe as the run's own snapshots: the same table.
    files = [
        run / "analysis" / "compare" / "tables" / "isn_jaccard.csv",
        out / "compare" / "tables" / "isn_jaccard.csv",
    ]
    if not files[0].exists():
        analyzed(f"run={run}")
    recorded, logged = (list(csv.reader(path.read_text().splitlines())) for path in files)
    assert recorded == logged


@pytest.mark.slow
def test_snapshots_of_different_models_are_refused(run, tmp_path):
    llama = tmp_path / "llama.safetensors"
    model, tokenizer = load_model("tiny-llama")
    sparcom.record(model, tokenizer, per_category(4), progress=False).save(llama)
    moe = snapshot_series(run / "snapshots")[0]
    with pytest.raises(SnapshotError, match="different model family.*'llama'"):
        analyzed(f"base={llama}", f"tuned={moe}", f"out={tmp_path / 'x'}")


def test_comparability_names_the_difference(small_records):
    model, tokenizer = load_model("tiny-olmoe")
    snapshot = sparcom.record(model, tokenizer, small_records, progress=False)
    other_scope = replace(snapshot, meta={**snapshot.meta, "token_scope": "response"})
    with pytest.raises(SnapshotError, match="different token scope"):
        check_comparable(snapshot, other_scope)
    other_data = replace(snapshot, meta={**snapshot.meta, "dataset_hash": "0" * 16})
    with pytest.raises(SnapshotError, match="different probe sets"):
        check_comparable(snapshot, other_data)
    fewer = replace(
        snapshot, site_kinds={k: v for k, v in snapshot.site_kinds.items() if "layers.3" not in k}
    )
    with pytest.raises(SnapshotError, match="different sites.*layers.3"):
        check_comparable(snapshot, fewer)


@pytest.mark.slow
def test_ablation_through_the_command_line_leaves_the_comparison_alone(run):
    """The CLI prints the verdict's report and the index; the comparison's report is untouched."""
    analyzed(f"run={run}")
    compared = (run / "analysis" / "compare" / "report.html").read_bytes()
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "analyze.py"),
            "mode=ablate",
            f"run={run}",
            "ablate.per_category=3",
            "stats.control_draws=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "SPARCOM_RUN_STAMP"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = run / "analysis" / "ablate"
    result = json.loads((out / "ablation.json").read_text())
    assert len(result["isn_delta"]) == 6 and all(len(row) == 6 for row in result["isn_delta"])
    assert len(result["z"]) == 6 and result["held_out"] and "diagonal" in result["dominance"]["verdict"]
    assert done.stdout.splitlines()[-2:] == [
        f"report: {out / 'report.html'}",
        f"index: {run / 'analysis' / 'index.html'}",
    ]
    assert (run / "analysis" / "compare" / "report.html").read_bytes() == compared
    index = (run / "analysis" / "index.html").read_text()
    assert 'href="compare/report.html"' in index and 'href="ablate/report.html"' in index


def test_zeroing_neurons_equals_silencing_their_activations(small_records):
    """Zeroed down-projection columns give the same logits as forcing those activations to zero
    with a hook; the weights come back unchanged."""
    model, tokenizer = load_model("tiny-qwen2-moe")
    model = model.to(torch.float64)
    model.set_experts_implementation("eager")
    snapshot = sparcom.record(model, tokenizer, small_records, progress=False)
    neurons = category_isn(snapshot, "code", 0.3)
    ffn = {s: n for s, n in neurons.items() if snapshot.site_kinds[s] == "ffn"}
    ids = sparcom.recording.conversation.encode(small_records[0], tokenizer).input_ids[None]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), intervene(model, ffn, 0.0):
        edited = model(ids).logits
    modules = dict(model.named_modules())
    handles = [
        modules[s].act_fn.register_forward_hook(lambda m, i, o, keep=~n: o * keep) for s, n in ffn.items()
    ]
    with torch.no_grad():
        silenced = model(ids).logits
    for handle in handles:
        handle.remove()
    assert torch.allclose(edited, silenced, atol=1e-10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow
def test_steering_writes_the_dose_response_table_and_figures(run):
    [page] = analyzed(
        f"run={run}", "mode=steer", "steer.per_category=2", "steer.scales=[0,1,2]", "stats.control_draws=2"
    )
    out = run / "analysis" / "steer"
    assert page == out / "report.html"
    with open(out / "dose_response.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["steered", "evaluated", "scale", "loss_delta", "control_mean", "control_sd", "z"]
    assert len(rows) == 6 * 6 * 3
    text = page.read_text()  # a verdict per scale that changes something, and the z-scores behind it
    assert text.count("<b>scale ") == 2 and "The diagonal" in text and "z-scores" in text
    # The run's probe set is its held-out split; steering measures on instructions outside it, and says so.
    assert "held-out instructions (not used to select the ISNs)" in text and "2 random-neuron sets" in text
    unchanged = [r for r in rows if float(r["scale"]) == 1]
    assert all(float(r["loss_delta"]) == 0 and float(r["control_mean"]) == 0 for r in unchanged)
    assert len(list((out / "figures").glob("dose_response_*.png"))) == 6
    assert 'href="steer/report.html"' in (run / "analysis" / "index.html").read_text()


@pytest.mark.slow
def test_ablation_of_each_categorys_unique_isns(run, tmp_path):
    """sparcom.isn_set=unique silences each category's own neurons (ISNs of no other category), a
    small share of the model, rather than every neuron that fires often on it."""
    common = [f"run={run}", "mode=ablate", "ablate.per_category=2", "stats.control_draws=2"]
    analyzed(*common, f"out={tmp_path / 'frequent'}")
    [page] = analyzed(*common, "sparcom.isn_set=unique", f"out={tmp_path / 'unique'}")
    frequent, unique = (
        json.loads((tmp_path / kind / "ablate" / "ablation.json").read_text())
        for kind in ("frequent", "unique")
    )
    assert unique["isn_set"] == "unique" and frequent["isn_set"] == "frequent"
    assert all(u < f for u, f in zip(unique["neurons"], frequent["neurons"], strict=True))
    assert unique["total_neurons"] == frequent["total_neurons"] > max(frequent["neurons"])
    assert "unique ISNs (ISNs of no other category)" in page.read_text()
