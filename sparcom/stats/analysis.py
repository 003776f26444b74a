"""The paper's analyses of snapshots, streamed site by site (no forward pass).

Nothing here holds every site's sets at once: each pass reads one site's counts, selects that
site's ISNs (for every category, epsilon and snapshot it needs), adds what it needs to small
per-site tallies, and moves on. Whole-model numbers (Jaccard, layer profiles, general and unique
counts, chance levels) are sums of those tallies. Memory is bounded by one site, so the paper's
own models (2.2 M neurons per instruction, 1,200 instructions) fit on a workstation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from sparcom.data import Record
from sparcom.recording.conversation import encode
from sparcom.snapshot import Snapshot
from sparcom.stats.estimates import expected_jaccard
from sparcom.stats.metrics import (
    category_block_means,
    jaccard_from_counts,
    jaccard_ratio,
    pairwise_jaccard,
    pearson,
    shared_counts,
)
from sparcom.stats.select import NEURON_KINDS, GlobalTopFraction, expert_frequency, select_rows, unique_rows

# Columns of a site processed at once by the pairwise-overlap pass: bounds its working set to
# about N x 16 k float32 values (80 MB for 1,200 instructions) whatever the site's width.
CHUNK_COLUMNS = 1 << 14


def neuron_sites(snapshot: Snapshot) -> list[str]:
    """FFN and routed-expert neuron sites, in the snapshot's order (routers are experts, not neurons)."""
    return [s for s, kind in snapshot.site_kinds.items() if kind in NEURON_KINDS]


