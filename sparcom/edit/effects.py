"""The measurement behind ablation and steering, and its null: scale a set of neurons (and, as
the control, random sets with the same counts in every site and expert), measure the response loss
of every category, and score each change against its control draws.

``loss_changes`` is the one loop of edited passes (``sparcom.edit.ablation`` takes scale 0,
``sparcom.edit.steer`` a dose-response over scales); ``z_scores``, ``null_bound`` and ``dominance`` decide
whether a category's own neurons move its own loss more than random ones do, and more than any
other category's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy import stats
from torch import nn

from sparcom.edit.intervention import check_editable, check_neurons, intervene, neuron_sites, random_sets
from sparcom.recording.response_loss import ResponseLoss
from sparcom.stats.select import NeuronSet


@dataclass(frozen=True)
class Edits:
    """Which neurons ablation and steering edit, on what they are evaluated, against what null.

    Attributes:
        epsilon: the ISNs edited are selected on the snapshot at this epsilon...
        selection_mode: ...in this selection mode...
        isn_set: ...and are frequent (the paper's ISNs) or unique (in no other category's set).
        per_category: held-out instructions evaluated per category.
        seed: which held-out instructions, and the control's random neurons.
        batch_size: conversations per forward pass.
        control_draws: random-neuron sets with each edited set's counts per site and expert: the null.
        alpha: the significance level of the verdict (``dominance``).
    """

    epsilon: float = 0.5
    selection_mode: str = "threshold"
    isn_set: str = "frequent"
    per_category: int = 20
    seed: int = 0
    batch_size: int = 8
    control_draws: int = 10
    alpha: float = 0.05


@dataclass(frozen=True)
class Dominance:
    """Whether the diagonal of a ``[C, C]`` z-score matrix dominates (``dominance``).

    Attributes:
        rows: for each row, whether it passes: its diagonal z beyond ``bound`` and beyond every other z
            of the row.
        bound: the z a diagonal cell must exceed (``null_bound``; on ``|z|`` when ``two_sided``).
        majority: how many rows must pass.
        dominant: at least ``majority`` rows pass.
        false_positive_rate: the most often ``dominant`` can be true under the null.
        alpha, two_sided, draws: the rule's level, its sidedness and the control draws behind each z.
    """

    rows: list[bool]
    bound: float
    majority: int
    dominant: bool
    false_positive_rate: float
    alpha: float
    two_sided: bool
    draws: int


@dataclass(frozen=True)
class LossChanges:
    """Response-loss changes under scaled neurons.

    Attributes:
        steered: the neuron sets' names (rows), e.g. categories whose ISNs are scaled.
        evaluated: the categories the loss is measured on (columns).
        scales: the scales applied.
        intact: ``[C]`` loss of the unchanged model.
        delta: ``[S, R, C]`` loss with set ``r`` scaled by ``scales[s]``, minus ``intact``.
        control: ``[S, D, R, C]`` the same for each of ``D`` random sets with set ``r``'s per-site counts.
        neurons: the size of each set.
    """

    steered: list[str]
    evaluated: list[str]
    scales: list[float]
    intact: torch.Tensor
    delta: torch.Tensor
    control: torch.Tensor
    neurons: list[int]


def check_scales(scales: Sequence[float]) -> list[float]:
    bad = [s for s in scales if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s)]
    if not scales or bad:
        raise ValueError(f"scales must be a non-empty list of finite numbers, got {list(scales)!r}")
    return [float(s) for s in scales]


def loss_changes(
    model: nn.Module,
    loss: ResponseLoss,
    neuron_sets: dict[str, NeuronSet],
    scales: Sequence[float],
    control_draws: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> LossChanges:
    """Scale each set, and each of its random controls, by every scale; measure the loss change.

    Costs ``1 + len(neuron_sets) * len(scales != 1) * (1 + control_draws)`` passes of ``loss``: a
    scale of 1 changes nothing, so its changes are 0 without a pass. Each pass is a forward over
    the records (the time goes there: ``make bench``, section ``edits``); a progress bar names the
    set, the scale and the draw.
    """
    from tqdm.auto import tqdm

    scales = check_scales(scales)
    sites = neuron_sites(model)
    for neurons in neuron_sets.values():
        check_neurons(neurons, sites)
        check_editable(model, neurons)  # before the intact pass, not after it
    generator = torch.Generator().manual_seed(seed)
    draws = {name: random_sets(neurons, control_draws, generator) for name, neurons in neuron_sets.items()}
    intact = loss(model)
    rows, columns = len(neuron_sets), len(loss.categories)
    delta = torch.zeros(len(scales), rows, columns, dtype=torch.float64)
    control = torch.zeros(len(scales), control_draws, rows, columns, dtype=torch.float64)
    passes = len(neuron_sets) * sum(s != 1 for s in scales) * (1 + control_draws)
    bar = tqdm(total=passes, desc="edited passes", unit="pass", disable=not progress)
    for row, (name, neurons) in enumerate(neuron_sets.items()):
        for index, scale in enumerate(scales):
            if scale == 1:
                continue
            for draw, edited in enumerate([neurons, *draws[name]]):
                bar.set_postfix_str(
                    f"{name}, scale {scale:g}, " + ("its ISNs" if draw == 0 else f"control {draw}")
                )
                with intervene(model, edited, scale):
                    changed = loss(model) - intact
                if draw == 0:
                    delta[index, row] = changed
                else:
                    control[index, draw - 1, row] = changed
                bar.update()
    bar.close()
    sizes = [int(sum(int(chosen.sum()) for chosen in s.values())) for s in neuron_sets.values()]
    return LossChanges(list(neuron_sets), list(loss.categories), scales, intact, delta, control, sizes)


def z_scores(delta: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """``[..., R, C]`` observed changes and ``[..., D, R, C]`` control draws -> ``[..., R, C]``
    ``(delta - mean) / sd`` over the draws (sample SD). Where every draw is equal, a cell that equals
    them scores 0 and one that differs scores +-inf."""
    mean, sd = draws.mean(-3), draws.std(-3)
    difference = delta - mean
    degenerate = torch.where(difference == 0, 0.0, torch.sign(difference) * torch.inf)
    return torch.where(sd > 0, difference / sd, degenerate)


def null_bound(draws: int, alpha: float = 0.05) -> float:
    """The one-sided ``1 - alpha`` quantile of a cell's z-score when the ISN change is one more draw
    from a normal control distribution: ``(X - mean) / sd`` over ``D`` draws is
    ``sqrt(1 + 1/D)`` times Student's t with ``D - 1`` degrees of freedom (1.92 for D = 10, alpha = 0.05)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if draws < 2:
        raise ValueError(f"control_draws must be >= 2, got {draws!r}")
    return float((1 + 1 / draws) ** 0.5 * stats.t.ppf(1 - alpha, draws - 1))


