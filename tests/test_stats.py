"""Chance levels, paired bootstrap intervals, sampling stability and layer-phase tests, checked
against brute force, independent recomputation and synthetic snapshots with planted truth."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest
import torch

from sparcom.snapshot import Snapshot, SnapshotError
from sparcom.stats.analysis import ise_alteration, isn_alteration
from sparcom.stats.estimates import expected_jaccard, pearson_from_moments, phase_margin, three_segments
from sparcom.stats.metrics import jaccard
from sparcom.stats.resampling import (
    MissingInstructionCounts,
    half_sample_alteration,
    layer_phase_tests,
    paired_bootstrap,
    resample_pass,
    sampling_stability,
)
from sparcom.stats.select import (
    NEURON_KINDS,
    GlobalTopFraction,
    category_isn,
    instruction_isn,
    isn,
    top_fraction_rows,
)

from helpers.synthetic import Population, draw, moe_sites, random_population

MODES = ["threshold", "percentile_layer", "percentile_global"]
CATEGORIES = ["code", "math"]


@pytest.fixture(scope="module")
def pair():
    """A tiny-qwen2-moe-shaped base and tuned snapshot: tuned frequencies are base ones moved a little."""
    rng = np.random.default_rng(0)
    kinds, shapes, layers = moe_sites()
    base = random_population(rng, CATEGORIES, shapes, kinds, layers)
    moved = {s: np.clip(f + rng.normal(0, 0.05, f.shape), 0.01, 0.99) for s, f in base.frequencies.items()}
    return draw([base, base.with_frequencies(moved)], 24, rng)


# ------------------------------------------------------------------------------- chance level


def brute_force_chance(sizes_a, sizes_b, site_sizes, trials, generator):
    """Mean and standard error of the Jaccard of sets actually drawn at random within each site."""
    intersection = torch.zeros(trials, dtype=torch.float64)
    for a, b, n in zip(sizes_a, sizes_b, site_sizes, strict=True):
        chosen = []
        for size in (a, b):
            members = torch.rand(trials, n, generator=generator).argsort(1)[:, :size]
            chosen.append(torch.zeros(trials, n, dtype=torch.bool).scatter_(1, members, True))
        intersection += (chosen[0] & chosen[1]).sum(1)
    total = sum(sizes_a) + sum(sizes_b)
    values = intersection / (total - intersection)
    return float(values.mean()), float(values.std() / math.sqrt(trials))


@pytest.mark.parametrize(
    "sizes_a, sizes_b, site_sizes, trials",
    [
        ([5, 0, 10, 7], [8, 3, 10, 2], [20, 10, 10, 30], 40000),  # an empty set and a full site
        ([1], [1], [2], 40000),
        ([40, 3, 60], [25, 60, 1], [100, 64, 64], 20000),
        ([450, 1200, 50], [750, 150, 1450], [1500, 1500, 1500], 1000),
    ],
)
def test_chance_jaccard_matches_brute_force_monte_carlo(sizes_a, sizes_b, site_sizes, trials):
    generator = torch.Generator().manual_seed(1)
    expected, error = brute_force_chance(sizes_a, sizes_b, site_sizes, trials, generator)
    assert expected_jaccard(sizes_a, sizes_b, site_sizes) == pytest.approx(expected, abs=4 * error + 1e-12)


def test_chance_jaccard_at_qwen_moe_shapes_and_edge_cases():
    """48 sites of Qwen1.5-MoE-A2.7B width: large sets concentrate, so the exact value meets the
    first-order ``E[I] / (|A| + |B| - E[I])``; empty and full sets have exact answers."""
    rng = np.random.default_rng(0)
    widths = [84480, 5632] * 24
    a = [int(rng.integers(0, w // 2)) for w in widths]
    b = [int(rng.integers(0, w // 2)) for w in widths]
    mean_intersection = sum(x * y / w for x, y, w in zip(a, b, widths, strict=True))
    first_order = mean_intersection / (sum(a) + sum(b) - mean_intersection)
    assert expected_jaccard(a, b, widths) == pytest.approx(first_order, rel=1e-5)
    tensors = [torch.tensor(values) for values in (a, b, widths)]  # as the category tallies hold them
    assert expected_jaccard(*tensors) == expected_jaccard(a, b, widths)
    assert math.isnan(expected_jaccard([0, 0], [0, 0], [5, 5]))  # two empty sets: undefined
    assert expected_jaccard([0, 0], [3, 0], [5, 5]) == 0.0
    assert expected_jaccard([5], [5], [5]) == 1.0
    with pytest.raises(ValueError, match="site 1 has sizes 6 and 2 of 5"):
        expected_jaccard([1, 6], [1, 2], [5, 5])


# -------------------------------------------------------------------------- paired bootstrap


@pytest.mark.parametrize("mode", MODES)
def test_resample_pass_equals_selection_on_weighted_frequencies(pair, mode):
    """Every row of a pass, recomputed independently: frequencies ``sum(w * counts) / sum(w * T)``
    per site, ``isn`` on them, Jaccard and set sizes from the sets."""
    base, tuned = pair
    generator = torch.Generator().manual_seed(3)
    weights = {c: torch.randint(0, 4, (5, 24), generator=generator).float() for c in CATEGORIES}
    weights["math"][2] = 0  # an empty resample: zero tokens, frequencies 0
    rows = torch.arange(5)
    result = resample_pass([base, tuned], weights, [0.3, 0.6], mode, ((0, rows), (1, rows.flip(0))))
    sites = [s for s, kind in base.site_kinds.items() if kind in NEURON_KINDS]
    layer_of = torch.tensor([base.site_layers[s] for s in sites])

    def per_layer(values: list[int]) -> list[int]:
        return (
            torch.zeros(result.sizes.shape[-1], dtype=torch.int64)
            .index_add_(0, layer_of, torch.tensor(values))
            .tolist()
        )

    for i, category in enumerate(CATEGORIES):
        members = [n for n, c in enumerate(base.instruction_categories) if c == category]
        members.sort(key=lambda n: base.instruction_ids[n])  # weights are over instructions in id order
        for e, epsilon in enumerate((0.3, 0.6)):
            sets = []
            for snapshot in (base, tuned):
                per_row = []
                for w in weights[category]:
                    tokens = max(float(w.double() @ snapshot.instruction_tokens[members].double()), 1.0)
                    frequency = {
                        s: torch.einsum(
                            "n,n...->...", w.double(), snapshot.instruction_counts[s][members].double()
                        )
                        / tokens
                        for s in sites
                    }
                    per_row.append(isn(frequency, epsilon, mode))
                sets.append(per_row)
            for r in range(5):
                for k in range(2):
                    expected = per_layer([int(sets[k][r][s].sum()) for s in sites])
                    assert result.sizes[k, i, e, r].tolist() == expected
                expected = per_layer([int((sets[0][r][s] & sets[1][4 - r][s]).sum()) for s in sites])
                assert result.intersections[i, e, r].tolist() == expected


@pytest.mark.parametrize("mode", MODES)
def test_bootstrap_values_are_the_full_sample_statistics(pair, mode):
    base, tuned = pair
    result = paired_bootstrap(base, tuned, [0.2, 0.5], mode, resamples=30, seed=0)
    for epsilon in (0.2, 0.5):
        expected = isn_alteration(base, tuned, epsilon, mode)
        for category in CATEGORIES:
            estimate = result.isn_jaccard[category][epsilon]
            assert estimate.value == expected[category]
            assert 0 <= estimate.ci95.lo <= estimate.ci95.hi <= 1
    pearson = ise_alteration(base, tuned)
    for category in CATEGORIES:
        assert result.ise_pearson[category].value == pytest.approx(pearson[category], abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_a_snapshot_against_itself_is_one_with_interval_one(pair, mode):
    base, _ = pair
    result = paired_bootstrap(base, base, [0.1, 0.5, 1.0], mode, resamples=25, seed=4)
    for category in CATEGORIES:
        assert (lambda e: (e.value, e.ci95.lo, e.ci95.hi))(result.ise_pearson[category]) == (1.0, 1.0, 1.0)
        for epsilon, estimate in result.isn_jaccard[category].items():
            numbers = (estimate.value, estimate.ci95.lo, estimate.ci95.hi)
            if any(chosen.any() for chosen in category_isn(base, category, epsilon, mode).values()):
                assert numbers == (1.0, 1.0, 1.0)
            else:  # no ISN at all (threshold 1.0): two empty sets have no Jaccard
                assert all(math.isnan(v) for v in numbers), (category, epsilon)


def test_same_seed_same_result_and_the_bootstrap_phases_match_the_single_snapshot_test(pair):
    base, tuned = pair
    first = paired_bootstrap(base, tuned, [0.4], resamples=20, seed=7)
    assert paired_bootstrap(base, tuned, [0.4], resamples=20, seed=7) == first
    other = paired_bootstrap(base, tuned, [0.4], resamples=20, seed=8)
    assert other.isn_jaccard["code"][0.4].ci95 != first.isn_jaccard["code"][0.4].ci95
    assert layer_phase_tests(base, [0.4], resamples=20, seed=7) == first.layer_phases["base"]


def test_bootstrap_intervals_cover_the_population_value():
    """Populations with known per-neuron frequencies, so the population ISN sets and their Jaccard
    are known; 100 datasets of 100 instructions. Coverage of the 95% interval must be at least 0.85
    (0.95 would fall below that with probability < 1e-4; ``tests/bench/coverage.py`` measures larger
    settings), and the interval's width must match the estimate's real spread across datasets
    (ratio within 0.6-1.6), so a uselessly wide interval fails."""
    rng = np.random.default_rng(11)
    kinds = {f"layer{i}": "ffn" for i in range(3)}
    layers = {site: i for i, site in enumerate(kinds)}
    covered, widths, errors = 0, [], []
    for dataset in range(100):
        mu = {s: rng.beta(2, 3, size=(1, 150)) for s in kinds}
        moved = {s: np.clip(m + rng.normal(0, 0.05, m.shape), 0.01, 0.99) for s, m in mu.items()}
        population = Population(["all"], mu, kinds, layers)
        truth = jaccard(*(isn({s: torch.from_numpy(m[0]) for s, m in f.items()}, 0.4) for f in (mu, moved)))
        base, tuned = draw([population, population.with_frequencies(moved)], 100, rng)
        estimate = paired_bootstrap(base, tuned, [0.4], resamples=100, seed=dataset).isn_jaccard["all"][0.4]
        covered += estimate.ci95.lo <= truth <= estimate.ci95.hi
        widths.append(estimate.ci95.hi - estimate.ci95.lo)
        errors.append(estimate.value - truth)
    assert covered >= 85
    assert 0.6 <= np.mean(widths) / (2 * 1.96 * np.std(errors)) <= 1.6


def test_dense_models_have_no_expert_intervals_and_two_layers_no_phase_tests():
    rng = np.random.default_rng(12)
    kinds, shapes, layers = {"l0": "ffn", "l1": "ffn"}, {"l0": (50,), "l1": (50,)}, {"l0": 0, "l1": 1}
    base, tuned = draw([random_population(rng, CATEGORIES, shapes, kinds, layers)] * 2, 10, rng)
    result = paired_bootstrap(base, tuned, [0.5], resamples=10)
    assert result.ise_pearson == {} and result.layer_phases == {}
    assert set(result.isn_jaccard) == {*CATEGORIES, "mean"}
    with pytest.raises(ValueError, match="a three-phase profile needs at least 3 layers, got 2"):
        layer_phase_tests(base, [0.5])


class CountingReads(Mapping):
    """Per-instruction counts that record every site read."""

    def __init__(self, counts: Mapping):
        self.counts, self.reads = counts, Counter()

    def __getitem__(self, site):
        self.reads[site] += 1
        return self.counts[site]

    def __iter__(self):
        return iter(self.counts)

    def __len__(self):
        return len(self.counts)


@pytest.mark.parametrize("mode", ["threshold", "percentile_global"])
def test_a_pass_over_snapshots_on_disk_reads_each_site_once(pair, tmp_path, mode):
    """Loaded snapshots read each site when asked: the bootstrap reads every site once per snapshot
    (percentile_global twice, its cutoff spans sites) and gives what it gives in memory."""
    loaded = [Snapshot.load(s.save(tmp_path / f"{i}.safetensors")) for i, s in enumerate(pair)]
    for snapshot in loaded:
        snapshot.instruction_counts = CountingReads(snapshot.instruction_counts)
    assert paired_bootstrap(*loaded, [0.5], mode, resamples=10) == paired_bootstrap(
        *pair, [0.5], mode, resamples=10
    )
    for snapshot in loaded:
        neurons = {s for s, kind in snapshot.site_kinds.items() if kind != "router"}
        expected = {s: 2 if mode == "percentile_global" and s in neurons else 1 for s in snapshot.site_kinds}
        assert dict(snapshot.instruction_counts.reads) == expected


def test_resampling_refuses_bad_input_early(pair):
    base, tuned = pair
    with pytest.raises(MissingInstructionCounts, match="the tuned snapshot has no per-instruction counts"):
        paired_bootstrap(base, replace(tuned, instruction_counts=None, instruction_tokens=None), [0.5])
    with pytest.raises(MissingInstructionCounts, match="the given snapshot has no per-instruction counts"):
        sampling_stability(replace(base, instruction_counts=None), [0.5])
    with pytest.raises(ValueError, match=r"unknown selection mode 'median'; expected one of"):
        paired_bootstrap(base, tuned, [0.5], "median")
    with pytest.raises(ValueError, match=r"epsilon must be in \(0, 1\], got 0"):
        paired_bootstrap(base, tuned, [0.5, 0])
    with pytest.raises(ValueError, match="resamples must be a positive integer, got 0"):
        paired_bootstrap(base, tuned, [0.5], resamples=0)
    with pytest.raises(ValueError, match="splits must be a positive integer, got 2.5"):
        sampling_stability(base, [0.5], splits=2.5)
    renamed = replace(tuned, instruction_ids=[f"other-{i}" for i in range(len(tuned.instruction_ids))])
    with pytest.raises(SnapshotError, match="hold different instructions"):
        paired_bootstrap(base, renamed, [0.5])


# ------------------------------------------------------------------------ sampling stability


@pytest.mark.parametrize("mode", MODES)
def test_stability_of_two_instructions_is_their_jaccard(mode):
    """With two instructions per category every split puts one in each half, so the stability is
    exactly the Jaccard of the two instructions' own ISN sets, whatever the seed."""
    rng = np.random.default_rng(5)
    kinds, shapes, layers = moe_sites(layers=2)
    snapshot = draw([random_population(rng, CATEGORIES, shapes, kinds, layers)], 2, rng)[0]
    for seed in (0, 1):
        stability = sampling_stability(snapshot, [0.3], mode, splits=3, seed=seed)
        for row, category in enumerate(CATEGORIES):
            expected = jaccard(
                instruction_isn(snapshot, 2 * row, 0.3, mode),
                instruction_isn(snapshot, 2 * row + 1, 0.3, mode),
            )
            assert stability[category][0.3] == pytest.approx(expected, abs=1e-15)


