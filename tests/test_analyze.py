"""analyze.py on a real training run and on recorded models: tables, figures, the causal check,
comparability errors, and the HTML report rendered in headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import sparcom
import sparcom.metrics
from analyze import analyze
from sparcom.ablation import zeroed
from sparcom.cli import compose
from sparcom.models import load_model
from sparcom.select import category_isn
from sparcom.snapshot import Snapshot, SnapshotError, check_comparable, snapshot_series
from train import train

from conftest import per_category

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
    return train(compose("train", ["experiment=smoke", "logger=disabled"]), folder)


@pytest.mark.slow
def test_run_report_has_the_tables_and_figures(run):
    assert analyzed(f"run={run}") == [run / "analysis" / "report.html"]
    out = run / "analysis"
    with open(out / "tables" / "isn_jaccard.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["category", "Jaccard eps=0.3", "Jaccard eps=0.5", "Jaccard eps=0.7"]
    assert [r[0] for r in rows[1:]] == [*sparcom.data.CATEGORIES, "mean"]
    assert (out / "tables" / "ise_pearson.md").read_text().startswith("| category |")
    for figure in (
        "epsilon_sweep",
        "layer_profile",
        "overlap_base",
        "overlap_tuned",
        "token_overlap",
        "drift_isn_eps0.5",
        "drift_ise",
    ):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 10_000, figure
    summary = json.loads((out / "summary.json").read_text())
    assert -1 <= summary["token_overlap_correlation"]["base"] <= 1
    # The tables are the stored counts' values: recompute one cell from the snapshots themselves.
    series = snapshot_series(run / "snapshots")
    base, tuned = Snapshot.load(series[0]), Snapshot.load(series[6])
    expected = sparcom.metrics.isn_alteration(base, tuned, 0.5)["math"]
    assert float(rows[1 + sparcom.data.CATEGORIES.index("math")][2]) == pytest.approx(expected)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed")
def test_html_report_renders_with_visible_figures(run, tmp_path):
    analyzed(f"run={run}")
    page = (run / "analysis" / "report.html").read_text()
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
    assert len(result["images"]) >= 8 and all(result["images"]), result
    assert result["tables"] and all(result["tables"]), result


@pytest.mark.slow
def test_base_and_tuned_models_are_recorded_and_compared(run, tmp_path):
    out = tmp_path / "compare"
    analyzed(
        "base=tiny-qwen2-moe", f"tuned={run / 'checkpoint-6'}", "sparcom.probe.per_category=4", f"out={out}"
    )
    with open(out / "tables" / "isn_jaccard.csv") as handle:
        recorded = list(csv.reader(handle))
    # Same weights, same probe, as the run's own snapshots: the same table.
    with (
        open(run / "analysis" / "tables" / "isn_jaccard.csv")
        if (run / "analysis").exists()
        else open(out / "tables" / "isn_jaccard.csv") as handle
    ):
        assert recorded == list(csv.reader(handle))


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
    with pytest.raises(SnapshotError, match="different dataset"):
        check_comparable(snapshot, other_data)
    fewer = replace(
        snapshot, site_kinds={k: v for k, v in snapshot.site_kinds.items() if "layers.3" not in k}
    )
    with pytest.raises(SnapshotError, match="different sites.*layers.3"):
        check_comparable(snapshot, fewer)


@pytest.mark.slow
def test_ablation_report_through_the_command_line(run):
    """The CLI prints the verdict and where the report went."""
    out = run / "ablation"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "analyze.py"),
            "mode=ablate",
            f"run={run}",
            "ablate.per_category=3",
            f"out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "SPARCOM_RUN_STAMP"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "ablation.json").read_text())
    assert len(result["delta"]) == 6 and all(len(row) == 6 for row in result["delta"])
    assert len(result["control_delta"]) == 6 and result["held_out"]
    assert "diagonal" in done.stdout and done.stdout.splitlines()[-1] == f"report: {out / 'report.html'}"


def test_zeroing_neurons_equals_silencing_their_activations(small_records):
    """Zeroed down-projection columns give the same logits as forcing those activations to zero
    with a hook; the weights come back unchanged."""
    model, tokenizer = load_model("tiny-qwen2-moe")
    model = model.to(torch.float64)
    model.set_experts_implementation("eager")
    snapshot = sparcom.record(model, tokenizer, small_records, progress=False)
    neurons = category_isn(snapshot, "code", 0.3)
    ffn = {s: n for s, n in neurons.items() if snapshot.site_kinds[s] == "ffn"}
    ids = sparcom.conversation.encode(small_records[0], tokenizer).input_ids[None]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), zeroed(model, ffn, snapshot.site_kinds):
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
