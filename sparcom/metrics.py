"""Metrics on ISN/ISE sets and frequencies: Jaccard, Pearson, the 6x6 overlap matrix,
general and unique ISNs, and the layer profile. Pure functions: no I/O, no hooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparcom.select import NeuronSet, category_isn, expert_frequency, flatten, instruction_isn
from sparcom.snapshot import Snapshot


def jaccard(a: NeuronSet, b: NeuronSet) -> float:
    """``|a & b| / |a | b|`` over all sites of two sets; 1.0 when both are empty (they are equal)."""
    x, y = flatten(a), flatten(b, list(a))
    union = int((x | y).sum())
    return 1.0 if union == 0 else int((x & y).sum()) / union


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two vectors; nan when either is constant."""
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    denominator = torch.sqrt((x * x).sum() * (y * y).sum())
    return float("nan") if denominator == 0 else float((x * y).sum() / denominator)


def isn_alteration(
    base: Snapshot, tuned: Snapshot, epsilon: float, mode: str = "threshold"
) -> dict[str, float]:
    """Per category: Jaccard of the category's ISN sets in two snapshots (the paper's Table 1)."""
    return {
        c: jaccard(category_isn(base, c, epsilon, mode), category_isn(tuned, c, epsilon, mode))
        for c in base.categories
    }


def ise_alteration(base: Snapshot, tuned: Snapshot) -> dict[str, float]:
    """Per category: Pearson correlation of expert frequencies ``q`` over all layers and experts (Table 2).
    Empty for dense models."""
    out = {}
    for category in base.categories:
        q_base, q_tuned = expert_frequency(base, category), expert_frequency(tuned, category)
        if q_base:
            out[category] = pearson(torch.cat([q.flatten() for q in q_base.values()]),
                                    torch.cat([q_tuned[s].flatten() for s in q_base]))  # fmt: skip
    return out


def pairwise_jaccard(vectors: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``[N, M]`` bool -> ``[N, N]`` Jaccard of every pair of rows (1.0 where both rows are empty).

    Intersections are one float matmul, taken over column chunks so memory stays ``O(N * chunk)``;
    float32 sums of 0/1 are exact below 2**24 per chunk.
    """
    inter = torch.zeros(vectors.shape[0], vectors.shape[0], dtype=torch.float64)
    for start in range(0, vectors.shape[1], chunk):
        block = vectors[:, start : start + chunk].float()
        inter += (block @ block.T).double()
    sizes = vectors.sum(dim=1, dtype=torch.float64)
    union = sizes[:, None] + sizes[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def overlap_matrix(snapshot: Snapshot, epsilon: float, mode: str = "threshold") -> torch.Tensor:
    """``[C, C]`` mean pairwise Jaccard of per-instruction ISN sets between categories.

    Entry ``(a, b)`` averages over pairs (one instruction of ``a``, one of ``b``); the diagonal
    averages over pairs of distinct instructions of the same category.
    """
    count = len(snapshot.instruction_ids)
    vectors = torch.stack([flatten(instruction_isn(snapshot, i, epsilon, mode)) for i in range(count)])
    return category_block_means(
        pairwise_jaccard(vectors), snapshot.instruction_categories, snapshot.categories
    )


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
    """General ISNs are in every category's set; a category's unique ISNs are in its set only."""
    categories = list(category_sets)
    sites = list(category_sets[categories[0]])
    general = {s: torch.stack([category_sets[c][s] for c in categories]).all(dim=0) for s in sites}
    unique = {}
    for category in categories:
        others = [c for c in categories if c != category]
        unique[category] = {
            s: category_sets[category][s] & ~torch.stack([category_sets[c][s] for c in others]).any(dim=0)
            if others
            else category_sets[category][s]
            for s in sites
        }
    return general, unique


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