def test_stability_falls_as_instructions_differ_more():
    rng = np.random.default_rng(6)
    kinds, shapes, layers = moe_sites(layers=2)
    population = random_population(rng, CATEGORIES, shapes, kinds, layers)
    alike, varied = draw([population, population], 40, rng, tokens=(400, 500), spreads=[0.0, 0.9])
    same, different = sampling_stability(alike, [0.5]), sampling_stability(varied, [0.5])
    for category in CATEGORIES:
        assert 0.9 < same[category][0.5] <= 1 and different[category][0.5] < same[category][0.5] - 0.05


@pytest.mark.parametrize("mode", MODES)
def test_half_sample_alteration_with_two_instructions_is_the_mean_of_each_instructions_jaccard(mode):
    """Two instructions per category: every split's halves are the two instructions, so the
    alteration at half size is the mean of base-vs-tuned Jaccards of each instruction's own sets."""
    rng = np.random.default_rng(11)
    kinds, shapes, layers = moe_sites(layers=2)
    population = random_population(rng, CATEGORIES, shapes, kinds, layers)
    moved = random_population(rng, CATEGORIES, shapes, kinds, layers)
    base, tuned = draw([population, moved], 2, rng)
    half = half_sample_alteration(base, tuned, [0.3], mode, splits=3)
    for row, category in enumerate(CATEGORIES):
        each = [
            jaccard(instruction_isn(base, i, 0.3, mode), instruction_isn(tuned, i, 0.3, mode))
            for i in (2 * row, 2 * row + 1)
        ]
        assert half[category][0.3] == pytest.approx(sum(each) / 2)


