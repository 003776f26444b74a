"""Metrics on ISN/ISE sets and frequencies: Jaccard, Pearson, pairwise Jaccard and its category
blocks, general and unique ISNs, and the layer profile. Pure functions on tensors: no snapshots,
no I/O, no hooks (``sparcom.stats.analysis`` applies them to snapshots, site by site)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from sparcom.stats.select import NeuronSet, flatten, unique_rows


def jaccard_ratio(intersection, size_a, size_b) -> torch.Tensor:
    """``I / (|A| + |B| - I)`` elementwise, in float64 (numbers or tensors of any shape). Undefined
    (nan) where both sets are empty: two empty ISN sets neither agree nor disagree, and a 1.0 there
    would read as "unchanged" on a figure. The one Jaccard of every comparison in sparcom."""
    intersection, size_a, size_b = (
        torch.as_tensor(v, dtype=torch.float64) for v in (intersection, size_a, size_b)
    )
    union = size_a + size_b - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.nan)


def defined_mean(values: Iterable[float]) -> float:
    """The mean of the defined values, nan when none is: a Jaccard of two empty sets is nan
    (``jaccard_ratio``) and is left out of a mean over categories rather than making it nan."""
    defined = [v for v in values if v == v]
    return sum(defined) / len(defined) if defined else float("nan")


def jaccard(a: NeuronSet, b: NeuronSet) -> float:
    """``|a & b| / |a | b|`` over all sites of two sets; nan when both are empty (``jaccard_ratio``)."""
    x, y = flatten(a), flatten(b, list(a))
    return float(jaccard_ratio(int((x & y).sum()), int(x.sum()), int(y.sum())))


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two vectors; nan when either is constant."""
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    denominator = torch.sqrt((x * x).sum() * (y * y).sum())
    return float("nan") if denominator == 0 else float((x * y).sum() / denominator)


def pairwise_jaccard(vectors: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """``[N, M]`` bool -> ``[N, N]`` Jaccard of every pair of rows (1.0 where both rows are empty).

    Intersections are taken over column chunks, so memory stays ``O(N * chunk)``.
    """
    intersections = torch.zeros(vectors.shape[0], vectors.shape[0], dtype=torch.float64)
    for start in range(0, vectors.shape[1], chunk):
        intersections += shared_counts(vectors[:, start : start + chunk])
    return jaccard_from_counts(intersections, vectors.sum(dim=1, dtype=torch.float64))


# Below these sizes the int8 kernel gains nothing, and torch 2.13's CPU kernel returns garbage for
# a single column; tests/test_metrics.py checks the kernel against float64 at the sizes used.
INT8_MIN_ROWS, INT8_MIN_COLUMNS = 16, 64


def shared_counts(chosen: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` bool -> ``[N, N]`` float64: how many columns each pair of rows shares. Large
    blocks take an int8 product with int32 sums (exact, about 2.5x the float32 speed on CPU);
    the rest a float32 one (exact below 2**24 columns)."""
    rows, columns = chosen.shape
    if rows >= INT8_MIN_ROWS and columns >= INT8_MIN_COLUMNS:
        int8 = chosen.to(torch.int8)
        try:
            return torch._int_mm(int8, int8.T.contiguous()).double()
        except RuntimeError:  # a device or shape the int8 kernel does not take
            pass
    block = chosen.float()
    return (block @ block.T).double()


def jaccard_from_counts(intersections: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` shared counts and ``[N]`` set sizes -> ``[N, N]`` Jaccard of instruction pairs, 1.0
    where both instructions have no ISN: for the overlap matrices two such instructions count as
    alike, so that block means over a category stay defined."""
    return jaccard_ratio(intersections, sizes[:, None], sizes[None, :]).nan_to_num(nan=1.0)


def category_block_means(
    similarity: torch.Tensor, row_categories: list[str], categories: list[str]
) -> torch.Tensor:
    """``[N, N]`` pairwise similarity of instructions -> ``[C, C]`` means over category blocks.

    Off the diagonal: all pairs (one of ``a``, one of ``b``); on it: pairs of distinct instructions.
    """
    rows = torch.tensor([categories.index(c) for c in row_categories])
    size = len(categories)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for a in range(size):
        for b in range(size):
            block = similarity[rows == a][:, rows == b]
            if a == b:
                n = block.shape[0]
                matrix[a, b] = (block.sum() - block.diagonal().sum()) / max(n * (n - 1), 1)
            else:
                matrix[a, b] = block.mean()
    return matrix


def general_and_unique(category_sets: dict[str, NeuronSet]) -> tuple[NeuronSet, dict[str, NeuronSet]]:
    """General ISNs are in every category's set; a category's unique ISNs are in its set only
    (``sparcom.stats.select.unique_rows``)."""
    categories = list(category_sets)
    stacked = {
        s: torch.stack([category_sets[c][s] for c in categories]) for s in category_sets[categories[0]]
    }
    general = {s: rows.all(dim=0) for s, rows in stacked.items()}
    only = {s: unique_rows(rows) for s, rows in stacked.items()}
    return general, {c: {s: rows[i] for s, rows in only.items()} for i, c in enumerate(categories)}


def layer_profile(sets: NeuronSet, site_layers: dict[str, int], num_layers: int | None = None) -> list[int]:
    """ISN count per layer (FFN, shared-expert and routed-expert neurons of a layer together)."""
    num_layers = num_layers or (max(site_layers[s] for s in sets) + 1)
    profile = [0] * num_layers
    for site, chosen in sets.items():
        profile[site_layers[site]] += int(chosen.sum())
    return profile


def size(sets: NeuronSet) -> int:
    return int(sum(int(s.sum()) for s in sets.values()))


def mean_over(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
