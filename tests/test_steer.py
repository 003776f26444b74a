"""Steering and the causal check on a real tiny model: every loss change against the model's own
``labels`` loss on copies edited by hand; the dose-response table and figures on disk."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch

import sparcom
from sparcom.data import CATEGORIES
from sparcom.edit.ablation import ablation_matrices
from sparcom.edit.effects import Edits
from sparcom.edit.intervention import random_sets
from sparcom.edit.steer import COLUMNS, dose_response, held_out, write_dose_response
from sparcom.models.loading import load_model
from sparcom.recording.conversation import encode
from sparcom.recording.response_loss import ResponseLoss
from sparcom.report.findings import dominance_sentence
from sparcom.stats.select import category_isn

from helpers.models import per_category

EPSILON = 0.5


@pytest.fixture(scope="module")
def tiny():
    """The tiny MoE, its snapshot of 3 instructions per category, and one unseen instruction per
    category (the shortest of the next nine, to keep the many loss passes fast), in category order."""
    model, tokenizer = load_model("tiny-qwen2-moe")
    snapshot = sparcom.record(model, tokenizer, per_category(3), progress=False)
    pool = per_category(12)
    unseen = [
        min((r for r in pool[12 * i + 3 : 12 * i + 12]), key=lambda r: len(encode(r, tokenizer).input_ids))
        for i in range(len(CATEGORIES))
    ]
    return model, tokenizer, snapshot, unseen


def hf_response_loss(model, tokenizer, records) -> torch.Tensor:
    """Each record's response loss from the model's own ``labels`` loss (prompt tokens masked)."""
    losses = []
    for record in records:
        encoded = encode(record, tokenizer)
        labels = encoded.input_ids.masked_fill(~encoded.response_mask, -100)
        with torch.no_grad():
            losses.append(float(model(input_ids=encoded.input_ids[None], labels=labels[None]).loss))
    return torch.tensor(losses, dtype=torch.float64)


def scaled_by_hand(model, neurons, scale: float):
    """A copy with the chosen neurons' down-projection columns multiplied by ``scale``, site by site."""
    edited = copy.deepcopy(model)
    modules = dict(edited.named_modules())
    with torch.no_grad():
        for site, chosen in neurons.items():
            if chosen.dim() == 1:
                modules[site].down_proj.weight[:, chosen] *= scale  # [H, d_ff]
            else:
                experts, units = chosen.nonzero(as_tuple=True)
                modules[site].down_proj[experts, :, units] *= scale  # [E, H, d]
    return edited


def test_response_loss_equals_the_models_own_loss(tiny):
    model, tokenizer, snapshot, unseen = tiny
    loss = ResponseLoss(tokenizer, unseen, snapshot.categories, batch_size=4)
    assert torch.allclose(loss(model), hf_response_loss(model, tokenizer, unseen), atol=1e-5)
    with pytest.raises(ValueError, match=r"no response tokens to score for categories \['code'"):
        ResponseLoss(tokenizer, [r for r in unseen if r["category"] != "code"], snapshot.categories)


def test_ablation_on_a_tiny_model_against_a_hand_computation(tiny):
    model, tokenizer, snapshot, unseen = tiny
    result = ablation_matrices(model, tokenizer, unseen, snapshot, Edits(EPSILON, seed=7, control_draws=10))
    assert result.delta.shape == result.z.shape == result.control.shape == (6, 6)
    assert result.control_draws.shape == (10, 6, 6)
    intact = hf_response_loss(model, tokenizer, unseen)  # one record per category, in category order
    assert torch.allclose(result.intact, intact, atol=1e-5)
    sets = {c: category_isn(snapshot, c, EPSILON) for c in snapshot.categories}
    row = snapshot.categories.index("math")
    expected = hf_response_loss(scaled_by_hand(model, sets["math"], 0.0), tokenizer, unseen) - intact
    assert torch.allclose(result.delta[row], expected, atol=1e-5)
    generator = torch.Generator().manual_seed(7)  # the draws, reproduced: every row's in turn
    draws = [random_sets(sets[c], 10, generator) for c in snapshot.categories]
    assert all(int(draws[row][9][s].sum()) == int(sets["math"][s].sum()) for s in sets["math"])
    expected = hf_response_loss(scaled_by_hand(model, draws[row][9], 0.0), tokenizer, unseen) - intact
    assert torch.allclose(result.control_draws[9, row], expected, atol=1e-5)
    assert result.control_draws.std(0).min() > 0  # a distribution, not one draw repeated
    z = (result.delta - result.control) / result.control_sd
    assert torch.allclose(result.z, z)
    dominance = result.dominance
    assert dominance.bound == pytest.approx(1.9226, abs=1e-4) and len(dominance.rows) == 6
    assert dominance.dominant == (sum(dominance.rows) >= 4)
    assert dominance_sentence(dominance).startswith(
        f"The diagonal {'dominates' if dominance.dominant else 'does not'}"
    )