def test_half_sample_alteration_sets_a_real_change_below_the_stability_and_none_above_it():
    rng = np.random.default_rng(12)
    kinds, shapes, layers = moe_sites(layers=2)
    population = random_population(rng, CATEGORIES, shapes, kinds, layers)
    moved = random_population(rng, CATEGORIES, shapes, kinds, layers)
    base, same, tuned = draw([population, population, moved], 40, rng, tokens=(400, 500))
    stability = sampling_stability(base, [0.5])
    unchanged, changed = half_sample_alteration(base, same, [0.5]), half_sample_alteration(base, tuned, [0.5])
    for category in CATEGORIES:
        assert changed[category][0.5] < stability[category][0.5] < unchanged[category][0.5], category


# ------------------------------------------------------------------------------ layer phases


def test_three_segments_are_the_least_squares_fit_found_by_brute_force():
    rng = np.random.default_rng(5)
    profiles = torch.from_numpy(rng.integers(0, 50, size=(40, 9)))
    a, b, _ = three_segments(profiles)

    def error(profile, cut):  # the squared error of the three segments cut at (a, b)
        parts = [profile[: cut[0]], profile[cut[0] : cut[1]], profile[cut[1] :]]
        return sum(sum((v - sum(p) / len(p)) ** 2 for v in p) for p in parts)

    cuts = [(i, j) for i in range(1, 9) for j in range(i + 1, 9)]
    for row, profile in enumerate(profiles.double().tolist()):
        best = min(error(profile, cut) for cut in cuts)
        assert error(profile, (int(a[row]), int(b[row]))) == pytest.approx(best)
    # by hand: [5 | 3 1 2 | 4 6] has squared error 0 + 2 + 2, the least; the margin is min(5, 5) - 2
    fit = three_segments(torch.tensor([[5, 3, 1, 2, 4, 6]]))
    assert (int(fit[0][0]), int(fit[1][0])) == (1, 4) and fit[2][0].tolist() == [5.0, 2.0, 5.0]
    assert phase_margin(torch.tensor([[5, 3, 1, 2, 4, 6]])).tolist() == [3.0]
    with pytest.raises(ValueError, match="at least 3 layers, got 2"):
        three_segments(torch.zeros(1, 2))


