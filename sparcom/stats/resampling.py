"""Resampling passes over snapshots, from stored counts (no forward pass): paired bootstrap intervals
for ISN Jaccard and ISE Pearson, instruction-sampling stability and layer-phase tests.

A resample of a category's instructions is a weight vector over them (how often each instruction
was drawn), so a batch of resamples is one matrix product per site: ``W [R, N_c] @ X_c [N_c, n]``
gives the resampled counts and ``W @ tokens`` their counted tokens, and the ISN sets of every
resample come from ``sparcom.stats.select`` exactly as they do for the full sample (row 0 of every batch
is the full sample: all weights 1).

Every pass visits the sites once, in the snapshot's order (``percentile_global`` twice: its cutoff
spans sites), reads each site's per-instruction counts once per snapshot, and keeps only set sizes
and intersections summed per layer (so what a pass keeps grows with the
layers, not with the experts or their width). Memory per site is the site's counts as read plus
``R x n`` float32 per snapshot; integer counts are exact in float32 while a resample's tokens stay
below 2**24 (float64 beyond). ``percentile_global`` also keeps, per snapshot and category, a
histogram of resampled counts (8 bytes x R x the largest count): about 450 MB for a pair of
1,200-instruction snapshots at the defaults (categories of about 23 k tokens), whatever the model.

Everything here needs per-instruction counts and raises ``MissingInstructionCounts`` without them
(chance levels need only category counts: ``sparcom.stats.estimates.expected_jaccard`` on the per-site sizes
of ``sparcom.stats.analysis.category_tallies``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch

from sparcom.snapshot import Snapshot, SnapshotError, check_comparable
from sparcom.stats.analysis import neuron_sites
from sparcom.stats.estimates import estimate, pearson_from_moments, phase_test, three_segments
from sparcom.stats.metrics import jaccard_ratio
from sparcom.stats.results import Estimate, Profile
from sparcom.stats.select import (
    NEURON_KINDS,
    SELECTION_MODES,
    GlobalTopFraction,
    check_epsilon,
    threshold_count,
)
from sparcom.stats.select import top_fraction_rows as _top_fraction_rows

_EXACT_FLOAT32 = 2**24
_CHUNK_BYTES = 64 << 20  # float copy of a site's per-instruction counts, per matmul


class MissingInstructionCounts(SnapshotError):
    """A statistic that resamples instructions was asked of a snapshot without per-instruction counts."""


@dataclass(frozen=True)
class PairedBootstrap:
    """Attributes:
    isn_jaccard: category (and "mean") -> epsilon -> Jaccard of base and tuned ISN sets, with its interval.
    ise_pearson: category -> Pearson of base and tuned expert frequencies ``q`` over all router
        sites, with its interval (empty for dense models).
    layer_phases: "base" | "tuned" -> category -> epsilon -> three-phase test of its layer profile
        (empty for models of fewer than 3 layers).
    """

    isn_jaccard: dict[str, dict[float, Estimate]]
    ise_pearson: dict[str, Estimate]
    layer_phases: dict[str, dict[str, dict[float, Profile]]]


@dataclass(frozen=True)
class PassResult:
    """What a resampling pass keeps, for ``K`` snapshots, ``C`` categories, ``E`` epsilons, ``R``
    weight rows, ``L`` layers and ``P`` compared row pairs.

    Attributes:
        sizes: ``[K, C, E, R, L]`` int64 ISN set size per layer (summed over the layer's neuron sites).
        intersections: ``[C, E, P, L]`` int64 intersection of each compared pair per layer (P = 0 without pairs).
        expert_moments: ``[C, R, 5]`` float64 sums over every expert of every router site of the
            first two snapshots' expert frequencies ``x``, ``y``: ``x, y, x*x, y*y, x*y`` (zeros
            when not asked for); with ``experts``, the number of experts summed over.
    """

    sizes: torch.Tensor
    intersections: torch.Tensor
    expert_moments: torch.Tensor
    experts: int


# ------------------------------------------------------------------------------ arguments


def _check_arguments(epsilons: Sequence[float], mode: str, **counts: int) -> list[float]:
    epsilons = list(epsilons)
    if not epsilons:
        raise ValueError("epsilons is empty; give at least one epsilon in (0, 1]")
    for epsilon in epsilons:
        check_epsilon(epsilon)
    if len(set(epsilons)) != len(epsilons):
        raise ValueError(f"epsilons must be distinct, got {epsilons}")
    if mode not in SELECTION_MODES:
        raise ValueError(f"unknown selection mode {mode!r}; expected one of {list(SELECTION_MODES)}")
    for name, value in counts.items():
        if isinstance(value, bool) or not (isinstance(value, Integral) and value >= 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return epsilons


def _aligned_rows(snapshots: Sequence[Snapshot], names: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    """Category -> one row index tensor per snapshot, the same instructions in the same order (by
    instruction id, so that the same instructions resample alike however they were recorded),
    matched by instruction id."""
    for snapshot, name in zip(snapshots, names, strict=True):
        if snapshot.instruction_counts is None or snapshot.instruction_tokens is None:
            raise MissingInstructionCounts(
                f"the {name} snapshot has no per-instruction counts (recorded with per_instruction=False); "
                "resampling instructions needs them"
            )
        if len(set(snapshot.instruction_ids)) != len(snapshot.instruction_ids):
            raise SnapshotError(f"the {name} snapshot repeats instruction ids")
    first = snapshots[0]
    label_of = [dict(zip(s.instruction_ids, s.instruction_categories, strict=True)) for s in snapshots]
    for name, labels in zip(names[1:], label_of[1:], strict=True):
        if labels != label_of[0]:
            differ = sorted(set(label_of[0]) ^ set(labels)) or sorted(
                i for i in labels if labels[i] != label_of[0][i]
            )
            raise SnapshotError(
                f"the {names[0]} and {name} snapshots hold different instructions or categories "
                f"({len(differ)} differ, e.g. {differ[:3]}); a paired resample needs the same ones"
            )
    index = [{i: row for row, i in enumerate(s.instruction_ids)} for s in snapshots]
    rows = {}
    for category in first.categories:
        ids = sorted(
            i
            for i, c in zip(first.instruction_ids, first.instruction_categories, strict=True)
            if c == category
        )
        if not ids:
            raise SnapshotError(f"category {category!r} has no instructions with per-instruction counts")
        rows[category] = [torch.tensor([position[i] for i in ids]) for position in index]
    for position, (snapshot, name) in enumerate(zip(snapshots, names, strict=True)):
        for row, category in enumerate(snapshot.categories):
            summed = int(snapshot.instruction_tokens[rows[category][position]].sum())
            if summed != int(snapshot.category_tokens[row]):
                raise SnapshotError(
                    f"the {name} snapshot's per-instruction tokens of {category!r} add up to {summed}, "
                    f"not to its category tokens {int(snapshot.category_tokens[row])}"
                )
    return rows


def _bootstrap_weights(
    sizes: dict[str, int], resamples: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Category -> ``[1 + R, N_c]``: all ones (the full sample), then how often each instruction is
    drawn in each of ``R`` draws of ``N_c`` with replacement."""
    weights = {}
    for category, size in sizes.items():
        draws = torch.randint(size, (resamples, size), generator=generator)
        counts = torch.zeros(resamples, size).scatter_add_(1, draws, torch.ones(resamples, size))
        weights[category] = torch.cat([torch.ones(1, size), counts])
    return weights


