"""Causal check: silence a category's ISNs and measure the response loss on every category, against
a null of random neurons drawn from the same sites in the same numbers, many times.

Every cell of the ``[C, C]`` loss-change matrix gets a z-score against its own control draws, and
"the diagonal dominates" is decided on those z-scores (``dominance``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sparcom.data import Record
from sparcom.edit.effects import Dominance, Edits, dominance, loss_changes, null_bound, z_scores
from sparcom.recording.response_loss import ResponseLoss
from sparcom.snapshot import Snapshot
from sparcom.stats.select import category_isns


@dataclass(frozen=True)
class Ablation:
    """Loss changes with each category's ISNs zeroed, and their null.

    Attributes:
        delta: ``[C, C]``, entry ``[a, b]`` the response loss on category ``b`` with category ``a``'s
            ISNs zeroed minus the intact loss.
        control_draws: ``[D, C, C]`` the same with random neurons of equal count per site, ``D``
            seeded draws per row; ``control`` and ``control_sd``: ``[C, C]`` their mean and SD.
        z: ``[C, C]`` z-scores of ``delta`` against the draws.
        dominance: the verdict (``sparcom.edit.effects.dominance``).
        intact: ``[C]`` the unchanged model's response loss per category.
        neurons: the ISN count of each category.
    """

    delta: torch.Tensor
    control: torch.Tensor
    control_sd: torch.Tensor
    control_draws: torch.Tensor
    z: torch.Tensor
    dominance: Dominance
    intact: torch.Tensor
    neurons: list[int]


def ablation_matrices(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    snapshot: Snapshot,
    edits: Edits | None = None,
    *,
    max_length: int | None = None,
) -> Ablation:
    """Loss changes with each category's ISNs (``edits``: which, the null's draws, the verdict's
    alpha) zeroed, and their null."""
    edits = edits or Edits()
    null_bound(edits.control_draws, edits.alpha)  # refuse a bad alpha or draw count before the long passes
    categories = snapshot.categories
    sets = category_isns(snapshot, edits.epsilon, edits.selection_mode, edits.isn_set)
    loss = ResponseLoss(tokenizer, records, categories, edits.batch_size, max_length)
    changes = loss_changes(model, loss, sets, [0.0], edits.control_draws, edits.seed)
    delta, draws = changes.delta[0], changes.control[0]
    z = z_scores(delta, draws)
    return Ablation(
        delta=delta,
        control=draws.mean(0),
        control_sd=draws.std(0),
        control_draws=draws,
        z=z,
        dominance=dominance(z, edits.control_draws, edits.alpha),
        intact=changes.intact,
        neurons=changes.neurons,
    )
