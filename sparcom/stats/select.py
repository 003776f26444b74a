"""Epsilon -> sets: instruction-specific neurons (ISNs) and experts (ISEs). Pure functions on tensors.

A set is a dict ``site -> bool tensor`` shaped like the site's counts: ``[d_ff]`` for an FFN,
``[num_experts, d_expert]`` for routed-expert neurons, ``[num_experts]`` for a router.
"""

from __future__ import annotations

import math

import torch

from sparcom.snapshot import Snapshot

SELECTION_MODES = ("threshold", "percentile_layer", "percentile_global")
NEURON_KINDS = ("ffn", "experts")

NeuronSet = dict[str, torch.Tensor]


def check_epsilon(epsilon: float) -> None:
    if not (isinstance(epsilon, int | float) and 0 < epsilon <= 1):
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon!r}")


def isn(frequency: dict[str, torch.Tensor], epsilon: float, mode: str = "threshold") -> NeuronSet:
    """ISN set from neuron frequencies ``p`` (router sites must already be excluded).

    - ``threshold``: neurons with ``p >= epsilon``.
    - ``percentile_layer``: in each site, the top ``ceil(epsilon * n)`` neurons by ``p``.
    - ``percentile_global``: the top ``ceil(epsilon * n)`` neurons by ``p`` over all sites.
    Ties in percentile modes are broken by position, so the set size is exact.
    """
    check_epsilon(epsilon)
    if mode == "threshold":
        return {site: p >= epsilon for site, p in frequency.items()}
    if mode == "percentile_layer":
        return {site: _top_fraction(p.flatten(), epsilon).reshape(p.shape) for site, p in frequency.items()}
    if mode == "percentile_global":
        sites = list(frequency)
        chosen = _top_fraction(torch.cat([frequency[s].flatten() for s in sites]), epsilon)
        sizes = [frequency[s].numel() for s in sites]
        return {
            s: part.reshape(frequency[s].shape) for s, part in zip(sites, chosen.split(sizes), strict=True)
        }
    raise ValueError(f"unknown selection mode {mode!r}; expected one of {list(SELECTION_MODES)}")


def _top_fraction(values: torch.Tensor, fraction: float) -> torch.Tensor:
    count = min(values.numel(), math.ceil(fraction * values.numel()))
    order = torch.sort(-values.double(), stable=True).indices[:count]
    chosen = torch.zeros(values.numel(), dtype=torch.bool)
    chosen[order] = True
    return chosen


# ------------------------------------------------------------ selection from counts, site by site
#
# The streaming form of ``isn``: rows of integer firing counts (one row per instruction, per
# category, or per resample) with each row's counted tokens, one site at a time, so that no
# analysis ever holds every site's sets at once. It selects exactly what ``isn`` selects from
# the frequencies ``count / max(T, 1)``.


def threshold_count(epsilon: float, totals: torch.Tensor) -> torch.Tensor:
    """``[R]`` the smallest count ``c`` with ``c / max(T, 1) >= epsilon`` in float64, per row total ``T``.

    Comparing counts with it selects exactly what comparing float64 frequencies with ``epsilon``
    selects, and works on any integer dtype (no frequency tensor is built).
    """
    check_epsilon(epsilon)
    totals = totals.double().clamp(min=1)
    count = torch.ceil(epsilon * totals)
    count = torch.where((count - 1) / totals >= epsilon, count - 1, count)  # ceil rounded up
    return torch.where(count / totals < epsilon, count + 1, count)  # ceil rounded down


def top_fraction_rows(counts: torch.Tensor, fraction: float) -> torch.Tensor:
    """``[R, n]`` counts -> ``[R, n]`` bool: the top ``ceil(fraction * n)`` of each row, ties by position."""
    rows, width = counts.shape
    keep = min(width, math.ceil(fraction * width))
    if keep == 0:
        return torch.zeros(rows, width, dtype=torch.bool)
    # The keep-th largest value of each row is the cutoff: everything above it, then the first ties
    # at it by position. A partial selection instead of a full sort (an order of magnitude faster).
    cutoff = torch.topk(counts, keep, dim=1, sorted=False).values.amin(1, keepdim=True)
    above = counts > cutoff
    tied = counts == cutoff
    quota = keep - above.sum(1, keepdim=True)
    return above | (tied & (tied.cumsum(1) <= quota))