def _profile_population(fractions, rng) -> Population:
    """Dense layers of 200 neurons (one per fraction); a fraction ``fractions[l]`` of layer ``l`` fires at 0.7, the
    rest at 0.3, so the population ISN count per layer at epsilon 0.5 is ``200 * fractions[l]``."""
    kinds = {f"layer{i}": "ffn" for i in range(len(fractions))}
    frequencies = {
        site: np.where(rng.permutation(200) < 200 * fraction, 0.7, 0.3)[None].repeat(2, 0)
        for site, fraction in zip(kinds, fractions, strict=True)
    }
    return Population(CATEGORIES, frequencies, kinds, {s: i for i, s in enumerate(kinds)})


def test_planted_three_phase_profile_is_detected_and_monotone_ones_are_not():
    rng = np.random.default_rng(8)
    shapes = {
        "three_phase": [0.5, 0.45, 0.2, 0.25, 0.45, 0.6],
        "falling": [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
        "rising": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    }
    for name, fractions in shapes.items():
        snapshot = draw([_profile_population(fractions, rng)], 40, rng, spread=0.8)[0]
        for test in layer_phase_tests(snapshot, [0.5], resamples=100).values():
            phase = test[0.5]
            if name == "three_phase":
                assert phase.three_phase and phase.margin > 0 and phase.ci95.lo > 0, phase
                assert phase.boundaries == (2, 4)  # the planted dip: layers 2-3
            else:
                assert not phase.three_phase and phase.ci95.hi < 0, (name, phase)


def test_the_phases_are_found_where_they_are_planted_and_flat_profiles_are_not_called_three_phase():
    """A spike at layer 0, a dip over layers 1-5 and a steady rise (the shape SmolLM2 shows): found,
    with the boundaries where they were planted and intervals around them. Flat profiles whose
    neurons sit near the threshold (noisy counts, no phases): called three-phase at most at the
    rate the 95% interval promises."""
    rng = np.random.default_rng(3)
    spike = [0.6, 0.3, 0.3, 0.3, 0.3, 0.3, 0.34, 0.38, 0.42, 0.46, 0.5, 0.54]
    snapshot = draw([_profile_population(spike, rng)], 20, rng, spread=0.8)[0]
    for test in layer_phase_tests(snapshot, [0.5], resamples=100).values():
        phase = test[0.5]
        assert phase.three_phase and phase.boundaries[0] == 1 and 6 <= phase.boundaries[1] <= 9, phase
        assert phase.boundaries_ci[0].lo <= 1 <= phase.boundaries_ci[0].hi
        assert phase.means[0] > phase.means[2] > phase.means[1]
    called = tests = 0
    for seed in range(30):
        generator = np.random.default_rng(100 + seed)
        kinds = {f"layer{i}": "ffn" for i in range(12)}
        frequencies = {site: generator.uniform(0.4, 0.6, size=(len(CATEGORIES), 100)) for site in kinds}
        population = Population(CATEGORIES, frequencies, kinds, {s: i for i, s in enumerate(kinds)})
        flat = draw([population], 20, generator, spread=0.8)[0]
        for test in layer_phase_tests(flat, [0.5], resamples=100, seed=seed).values():
            called, tests = called + test[0.5].three_phase, tests + 1
    assert tests == 30 * len(CATEGORIES) and called <= 0.05 * tests


# ------------------------------------------------------------------- selection used by the pass


def test_top_fraction_rows_and_shared_global_histograms_select_what_sorting_selects():
    generator = torch.Generator().manual_seed(9)
    counts = torch.randint(0, 30, (7, 5000), generator=generator)  # many ties
    for fraction in (0.001, 0.1, 0.37, 1.0):
        keep = math.ceil(fraction * 5000)
        order = torch.sort(-counts.double(), dim=1, stable=True).indices[:, :keep]
        expected = torch.zeros_like(counts, dtype=torch.bool).scatter_(1, order, True)
        assert torch.equal(top_fraction_rows(counts, fraction), expected)
        assert torch.equal(top_fraction_rows(counts.float(), fraction), expected)
    first = GlobalTopFraction(0.2, 7, 5000)
    first.observe(counts[:, :3000])
    first.observe(counts[:, 3000:])
    for fraction in (0.05, 0.5):
        shared, fresh = first.with_fraction(fraction), GlobalTopFraction(fraction, 7, 5000)
        fresh.observe(counts[:, :3000])
        fresh.observe(counts[:, 3000:])
        for part in (counts[:, :3000], counts[:, 3000:]):
            assert torch.equal(shared.select(part), fresh.select(part))


def test_pearson_from_moments_equals_the_correlation_of_the_values():
    """The bootstrap keeps five sums per resample instead of every expert's frequency: the Pearson
    they give equals numpy's on the values themselves, and a constant side gives nan."""
    rng = np.random.default_rng(7)
    x = rng.dirichlet(np.ones(60), size=(4, 24)).reshape(4, -1)  # q of 60 experts x 24 routers
    y = x + rng.normal(0, 0.003, x.shape)
    y[3] = 0.25  # a constant side
    sums = np.stack([x.sum(1), y.sum(1), (x * x).sum(1), (y * y).sum(1), (x * y).sum(1)], -1)
    got = pearson_from_moments(torch.from_numpy(sums), x.shape[1])
    for row in range(3):
        assert float(got[row]) == pytest.approx(np.corrcoef(x[row], y[row])[0, 1], abs=1e-12)
    assert math.isnan(float(got[3]))