def dominant_rows(z: torch.Tensor, bound: float) -> torch.Tensor:
    """``[..., C, C]`` z -> ``[..., C]`` bool: rows whose diagonal z exceeds ``bound`` and every other
    z of the row."""
    size = z.shape[-1]
    diagonal = z.diagonal(dim1=-2, dim2=-1)
    others = z.masked_fill(torch.eye(size, dtype=torch.bool), -torch.inf).amax(-1)
    return (diagonal > bound) & (diagonal > others)


def dominance(z: torch.Tensor, draws: int, alpha: float = 0.05, two_sided: bool = False) -> Dominance:
    """Does the diagonal dominate? Yes when a majority of rows (4 of 6) are dominant rows: the
    diagonal z above ``null_bound(draws, alpha)`` and above every off-diagonal z of the row
    (``two_sided``: the same on ``|z|`` at ``alpha / 2`` per side, for edits whose direction is not
    known in advance, such as amplifying neurons).

    Under the null (ISN changes exchangeable with normal control draws) a row passes with
    probability at most ``alpha``; rows use separate neuron sets and draws, so a false "dominates"
    has probability at most ``P(Binomial(C, alpha) >= majority)``: 8.6e-5 for 6 rows at 0.05.
    """
    size = z.shape[-1]
    bound = null_bound(draws, alpha / 2 if two_sided else alpha)
    passing = dominant_rows(z.abs() if two_sided else z, bound)
    majority = size // 2 + 1
    return Dominance(
        rows=[bool(r) for r in passing],
        bound=bound,
        majority=majority,
        dominant=int(passing.sum()) >= majority,
        false_positive_rate=float(stats.binom.sf(majority - 1, size, alpha)),
        alpha=alpha,
        two_sided=two_sided,
        draws=draws,
    )
