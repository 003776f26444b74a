"""The statistics' result types, one per idea: every pass returns them and every rendering reads them.

Decisions are fields, made where the numbers are computed (``significant``, ``survives``,
``three_phase``); renderings only format them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Interval(NamedTuple):
    """A closed interval ``[lo, hi]`` (nan, nan when no resample gave a finite value); a tuple, so it
    indexes and serialises as ``[lo, hi]``."""

    lo: float
    hi: float


@dataclass(frozen=True)
class Estimate:
    """A number with how far it can be trusted: its 95% percentile bootstrap interval, and for an
    ISN Jaccard the chance level (random sets of the same per-site sizes), the split-half stability
    of each side (sets of two disjoint halves of the instructions), and ``value_half``, the same
    Jaccard with both sides' sets selected on one half (the stability's halves): the one to set
    against the stability, at a matched sample size."""

    value: float
    ci95: Interval | None = None
    chance: float | None = None
    stability_base: float | None = None
    stability_tuned: float | None = None
    value_half: float | None = None


@dataclass(frozen=True)
class Test:
    """A permutation test: the observed statistic, its one-sided p-value, its Holm-adjusted p-value
    across the family it belongs to (equal to ``p_value`` for a test that stands alone), and whether
    the adjusted p-value lies below the test's alpha."""

    statistic: float
    p_value: float
    p_holm: float
    significant: bool


@dataclass(frozen=True)
class DiagonalDominance:
    """Attributes:
    overall: mean diagonal minus mean off-diagonal of the ``[C, C]`` block-mean matrix.
    per_category: for each category, the mean similarity of its pairs of distinct instructions
        minus the mean of its pairs with instructions of other categories, Holm-adjusted across
        categories.
    """

    overall: Test
    per_category: dict[str, Test]


@dataclass(frozen=True)
class TokenControl:
    """ISN overlap against vocabulary overlap. Attributes:
    correlation: of the 6x6 ISN and token overlap matrices (None where not computed).
    category_effect: how much higher the ISN similarity of a same-category pair is than that of a
        pair with the same token similarity (regression coefficient, in similarity units).
    p_value: one-sided permutation p-value of that effect (``sparcom.stats.permutation.token_control``).
    survives: the p-value lies below ``alpha``: category specificity is more than shared vocabulary.
    """

    correlation: float | None = None
    category_effect: float | None = None
    p_value: float | None = None
    survives: bool | None = None
    alpha: float | None = None


@dataclass(frozen=True)
class Profile:
    """ISN count per layer, fitted by three constant segments whose boundaries are found from the
    data (``sparcom.stats.estimates.three_segments``): early ``[0, a)``, middle ``[a, b)``, late
    ``[b, L)``.

    Attributes:
        counts: ISNs per layer, full sample.
        three_phase: the middle segment lies below both others (``margin > 0``) and, with resamples,
            the 95% interval of the margin lies above 0: the fall and the rise are beyond sampling noise.
        margin: ``min(early, late) - middle`` of the segments' mean ISN counts per layer, full sample.
        ci95: percentile bootstrap interval of the margin, the segments refitted in every resample
            (None without resamples).
        boundaries: ``(a, b)``: the first middle layer and the first late layer, full sample.
        boundaries_ci: 95% intervals of ``a`` and ``b`` over the resamples.
        means: ``(early, middle, late)`` mean ISN count per layer of each segment, full sample.
    """

    counts: list[int]
    three_phase: bool
    margin: float
    ci95: Interval | None = None
    boundaries: tuple[int, int] | None = None
    boundaries_ci: tuple[Interval, Interval] | None = None
    means: tuple[float, float, float] | None = None