def site_sets(
    rows: Sequence[tuple[Snapshot, str]], epsilon: float, mode: str
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """For each neuron site: the ISN sets of the given count rows, ``[R, *shape]`` bool each.

    ``rows`` names, per snapshot, which rows to select from: ``"category"`` (one row per
    category, frequencies over all its tokens) or ``"instruction"`` (one row per instruction).
    ``percentile_global`` ranks over all sites, so it reads every site twice.
    """
    sites = neuron_sites(rows[0][0])
    tokens = [_totals(snapshot, which) for snapshot, which in rows]
    if mode != "percentile_global":
        for site in sites:
            yield (
                site,
                [
                    select_rows(_counts(s, w, site), t, epsilon, mode)
                    for (s, w), t in zip(rows, tokens, strict=True)
                ],
            )
        return
    width = sum(_width(rows[0][0], site) for site in sites)
    selectors = [GlobalTopFraction(epsilon, len(t), width) for t in tokens]
    for site in sites:
        for selector, (snapshot, which) in zip(selectors, rows, strict=True):
            selector.observe(_counts(snapshot, which, site))
    for site in sites:
        yield site, [sel.select(_counts(s, w, site)) for sel, (s, w) in zip(selectors, rows, strict=True)]


def _counts(snapshot: Snapshot, which: str, site: str) -> torch.Tensor:
    if which == "category":
        return snapshot.category_counts[site]
    return snapshot.require_instructions("instruction-level ISN sets")[site]


def _totals(snapshot: Snapshot, which: str) -> torch.Tensor:
    return snapshot.category_tokens if which == "category" else snapshot.instruction_tokens


def _width(snapshot: Snapshot, site: str) -> int:
    return int(torch.tensor(snapshot.site_shape(site)).prod())


# --------------------------------------------------------------------- category-level tallies


@dataclass(frozen=True)
class Tallies:
    """Per-site tallies of the category ISN sets of one or two snapshots at one epsilon.

    Attributes:
        sizes: per snapshot, ``[C, S]`` ISNs of each category in each neuron site.
        unique: per snapshot, ``[C, S]`` ISNs in that category's set and no other's.
        general: per snapshot, ``[S]`` ISNs in every category's set.
        shared: ``[C, S]`` ISNs in both snapshots' sets of a category (None for one snapshot).
        shared_unique: ``[C, S]`` the same for the unique ISNs (None for one snapshot).
        widths: ``[S]`` neurons per site; layers: ``[S]`` layer of each site.
    """

    categories: list[str]
    sites: list[str]
    sizes: list[torch.Tensor]
    unique: list[torch.Tensor]
    general: list[torch.Tensor]
    shared: torch.Tensor | None
    widths: torch.Tensor
    layers: torch.Tensor
    shared_unique: torch.Tensor | None = None

    def jaccard(self, category: str, unique: bool = False) -> float:
        """``|A & B| / |A | B|`` over all sites of a category's ISN sets (``unique``: of its unique
        ISNs); nan when both sets are empty (``jaccard_ratio``)."""
        row = self.categories.index(category)
        sizes, shared = (self.unique, self.shared_unique) if unique else (self.sizes, self.shared)
        return float(jaccard_ratio(int(shared[row].sum()), *(int(sizes[k][row].sum()) for k in (0, 1))))

    def chance(self, category: str, unique: bool = False) -> float:
        """The Jaccard two random sets of this category's per-site sizes (``unique``: of its unique
        ISNs) would have: the level ``jaccard`` is read against."""
        row = self.categories.index(category)
        sizes = self.unique if unique else self.sizes
        return expected_jaccard(sizes[0][row], sizes[1][row], self.widths)

    def layer_profile(self, category: str, snapshot: int = 0) -> list[int]:
        """ISN count per layer (a layer's FFN, shared-expert and routed-expert neurons together)."""
        profile = torch.zeros(int(self.layers.max()) + 1, dtype=torch.int64)
        profile.index_add_(0, self.layers, self.sizes[snapshot][self.categories.index(category)])
        return profile.tolist()

    def count(self, category: str, snapshot: int = 0) -> int:
        return int(self.sizes[snapshot][self.categories.index(category)].sum())

    def unique_count(self, category: str, snapshot: int = 0) -> int:
        return int(self.unique[snapshot][self.categories.index(category)].sum())

    def general_count(self, snapshot: int = 0) -> int:
        return int(self.general[snapshot].sum())


def category_tallies(
    snapshots: Sequence[Snapshot], epsilons: Sequence[float], mode: str
) -> dict[float, Tallies]:
    """Tallies of one snapshot, or of a pair (base, tuned), at every epsilon: one read per site."""
    first = snapshots[0]
    sites = neuron_sites(first)
    results = {}
    for epsilon in dict.fromkeys(epsilons):  # keep order, drop repeats
        sizes, unique, general = ([[] for _ in snapshots] for _ in range(3))
        shared, shared_unique = [], []
        for _, sets in site_sets([(s, "category") for s in snapshots], epsilon, mode):
            flat = [chosen.reshape(chosen.shape[0], -1) for chosen in sets]
            only = [unique_rows(chosen) for chosen in flat]
            for index, chosen in enumerate(flat):
                sizes[index].append(chosen.sum(1))
                unique[index].append(only[index].sum(1))
                general[index].append(chosen.all(0).sum())
            if len(flat) == 2:
                shared.append((flat[0] & flat[1]).sum(1))
                shared_unique.append((only[0] & only[1]).sum(1))
        results[epsilon] = Tallies(
            categories=list(first.categories),
            sites=sites,
            sizes=[torch.stack(s, 1) for s in sizes],
            unique=[torch.stack(u, 1) for u in unique],
            general=[torch.stack(g) for g in general],
            shared=torch.stack(shared, 1) if shared else None,
            widths=torch.tensor([_width(first, s) for s in sites]),
            layers=torch.tensor([first.site_layers[s] for s in sites]),
            shared_unique=torch.stack(shared_unique, 1) if shared_unique else None,
        )
    return results


def isn_alteration(
    base: Snapshot, tuned: Snapshot, epsilon: float, mode: str = "threshold"
) -> dict[str, float]:
    """Per category: Jaccard of the category's ISN sets in two snapshots (the paper's Table 1)."""
    tallies = category_tallies([base, tuned], [epsilon], mode)[epsilon]
    return {c: tallies.jaccard(c) for c in base.categories}


def layer_profiles(snapshot: Snapshot, epsilon: float, mode: str = "threshold") -> dict[str, list[int]]:
    """ISN count per layer for each category."""
    tallies = category_tallies([snapshot], [epsilon], mode)[epsilon]
    return {c: tallies.layer_profile(c) for c in snapshot.categories}


# ------------------------------------------------------------------------------ experts


def expert_frequencies(snapshot: Snapshot, category: str) -> torch.Tensor:
    """``[sum of E over router sites]`` ``q`` of one category: the fraction of its tokens that
    selected each expert, every layer's experts in site order (empty for dense models)."""
    per_router = expert_frequency(snapshot, category)
    return torch.cat([q.flatten() for q in per_router.values()]) if per_router else torch.zeros(0)


def ise_alteration(base: Snapshot, tuned: Snapshot) -> dict[str, float]:
    """Per category: Pearson correlation of expert frequencies ``q`` over all layers and experts
    (the paper's Table 2). Empty for dense models."""
    if not base.sites("router"):
        return {}
    return {c: pearson(expert_frequencies(base, c), expert_frequencies(tuned, c)) for c in base.categories}


# -------------------------------------------------------------------- instruction-level overlap


def instruction_similarity(snapshot: Snapshot, epsilon: float, mode: str = "threshold") -> torch.Tensor:
    """``[N, N]`` float64 Jaccard of every pair of instructions' ISN sets (1.0 where both are empty).

    Intersections are products of 0/1 matrices, over at most ``CHUNK_COLUMNS`` columns of one
    site at a time; columns chosen by no instruction are skipped.
    """
    count = len(snapshot.instruction_ids)
    intersections = torch.zeros(count, count, dtype=torch.float64)
    sizes = torch.zeros(count, dtype=torch.float64)
    for _, (chosen,) in site_sets([(snapshot, "instruction")], epsilon, mode):
        flat = chosen.reshape(count, -1)
        flat = flat[:, flat.any(0)]  # a column no instruction chose adds nothing to any pair
        for start in range(0, flat.shape[1], CHUNK_COLUMNS):
            intersections += shared_counts(flat[:, start : start + CHUNK_COLUMNS])
        sizes += flat.sum(1, dtype=torch.float64)
    return jaccard_from_counts(intersections, sizes)


def overlap_matrix(snapshot: Snapshot, epsilon: float, mode: str = "threshold") -> torch.Tensor:
    """``[C, C]`` mean pairwise Jaccard of per-instruction ISN sets between categories.

    Entry ``(a, b)`` averages over pairs (one instruction of ``a``, one of ``b``); the diagonal
    averages over pairs of distinct instructions of the same category.
    """
    similarity = instruction_similarity(snapshot, epsilon, mode)
    return category_block_means(similarity, snapshot.instruction_categories, snapshot.categories)


def token_similarity(snapshot: Snapshot, records_by_id: dict[str, Record], tokenizer) -> torch.Tensor:
    """``[N, N]`` Jaccard of every pair of instructions' vocabularies (the sets of token ids the
    snapshot's token scope counts): the ISN overlap statistic on tokens instead of neurons."""
    scope = snapshot.meta["token_scope"]
    rows = []
    for instruction_id in snapshot.instruction_ids:
        if scope == "generated":  # the model's own words, as counted
            rows.append(torch.tensor(snapshot.generated[instruction_id], dtype=torch.long).unique())
            continue
        encoded = encode(records_by_id[instruction_id], tokenizer)
        rows.append(torch.unique(encoded.input_ids[encoded.scope_mask(scope)]))
    vocabulary = torch.cat(rows).unique()  # only the ids that occur: a few thousand columns
    present = torch.zeros(len(rows), len(vocabulary), dtype=torch.bool)
    for row, ids in enumerate(rows):
        present[row, torch.searchsorted(vocabulary, ids)] = True
    return pairwise_jaccard(present)


def matrix_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two symmetric matrices over their upper triangles (diagonal included)."""
    upper = torch.triu_indices(a.shape[0], a.shape[1])
    return pearson(a[upper[0], upper[1]], b[upper[0], upper[1]])
