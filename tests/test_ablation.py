"""The ablation's null: z-scores against repeated random-neuron draws and the "diagonal dominates"
rule, on synthetic loss matrices whose truth is planted (the real tiny-model path: test_steer.py)."""

from __future__ import annotations

import pytest
import torch

from sparcom.edit.effects import dominance, dominant_rows, null_bound, z_scores
from sparcom.report.findings import dominance_sentence

SIZE = 6


def synthetic(trials: int, draws: int, seed: int, planted: torch.Tensor | None = None):
    """``[N, C, C]`` ISN loss changes and ``[N, D, C, C]`` control draws, every cell normal with its
    own mean and SD; ``planted`` (``[C, C]``, in units of the cell's SD) is added to the ISN changes."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(trials, 1, SIZE, SIZE, generator=generator, dtype=torch.float64) * 0.05
    sd = torch.exp(torch.randn(trials, 1, SIZE, SIZE, generator=generator, dtype=torch.float64)) * 0.01
    control = mean + sd * torch.randn(trials, draws, SIZE, SIZE, generator=generator, dtype=torch.float64)
    delta = mean[:, 0] + sd[:, 0] * torch.randn(trials, SIZE, SIZE, generator=generator, dtype=torch.float64)
    if planted is not None:
        delta = delta + planted * sd[:, 0]
    return delta, control


@pytest.mark.parametrize("draws", [4, 10, 30])
def test_the_null_bound_holds_its_rate_for_any_number_of_draws(draws):
    """Under the null a cell's z exceeds ``null_bound`` 5% of the time (within 4 standard errors over
    72,000 cells); the normal quantile 1.645 would not hold that rate with few draws."""
    delta, control = synthetic(2000, draws, seed=draws)
    z = z_scores(delta, control)
    rate = float((z > null_bound(draws, 0.05)).double().mean())
    standard_error = (0.05 * 0.95 / z.numel()) ** 0.5
    assert abs(rate - 0.05) < 4 * standard_error, rate
    if draws == 4:
        assert float((z > 1.645).double().mean()) > 0.09  # why the t correction is needed


def test_pure_noise_is_not_called_dominant_beyond_the_stated_rate():
    trials, draws = 20000, 10
    delta, control = synthetic(trials, draws, seed=1)
    rows = dominant_rows(z_scores(delta, control), null_bound(draws))
    row_rate = float(rows.double().mean())
    assert row_rate <= 0.05 + 3 * (0.05 * 0.95 / rows.numel()) ** 0.5, row_rate  # each row: at most alpha
    promised = dominance(torch.zeros(SIZE, SIZE), draws).false_positive_rate
    assert promised == pytest.approx(8.6e-5, rel=0.01)
    false_calls = int((rows.sum(-1) >= 4).sum())
    assert false_calls <= 6, false_calls  # P(Poisson(20000 * 8.6e-5 = 1.7) >= 7) = 0.0015


def test_a_planted_diagonal_is_found():
    delta, control = synthetic(500, 10, seed=2, planted=6 * torch.eye(SIZE, dtype=torch.float64))
    found = [dominance(z, 10).dominant for z in z_scores(delta, control)]
    assert sum(found) >= 0.95 * len(found), sum(found)
    verdict = dominance_sentence(dominance(z_scores(delta, control)[0], 10))
    assert verdict.startswith("The diagonal dominates: in ") and "1.92 control SDs" in verdict
    assert verdict.count(".") == 3  # one sentence ("1.92", "0.05" and the full stop)


@pytest.mark.parametrize(
    "where",
    ["two rows only", "one column", "all cells"],
)
def test_effects_that_are_not_diagonal_are_not_called_dominant(where):
    """Two categories with strong ISNs are not a majority; a set that hurts one category whoever owns
    it (a column), or every category alike, has no diagonal to speak of."""
    planted = torch.zeros(SIZE, SIZE, dtype=torch.float64)
    if where == "two rows only":
        planted[0, 0] = planted[1, 1] = 6
    elif where == "one column":
        planted[:, 2] = 6
    else:
        planted[:] = 6
    delta, control = synthetic(500, 10, seed=3, planted=planted)
    found = [dominance(z, 10).dominant for z in z_scores(delta, control)]
    assert sum(found) <= 0.05 * len(found), sum(found)


def test_z_scores_of_constant_controls():
    control = torch.zeros(3, 1, 2)
    assert z_scores(torch.tensor([[0.0, 1.0]]), control).tolist() == [[0.0, float("inf")]]
    with pytest.raises(ValueError, match="control_draws must be >= 2, got 1"):
        null_bound(1)
