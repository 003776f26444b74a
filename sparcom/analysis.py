"""The paper's analyses, from snapshots alone (no forward pass): alteration tables, epsilon sweeps,
general/unique ISNs, layer profiles, and the token-overlap control. Pure functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparcom.conversation import encode
from sparcom.data import Record
from sparcom.metrics import (
    category_block_means,
    general_and_unique,
    ise_alteration,
    isn_alteration,
    layer_profile,
    pairwise_jaccard,
    pearson,
    size,
)
from sparcom.select import category_isn
from sparcom.snapshot import Snapshot


def isn_table(base: Snapshot, tuned: Snapshot, epsilons: Sequence[float], mode: str) -> list[list]:
    """Rows ``[category, J(eps_1), J(eps_2), ...]`` and a final mean row: the paper's Table 1."""
    columns = [isn_alteration(base, tuned, epsilon, mode) for epsilon in epsilons]
    rows = [[c, *[column[c] for column in columns]] for c in base.categories]
    return rows + [["mean", *[sum(col.values()) / len(col) for col in columns]]]


def ise_table(base: Snapshot, tuned: Snapshot) -> list[list]:
    """Rows ``[category, Pearson]`` and a mean row (the paper's Table 2); empty for dense models."""
    pearson_by_category = ise_alteration(base, tuned)
    if not pearson_by_category:
        return []
    rows = [[c, v] for c, v in pearson_by_category.items()]
    return rows + [["mean", sum(pearson_by_category.values()) / len(pearson_by_category)]]


def epsilon_sweep(
    base: Snapshot, tuned: Snapshot, epsilons: Sequence[float], mode: str
) -> dict[str, list[float]]:
    """Jaccard of base vs tuned ISN sets per category at every epsilon, from the stored counts."""
    per_epsilon = [isn_alteration(base, tuned, epsilon, mode) for epsilon in epsilons]
    return {c: [values[c] for values in per_epsilon] for c in base.categories}


def general_unique_rows(snapshot: Snapshot, epsilon: float, mode: str) -> list[list]:
    """Rows ``[category, ISNs, unique ISNs]`` and a final ``[general, count, -]`` row."""
    sets = {c: category_isn(snapshot, c, epsilon, mode) for c in snapshot.categories}
    general, unique = general_and_unique(sets)
    rows = [[c, size(sets[c]), size(unique[c])] for c in snapshot.categories]
    return rows + [["general (all six)", size(general), "-"]]


def layer_profiles(snapshot: Snapshot, epsilon: float, mode: str) -> dict[str, list[int]]:
    """ISN count per layer for each category."""
    layers = max(snapshot.site_layers.values()) + 1
    return {
        c: layer_profile(category_isn(snapshot, c, epsilon, mode), snapshot.site_layers, layers)
        for c in snapshot.categories
    }


def token_overlap(snapshot: Snapshot, records_by_id: dict[str, Record], tokenizer) -> torch.Tensor:
    """``[C, C]`` mean pairwise Jaccard of the vocabularies (sets of token ids counted under the
    snapshot's token scope) of its instructions: the same statistic as the ISN overlap matrix,
    on tokens instead of neurons, so the two can be compared entry by entry."""
    scope = snapshot.meta["token_scope"]
    vocabulary = len(tokenizer)
    rows = []
    for instruction_id in snapshot.instruction_ids:
        encoded = encode(records_by_id[instruction_id], tokenizer)
        present = torch.zeros(vocabulary, dtype=torch.bool)
        present[encoded.input_ids[encoded.scope_mask(scope)]] = True
        rows.append(present)
    return category_block_means(
        pairwise_jaccard(torch.stack(rows)), snapshot.instruction_categories, snapshot.categories
    )


def matrix_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two symmetric matrices over their upper triangles (diagonal included)."""
    upper = torch.triu_indices(a.shape[0], a.shape[1])
    return pearson(a[upper[0], upper[1]], b[upper[0], upper[1]])