class GlobalTopFraction:
    """Exact ``percentile_global`` selection over sites that arrive one at a time.

    Two passes over the same sites in the same order: ``observe`` every site's ``[R, n]`` counts
    (a histogram of count values per row), then ``select`` them. Row ``r`` keeps the top
    ``ceil(fraction * total)`` counts over all sites, ties broken by position (site order, then
    index), as ``isn(..., mode="percentile_global")`` does on the concatenated frequencies.
    """

    def __init__(self, fraction: float, rows: int, total: int):
        check_epsilon(fraction)
        self.keep = min(total, math.ceil(fraction * total))
        self.rows = rows
        self.total = total
        self.histogram = torch.zeros(rows, 1, dtype=torch.int64)
        self._at_least: torch.Tensor | None = None
        self._cutoff: torch.Tensor | None = None

    def observe(self, counts: torch.Tensor) -> None:
        values = counts.reshape(self.rows, -1).long()
        width = max(int(values.max()) + 1 if values.numel() else 1, self.histogram.shape[1])
        if width > self.histogram.shape[1]:
            grown = torch.zeros(self.rows, width, dtype=torch.int64)
            grown[:, : self.histogram.shape[1]] = self.histogram
            self.histogram = grown
        self.histogram.scatter_add_(1, values, torch.ones_like(values))

    def with_fraction(self, fraction: float) -> GlobalTopFraction:
        """A selector for another fraction over the counts observed so far: an epsilon sweep observes
        every site once and shares one histogram (``observe`` no longer applies to either)."""
        other = GlobalTopFraction(fraction, self.rows, self.total)
        other.histogram, other._at_least = None, self._counts_at_least()
        return other

    def _counts_at_least(self) -> torch.Tensor:
        """``at_least[r, v]``: how many counts of row r are >= v (a trailing 0 column for v = max + 1).
        It replaces the histogram (the largest tensor here), which is dropped once observing is over."""
        if self._at_least is None:
            suffix = self.histogram.sum(1, keepdim=True) - self.histogram.cumsum(1) + self.histogram
            self.histogram = None
            self._at_least = torch.cat([suffix, torch.zeros(self.rows, 1, dtype=torch.int64)], 1)
        return self._at_least

    def _finish(self) -> None:
        at_least = self._counts_at_least()
        # The cutoff is the largest value v with at_least >= keep (v = 0 always qualifies); at_least
        # falls as v grows, so that is how many values qualify, less one.
        self._cutoff = (at_least >= self.keep).sum(1) - 1
        above = at_least.gather(1, self._cutoff[:, None] + 1)[:, 0]
        self._quota = self.keep - above  # ties to take at the cutoff, in position order
        self._taken = torch.zeros(self.rows, dtype=torch.int64)

    def select(self, counts: torch.Tensor) -> torch.Tensor:
        """``[R, *shape]`` counts of the next site (in observe order) -> bool of the same shape."""
        if self._cutoff is None:
            self._finish()
        values = counts.reshape(self.rows, -1).long()
        if self.keep == 0:
            return torch.zeros(counts.shape, dtype=torch.bool)
        cutoff = self._cutoff[:, None]
        tied = values == cutoff
        rank = tied.cumsum(1) + self._taken[:, None]  # 1-based, over every site seen so far
        chosen = (values > cutoff) | (tied & (rank <= self._quota[:, None]))
        self._taken += tied.sum(1)
        return chosen.reshape(counts.shape)


def select_rows(counts: torch.Tensor, totals: torch.Tensor, epsilon: float, mode: str) -> torch.Tensor:
    """``[R, *shape]`` counts of one site, ``[R]`` counted tokens -> ``[R, *shape]`` bool ISNs.

    For ``threshold`` and ``percentile_layer``; ``percentile_global`` spans sites and needs a
    ``GlobalTopFraction``.
    """
    if mode == "threshold":
        bound = threshold_count(epsilon, totals).to(torch.float64)
        return counts.double() >= bound.reshape(-1, *[1] * (counts.dim() - 1))
    if mode == "percentile_layer":
        check_epsilon(epsilon)
        return top_fraction_rows(counts.reshape(counts.shape[0], -1), epsilon).reshape(counts.shape)
    if mode == "percentile_global":
        raise ValueError("percentile_global spans all sites: use GlobalTopFraction")
    raise ValueError(f"unknown selection mode {mode!r}; expected one of {list(SELECTION_MODES)}")


