"""Causal check: silence a category's ISNs and measure the response loss on every category, against
a null of random neurons drawn from the same sites in the same numbers, many times.

Every cell of the ``[C, C]`` loss-change matrix gets a z-score against its own control draws, and
"the diagonal dominates" is decided on those z-scores (``dominance``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy import stats
from torch import nn

from sparcom.data import Record
from sparcom.response_loss import ResponseLoss
from sparcom.select import category_isns
from sparcom.snapshot import Snapshot
from sparcom.steer import loss_changes


def ablation_matrices(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    snapshot: Snapshot,
    epsilon: float,
    mode: str = "threshold",
    seed: int = 0,
    batch_size: int = 8,
    control_draws: int = 10,
    alpha: float = 0.05,
    max_length: int | None = None,
    isn_set: str = "frequent",
) -> dict:
    """Loss changes with each category's ISNs zeroed, and their null.

    Returns:
        ``delta``: ``[C, C]``, entry ``[a, b]`` the response loss on category ``b`` with category
        ``a``'s ISNs zeroed minus the intact loss; ``control_draws``: ``[D, C, C]`` the same with
        random neurons of equal count per site, ``D`` seeded draws per row; ``control`` and
        ``control_sd``: their mean and SD over draws; ``z``: ``[C, C]`` z-scores of ``delta`` against
        the draws; ``dominance``: the verdict (see ``dominance``); ``intact``: ``[C]``;
        ``neurons``: the ISN count of each category.
    """
    null_bound(control_draws, alpha)  # refuse a bad alpha or draw count before the long passes
    categories = snapshot.categories
    sets = category_isns(snapshot, epsilon, mode, isn_set)
    loss = ResponseLoss(tokenizer, records, categories, batch_size, max_length)
    changes = loss_changes(model, loss, sets, [0.0], control_draws, seed)
    delta, draws = changes.delta[0], changes.control[0]
    z = z_scores(delta, draws)
    return {
        "delta": delta,
        "control": draws.mean(0),
        "control_sd": draws.std(0),
        "control_draws": draws,
        "z": z,
        "dominance": dominance(z, control_draws, alpha),
        "intact": changes.intact,
        "neurons": changes.neurons,
    }


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


def dominance(z: torch.Tensor, draws: int, alpha: float = 0.05, two_sided: bool = False) -> dict:
    """Does the diagonal dominate? Yes when a majority of rows (4 of 6) are dominant rows: the
    diagonal z above ``null_bound(draws, alpha)`` and above every off-diagonal z of the row
    (``two_sided``: the same on ``|z|`` at ``alpha / 2`` per side, for edits whose direction is not
    known in advance, such as amplifying neurons).

    Under the null (ISN changes exchangeable with normal control draws) a row passes with
    probability at most ``alpha``; rows use separate neuron sets and draws, so a false "dominates"
    has probability at most ``P(Binomial(C, alpha) >= majority)``: 8.6e-5 for 6 rows at 0.05.
    Returns the passing rows, the bound, that rate, ``dominant`` and a one-sentence ``verdict``.
    """
    size = z.shape[-1]
    bound = null_bound(draws, alpha / 2 if two_sided else alpha)
    passing = dominant_rows(z.abs() if two_sided else z, bound)
    majority = size // 2 + 1
    count = int(passing.sum())
    false_positive = float(stats.binom.sf(majority - 1, size, alpha))
    dominant = count >= majority
    where = "further than" if two_sided else "more than"
    side = "from" if two_sided else "above"
    rule = f"two-sided {alpha:g}" if two_sided else f"one-sided {alpha:g}"
    verdict = (
        f"The diagonal {'dominates' if dominant else 'does not dominate'}: in {count} of {size} rows the "
        f"loss change on the row's own category lies {where} {bound:.2f} control SDs {side} the mean of "
        f"{draws} random-neuron draws (z, {rule} bound) and {'further out than' if two_sided else 'above'} "
        f"every other z of its row, and the rule asks for {majority} of {size} (false-positive rate at "
        f"most {false_positive:.1g})."
    )
    return {
        "rows": [bool(r) for r in passing],
        "bound": bound,
        "majority": majority,
        "alpha": alpha,
        "false_positive_rate": false_positive,
        "dominant": dominant,
        "verdict": verdict,
    }