def _split_weights(sizes: dict[str, int], splits: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Category -> ``[2 * splits, N_c]`` 0/1: rows ``2k`` and ``2k + 1`` are two disjoint random halves
    of ``floor(N_c / 2)`` instructions (one is left out when ``N_c`` is odd)."""
    weights = {}
    for category, size in sizes.items():
        if size < 2:
            raise ValueError(f"category {category!r} has {size} instruction; splitting it in halves needs 2")
        half = size // 2
        rows = torch.zeros(2 * splits, size)
        for split in range(splits):
            order = torch.randperm(size, generator=generator)
            rows[2 * split, order[:half]] = 1
            rows[2 * split + 1, order[half : 2 * half]] = 1
        weights[category] = rows
    return weights


# ----------------------------------------------------------------------------- the pass


def _resampled(weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[R, N]`` weights, ``[N, *shape]`` integer counts -> ``[R, n]`` resampled counts, cast to the
    weights' dtype a column chunk at a time."""
    flat = counts.reshape(counts.shape[0], -1)
    step = max(1, _CHUNK_BYTES // (max(flat.shape[0], 1) * weights.element_size()))
    if flat.shape[1] <= step:
        return weights @ flat.to(weights.dtype)
    out = torch.empty(weights.shape[0], flat.shape[1], dtype=weights.dtype)
    for start in range(0, flat.shape[1], step):
        out[:, start : start + step] = weights @ flat[:, start : start + step].to(weights.dtype)
    return out


def _select(
    counts: torch.Tensor, totals: torch.Tensor, epsilon: float, mode: str, selector: GlobalTopFraction | None
) -> torch.Tensor:
    """``[R, n]`` counts (integer or integer-valued float), ``[R]`` tokens -> ``[R, n]`` bool ISNs."""
    if mode == "threshold":
        bound = threshold_count(epsilon, totals)
        return counts >= bound.to(counts.dtype if counts.is_floating_point() else torch.int64)[:, None]
    if mode == "percentile_layer":
        return _top_fraction_rows(counts, epsilon)
    return selector.select(counts)


def resample_pass(
    snapshots: Sequence[Snapshot],
    weights: dict[str, torch.Tensor],
    epsilons: Sequence[float],
    mode: str,
    pairs: tuple[tuple[int, torch.Tensor], tuple[int, torch.Tensor]] | None = None,
    experts: bool = False,
    names: Sequence[str] | None = None,
) -> PassResult:
    """ISN set sizes (and intersections, and expert frequencies) of weighted resamples, site by site.

    Args:
        snapshots: ``K`` snapshots of the same instructions (matched by id) and sites.
        weights: category -> ``[R, N_c]`` weights over the category's instructions, in the order of
            their ids; the same for every snapshot (paired resamples).
        epsilons, mode: the ISN selection, as in ``sparcom.stats.select.isn``.
        pairs: ``((k_a, rows_a), (k_b, rows_b))``: intersect row ``rows_a[p]`` of snapshot ``k_a`` with
            row ``rows_b[p]`` of snapshot ``k_b``, per site.
        experts: also sum the moments of the first two snapshots' expert frequencies ``q`` over
            the router sites (what a Pearson correlation needs, kept per resample, not per expert).
    """
    names = list(names or [f"#{k}" for k in range(len(snapshots))])
    rows = _aligned_rows(snapshots, names)
    categories = snapshots[0].categories
    width = {c: weights[c].shape[0] for c in categories}
    if len(set(width.values())) != 1:
        raise ValueError(f"every category needs the same number of weight rows, got {width}")
    totals, matrices = [], {}
    for k, snapshot in enumerate(snapshots):
        tokens = snapshot.instruction_tokens.double()
        totals.append({c: weights[c].double() @ tokens[rows[c][k]] for c in categories})
    for c in categories:
        largest = max(float(totals[k][c].max()) for k in range(len(snapshots)))
        matrices[c] = weights[c].to(torch.float32 if largest < _EXACT_FLOAT32 else torch.float64)

    sites = neuron_sites(snapshots[0])
    count = next(iter(width.values()))
    num_layers = _num_layers(snapshots[0])
    shape = (len(snapshots), len(categories), len(epsilons), count, num_layers)
    sizes = torch.zeros(shape, dtype=torch.int64)
    paired = 0 if pairs is None else len(pairs[0][1])
    intersections = torch.zeros(len(categories), len(epsilons), paired, num_layers, dtype=torch.int64)
    moments = torch.zeros(len(categories), count, 5, dtype=torch.float64)
    summed = 0
    selectors = (
        _observe_global(snapshots, sites, rows, matrices, epsilons) if mode == "percentile_global" else None
    )

    for site, kind in snapshots[0].site_kinds.items():
        if kind == "router" and experts:
            tensors = [snapshot.instruction_counts[site] for snapshot in snapshots[:2]]
            for i, c in enumerate(categories):
                x, y = (
                    _resampled(matrices[c], tensor[rows[c][k]]).double() / totals[k][c].clamp(min=1)[:, None]
                    for k, tensor in enumerate(tensors)
                )
                moments[i] += torch.stack(
                    [x.sum(1), y.sum(1), (x * x).sum(1), (y * y).sum(1), (x * y).sum(1)], -1
                )
            summed += math.prod(snapshots[0].site_shape(site))
        if kind not in NEURON_KINDS:
            continue
        layer = snapshots[0].site_layers[site]
        tensors = [snapshot.instruction_counts[site] for snapshot in snapshots]
        for i, c in enumerate(categories):
            resampled = [_resampled(matrices[c], tensor[rows[c][k]]) for k, tensor in enumerate(tensors)]
            for e, epsilon in enumerate(epsilons):
                chosen = [
                    _select(resampled[k], totals[k][c], epsilon, mode, selectors and selectors[k][i][e])
                    for k in range(len(snapshots))
                ]
                for k, sets in enumerate(chosen):
                    sizes[k, i, e, :, layer] += sets.sum(1, dtype=torch.int32)
                if pairs is not None:
                    (left, left_rows), (right, right_rows) = pairs
                    both = chosen[left][left_rows] & chosen[right][right_rows]
                    intersections[i, e, :, layer] += both.sum(1, dtype=torch.int32)
    return PassResult(sizes, intersections, moments, summed)


def _observe_global(snapshots, sites, rows, matrices, epsilons) -> list[list[list[GlobalTopFraction]]]:
    """First pass of ``percentile_global``: one histogram of resampled counts per snapshot and
    category, shared by every epsilon -> selectors ``[snapshot][category][epsilon]``."""
    total = sum(math.prod(snapshots[0].site_shape(s)) for s in sites)
    categories = snapshots[0].categories
    observers = [
        [GlobalTopFraction(epsilons[0], matrices[c].shape[0], total) for c in categories] for _ in snapshots
    ]
    for site in sites:
        for k, snapshot in enumerate(snapshots):
            counts = snapshot.instruction_counts[site]
            for i, c in enumerate(categories):
                observers[k][i].observe(_resampled(matrices[c], counts[rows[c][k]]).long())
    return [[[first.with_fraction(e) for e in epsilons] for first in row] for row in observers]


# ---------------------------------------------------------------------------- entry points


def _phase_tests(result: PassResult, snapshot: Snapshot, k: int, epsilons: Sequence[float]):
    profiles = result.sizes[k]  # [C, E, R, L]
    return {
        c: {epsilon: phase_test(profiles[i, e]) for e, epsilon in enumerate(epsilons)}
        for i, c in enumerate(snapshot.categories)
    }


def _num_layers(snapshot: Snapshot) -> int:
    return max(snapshot.site_layers.values()) + 1


def _category_sizes(snapshot: Snapshot) -> dict[str, int]:
    return {c: snapshot.instruction_categories.count(c) for c in snapshot.categories}


def paired_bootstrap(
    base: Snapshot,
    tuned: Snapshot,
    epsilons: Sequence[float],
    mode: str = "threshold",
    resamples: int = 200,
    seed: int = 0,
) -> PairedBootstrap:
    """95% percentile intervals for every ISN Jaccard and ISE Pearson of ``base`` vs ``tuned``, and
    three-phase tests of both sides' layer profiles, from one pass over the sites.

    Each category's instructions are resampled with replacement ``resamples`` times, the same draws
    for both snapshots (they saw the same instructions, matched by id); category frequencies are
    recomputed as ``sum(counts) / sum(tokens)`` over the draws, the ISN sets reselected
    (``epsilons``, ``mode``) and the statistics recomputed. ``value`` is the full-sample statistic,
    identical to ``sparcom.stats.analysis.isn_alteration`` / ``ise_alteration``. The same ``seed`` gives the
    same result; a snapshot compared with itself gives 1 with interval [1, 1].

    Coverage of the population Jaccard (``tests/bench/coverage.py``: 200 synthetic datasets per
    setting with known per-neuron frequencies, 200 instructions per category unless said): 0.95
    (+-0.015) at epsilon 0.5, 0.915 (+-0.02) at 0.3, 0.93 (+-0.02) with frequencies crowded at the
    threshold, 0.97-0.985 in the percentile modes, but 0.845 (+-0.026) with 20 instructions per
    category: with small probe sets read the interval as too narrow. Near-threshold neurons are
    selected by chance, which biases a Jaccard of thresholded sets; the basic and bias-corrected
    intervals, which try to undo that bias, cover worse (0.69-0.83) in every setting measured.
    """
    epsilons = _check_arguments(epsilons, mode, resamples=resamples)
    check_comparable(base, tuned)
    generator = torch.Generator().manual_seed(seed)
    weights = _bootstrap_weights(_category_sizes(base), resamples, generator)
    every = torch.arange(resamples + 1)
    names = ("base", "tuned")
    result = resample_pass([base, tuned], weights, epsilons, mode, ((0, every), (1, every)), True, names)
    totals = result.sizes.sum(-1)  # [K, C, E, R]
    jaccard = jaccard_ratio(result.intersections.sum(-1), totals[0], totals[1])  # [C, E, R]
    # "mean": the mean over categories of each resample (categories are resampled independently).
    rows = dict(zip(base.categories, jaccard, strict=True)) | {
        "mean": jaccard.nanmean(0)
    }  # over the categories where it is defined
    isn_jaccard = {
        c: {epsilon: estimate(row[e]) for e, epsilon in enumerate(epsilons)} for c, row in rows.items()
    }
    ise_pearson = {}
    if result.experts:
        pearson = pearson_from_moments(result.expert_moments, result.experts)  # [C, R]
        rows = dict(zip(base.categories, pearson, strict=True)) | {"mean": pearson.mean(0)}
        ise_pearson = {c: estimate(row) for c, row in rows.items()}
    phases = {}
    if _num_layers(base) >= 3:
        phases = {name: _phase_tests(result, base, k, epsilons) for k, name in enumerate(names)}
    return PairedBootstrap(isn_jaccard, ise_pearson, phases)


def layer_phase_tests(
    snapshot: Snapshot,
    epsilons: Sequence[float],
    mode: str = "threshold",
    resamples: int = 200,
    seed: int = 0,
) -> dict[str, dict[float, Profile]]:
    """Category -> epsilon -> three-phase test of the snapshot's layer profile (ISN count per layer):
    three segments fitted to it, with bootstrap intervals of their boundaries and of the margin
    (instructions resampled as in ``paired_bootstrap``, the segments refitted in each resample).
    Under ``percentile_layer`` every site holds ``ceil(epsilon * n)`` ISNs by construction, so the
    profile only mirrors the layers' widths and the test says nothing about the model."""
    epsilons = _check_arguments(epsilons, mode, resamples=resamples)
    three_segments(torch.zeros(1, _num_layers(snapshot)))  # refuses fewer than 3 layers before the pass
    weights = _bootstrap_weights(_category_sizes(snapshot), resamples, torch.Generator().manual_seed(seed))
    result = resample_pass([snapshot], weights, epsilons, mode, names=["given"])
    return _phase_tests(result, snapshot, 0, epsilons)


def sampling_stability(
    snapshot: Snapshot, epsilons: Sequence[float], mode: str = "threshold", splits: int = 20, seed: int = 0
) -> dict[str, dict[float, float]]:
    """Category -> epsilon -> mean Jaccard between the category's ISN sets on two disjoint random
    halves of its instructions, over ``splits`` splits: how far the sets move when only the
    instructions change. Each half has half the tokens of the full sample, so this is a lower
    reference for a comparison of full samples."""
    epsilons = _check_arguments(epsilons, mode, splits=splits)
    weights = _split_weights(_category_sizes(snapshot), splits, torch.Generator().manual_seed(seed))
    halves = torch.arange(2 * splits)
    result = resample_pass(
        [snapshot], weights, epsilons, mode, ((0, halves[0::2]), (0, halves[1::2])), names=["given"]
    )
    sizes = result.sizes[0].sum(-1)  # [C, E, 2 * splits]
    jaccard = jaccard_ratio(result.intersections.sum(-1), sizes[..., 0::2], sizes[..., 1::2])
    means = jaccard.nanmean(-1)  # over the splits where it is defined
    return {
        c: {epsilon: float(means[i, e]) for e, epsilon in enumerate(epsilons)}
        for i, c in enumerate(snapshot.categories)
    }


def half_sample_alteration(
    base: Snapshot,
    tuned: Snapshot,
    epsilons: Sequence[float],
    mode: str = "threshold",
    splits: int = 20,
    seed: int = 0,
) -> dict[str, dict[float, float]]:
    """Category -> epsilon -> mean Jaccard of base's and tuned's ISN sets, both selected on the same
    half of the category's instructions, over both halves of ``splits`` random splits: the
    alteration measured at the sample size of ``sampling_stability``'s halves (the very same halves
    for the same seed), so that "fine-tuning moved the ISNs more than swapping the instructions
    does" compares like with like."""
    epsilons = _check_arguments(epsilons, mode, splits=splits)
    weights = _split_weights(_category_sizes(base), splits, torch.Generator().manual_seed(seed))
    every = torch.arange(2 * splits)
    result = resample_pass(
        [base, tuned], weights, epsilons, mode, ((0, every), (1, every)), names=["base", "tuned"]
    )
    sizes = result.sizes.sum(-1)  # [2, C, E, 2 * splits]
    jaccard = jaccard_ratio(result.intersections.sum(-1), sizes[0], sizes[1])
    means = jaccard.nanmean(-1)  # over the halves where it is defined
    return {
        c: {epsilon: float(means[i, e]) for e, epsilon in enumerate(epsilons)}
        for i, c in enumerate(base.categories)
    }