ISN_SETS = ("frequent", "unique")


def unique_rows(chosen: torch.Tensor) -> torch.Tensor:
    """``[C, ...]`` bool, one row per category's set -> the same shape: each category's members that
    are in no other category's set (its unique ISNs)."""
    return chosen & (chosen.sum(0, dtype=torch.int32) == 1)


def category_isns(
    snapshot: Snapshot, epsilon: float, mode: str = "threshold", isn_set: str = "frequent"
) -> dict[str, NeuronSet]:
    """Every category's ISNs: ``frequent``, the neurons that fire often on its tokens (the paper's
    ISNs; at eps 0.5 a SiLU model's run to a quarter of the FFN, most of them shared by all
    categories), or ``unique``, those of them that are ISNs of no other category: the category's
    own neurons, what a causal test of category specificity should remove."""
    if isn_set not in ISN_SETS:
        raise ValueError(f"unknown ISN set {isn_set!r}; expected one of {list(ISN_SETS)}")
    sets = {c: category_isn(snapshot, c, epsilon, mode) for c in snapshot.categories}
    if isn_set == "frequent":
        return sets
    stacked = {
        site: unique_rows(torch.stack([sets[c][site] for c in sets])) for site in next(iter(sets.values()))
    }
    return {c: {site: rows[i] for site, rows in stacked.items()} for i, c in enumerate(sets)}


def neuron_frequency(frequency: dict[str, torch.Tensor], kinds: dict[str, str]) -> dict[str, torch.Tensor]:
    """Only the neuron sites (FFN and routed-expert neurons) of a frequency dict."""
    return {s: p for s, p in frequency.items() if kinds[s] in NEURON_KINDS}


def category_isn(snapshot: Snapshot, category: str, epsilon: float, mode: str = "threshold") -> NeuronSet:
    """ISNs of a whole category: frequencies over all of its instructions' counted tokens."""
    return isn(neuron_frequency(snapshot.frequency(category), snapshot.site_kinds), epsilon, mode)


def instruction_isn(snapshot: Snapshot, index: int, epsilon: float, mode: str = "threshold") -> NeuronSet:
    """ISNs of one instruction (row ``index`` of the snapshot's per-instruction statistics)."""
    return isn(neuron_frequency(snapshot.instruction_frequency(index), snapshot.site_kinds), epsilon, mode)


def expert_frequency(snapshot: Snapshot, category: str) -> dict[str, torch.Tensor]:
    """``q`` per router site: the fraction of the category's tokens that selected each expert."""
    total = max(int(snapshot.category_tokens[snapshot.categories.index(category)]), 1)
    row = snapshot.counts[category]
    return {s: row[s].double() / total for s in snapshot.sites("router")}


def ise(
    frequency: dict[str, torch.Tensor], top_k: int | None = None, epsilon: float | None = None
) -> NeuronSet:
    """ISE set per router: the ``top_k`` experts by ``q`` in each layer, or those with ``q >= epsilon``."""
    if (top_k is None) == (epsilon is None):
        raise ValueError("give exactly one of top_k or epsilon")
    if epsilon is not None:
        check_epsilon(epsilon)
        return {s: q >= epsilon for s, q in frequency.items()}
    chosen = {}
    for site, q in frequency.items():
        mask = torch.zeros(q.numel(), dtype=torch.bool)
        mask[torch.sort(-q.double(), stable=True).indices[: min(top_k, q.numel())]] = True
        chosen[site] = mask
    return chosen


def flatten(sets: NeuronSet, sites: list[str] | None = None) -> torch.Tensor:
    """One bool vector over the given sites (default: all, in dict order)."""
    return torch.cat([sets[s].flatten() for s in (sites or list(sets))])