def test_dose_response_writes_the_table_and_figures(tiny, tmp_path):
    model, tokenizer, snapshot, unseen = tiny
    scales = [0.0, 1.0, 2.0]
    rows = dose_response(model, tokenizer, unseen, snapshot, Edits(EPSILON, control_draws=2, seed=3), scales)
    assert len(rows) == 6 * 6 * 3 and all(tuple(row) == COLUMNS for row in rows)
    unchanged = [row for row in rows if row["scale"] == 1.0]
    assert all(row["loss_delta"] == row["control_mean"] == row["control_sd"] == 0.0 for row in unchanged)
    intact = hf_response_loss(model, tokenizer, unseen)
    doubled = category_isn(snapshot, "code", EPSILON)
    expected = hf_response_loss(scaled_by_hand(model, doubled, 2.0), tokenizer, unseen) - intact
    measured = [row["loss_delta"] for row in rows if row["steered"] == "code" and row["scale"] == 2.0]
    assert torch.allclose(torch.tensor(measured, dtype=torch.float64), expected, atol=1e-5)
    assert any(row["control_sd"] > 0 for row in rows if row["scale"] != 1.0)

    written = write_dose_response(rows, tmp_path)
    assert written["table"] == tmp_path / "dose_response.csv"
    with open(written["table"]) as handle:
        back = list(csv.DictReader(handle))
    assert tuple(back[0]) == COLUMNS and len(back) == len(rows)
    for row, read in zip(rows, back, strict=True):
        assert (read["steered"], read["evaluated"]) == (row["steered"], row["evaluated"])
        assert [float(read[k]) for k in COLUMNS[2:]] == [row[k] for k in COLUMNS[2:]]
    assert sorted(written["figures"]) == sorted(CATEGORIES)
    for path in written["figures"].values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_bad_steering_settings_are_refused_before_any_forward(tiny):
    model, tokenizer, snapshot, unseen = tiny
    with pytest.raises(
        ValueError, match=r"scales must be a non-empty list of finite numbers, got \[0, inf\]"
    ):
        dose_response(None, tokenizer, unseen, snapshot, Edits(EPSILON), [0, float("inf")])
    with pytest.raises(ValueError, match="control_draws must be an integer >= 2.*got 1"):
        dose_response(model, tokenizer, unseen, snapshot, Edits(EPSILON, control_draws=1))
    with pytest.raises(ValueError, match=r"epsilon must be in \(0, 1\], got 2"):
        dose_response(model, tokenizer, unseen, snapshot, Edits(2))


def test_held_out_prefers_unseen_records(tiny):
    _, _, snapshot, _ = tiny
    seen = set(snapshot.instruction_ids)
    chosen = held_out(per_category(10), snapshot, per_category=5, seed=0)
    assert len(chosen) == 30 and not seen & {r["id"] for r in chosen}
    assert held_out(per_category(10), snapshot, per_category=5, seed=0) == chosen  # seeded
    fallback = held_out(per_category(4), snapshot, per_category=2, seed=0)  # only one unseen per category
    assert len(fallback) == 12 and seen & {r["id"] for r in fallback}


def test_the_dose_response_figure_names_its_controls_and_rows_carry_z_scores():
    from sparcom.edit.steer import dose_response_plot, steering_dominance

    rows = [
        {
            "steered": a,
            "evaluated": b,
            "scale": scale,
            "loss_delta": 0.5 if a == b else 0.0,
            "control_mean": 0.0,
            "control_sd": 0.1,
            "z": 5.0 if a == b else 0.0,
        }
        for a in ("math", "code")
        for b in ("math", "code")
        for scale in (0.0, 1.0, 2.0)
    ]
    figure = dose_response_plot(rows, "math")
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels == ["math", "code", "random neurons, mean", "random neurons, 1 SD"]
    verdicts = steering_dominance(rows, draws=10)
    assert list(verdicts) == [0.0, 2.0]  # scale 1 changes nothing
    assert all(v.dominant and v.rows == [True, True] for v in verdicts.values())
    assert dominance_sentence(verdicts[2.0]).startswith("The diagonal dominates: in 2 of 2 rows")


def test_a_heatmap_cell_that_rounds_to_zero_prints_zero():
    from sparcom.report.figures import cell_text

    assert cell_text(-0.000001, 5) == "0" and cell_text(0.0, 3) == "0" and cell_text(-0.0012, 4) == "-0.0012"


def test_one_outlier_does_not_bleach_a_diverging_heatmap():
    from sparcom.report.figures import diverging_limit

    z = np.array([-1.0, 0.8, 2.2, -2.9, 4.6, 1.4, -0.5, 0.3, 5.2, -54.2])
    assert diverging_limit(z) == pytest.approx(3 * np.percentile(np.abs(z), 90))  # clipped: the rest reads
    even = np.array([-3.0, 2.0, 1.0, -0.5, 2.5])
    assert diverging_limit(even) == 3.0  # no outlier: the full range
    assert diverging_limit(np.array([np.nan, 0.0])) > 0
