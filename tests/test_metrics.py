"""Selection and metrics on tiny hand-made inputs whose answers are computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sparcom.snapshot import Snapshot
from sparcom.stats.analysis import overlap_matrix
from sparcom.stats.metrics import (
    general_and_unique,
    jaccard,
    layer_profile,
    pairwise_jaccard,
    pearson,
    shared_counts,
)
from sparcom.stats.select import GlobalTopFraction, ise, isn, select_rows, threshold_count

T, F = True, False


def test_threshold_and_percentile_selection():
    p = {"a": torch.tensor([0.1, 0.5, 0.9, 0.2]), "b": torch.tensor([0.6, 0.05])}
    assert isn(p, 0.5)["a"].tolist() == [F, T, T, F]
    assert isn(p, 0.5)["b"].tolist() == [T, F]
    # top 50% per layer: ceil(0.5*4)=2 in a, ceil(0.5*2)=1 in b
    chosen = isn(p, 0.5, "percentile_layer")
    assert chosen["a"].tolist() == [F, T, T, F] and chosen["b"].tolist() == [T, F]
    # top ceil(0.34*6)=3 globally: 0.9, 0.6, 0.5
    chosen = isn(p, 0.34, "percentile_global")
    assert chosen["a"].tolist() == [F, T, T, F] and chosen["b"].tolist() == [T, F]
    with pytest.raises(ValueError, match=r"epsilon must be in \(0, 1\], got 1.5"):
        isn(p, 1.5)
    with pytest.raises(ValueError, match="unknown selection mode 'median'"):
        isn(p, 0.5, "median")


def test_ise_top_k_and_threshold():
    q = {"r": torch.tensor([0.1, 0.4, 0.3, 0.2])}
    assert ise(q, top_k=2)["r"].tolist() == [F, T, T, F]
    assert ise(q, epsilon=0.25)["r"].tolist() == [F, T, T, F]


def test_jaccard_and_pearson_by_hand():
    a = {"x": torch.tensor([T, T, F, F]), "y": torch.tensor([T])}
    b = {"x": torch.tensor([T, F, T, F]), "y": torch.tensor([T])}
    assert jaccard(a, b) == 2 / 4  # intersection {x0, y0}, union {x0, x1, x2, y0}
    empty = {"x": torch.zeros(3, dtype=torch.bool)}
    assert math.isnan(jaccard(empty, empty))  # two empty sets neither agree nor disagree
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == pytest.approx(1.0)
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert math.isnan(pearson(torch.ones(3), torch.tensor([1.0, 2.0, 3.0])))


def test_pairwise_jaccard_matches_the_definition():
    vectors = torch.tensor([[T, T, F], [T, F, F], [F, F, F], [F, F, F]])
    matrix = pairwise_jaccard(vectors, chunk=2)
    assert matrix[0, 1] == 0.5 and matrix[0, 2] == 0.0 and matrix[2, 3] == 1.0 and matrix[0, 0] == 1.0


def test_overlap_matrix_by_hand():
    # 4 instructions, 2 categories, one site of 3 neurons; eps=0.5 with T=2 tokens each.
    counts = torch.tensor([[2, 2, 0], [2, 0, 0], [0, 0, 2], [0, 2, 2]])  # sets: {0,1} {0} {2} {1,2}
    snapshot = Snapshot(
        categories=["code", "math"],
        category_tokens=torch.tensor([4, 4]),
        category_counts={"s": torch.stack([counts[:2].sum(0), counts[2:].sum(0)])},
        site_kinds={"s": "ffn"},
        site_layers={"s": 0},
        instruction_ids=["a", "b", "c", "d"],
        instruction_categories=["code", "code", "math", "math"],
        instruction_tokens=torch.tensor([2, 2, 2, 2]),
        instruction_counts={"s": counts},
    )
    matrix = overlap_matrix(snapshot, 0.5)
    assert matrix[0, 0] == pytest.approx(1 / 2)  # J({0,1},{0})
    assert matrix[1, 1] == pytest.approx(1 / 2)  # J({2},{1,2})
    # cross pairs: J({0,1},{2})=0, J({0,1},{1,2})=1/3, J({0},{2})=0, J({0},{1,2})=0 -> mean 1/12
    assert matrix[0, 1] == pytest.approx(1 / 12) and matrix[1, 0] == pytest.approx(1 / 12)


def test_general_unique_and_layer_profile():
    sets = {
        "code": {"l0": torch.tensor([T, T, F]), "l1": torch.tensor([T, F])},
        "math": {"l0": torch.tensor([T, F, T]), "l1": torch.tensor([F, F])},
    }
    general, unique = general_and_unique(sets)
    assert general["l0"].tolist() == [T, F, F] and general["l1"].tolist() == [F, F]
    assert unique["code"]["l0"].tolist() == [F, T, F] and unique["code"]["l1"].tolist() == [T, F]
    assert unique["math"]["l0"].tolist() == [F, F, T]
    assert layer_profile(sets["code"], {"l0": 0, "l1": 1}) == [2, 1]


@pytest.mark.parametrize("mode", ["threshold", "percentile_layer", "percentile_global"])
def test_selection_from_counts_site_by_site_equals_selection_from_frequencies(mode):
    """Random integer counts with many ties, empty rows and zero totals: the streaming selection
    picks exactly what ``isn`` picks from the float64 frequencies of the concatenated sites."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        rows = 3
        sites = {
            f"s{i}": torch.randint(
                0, 6, (rows, int(torch.randint(1, 7, (1,), generator=generator))), generator=generator
            )
            for i in range(3)
        }
        totals = torch.randint(0, 8, (rows,), generator=generator)
        epsilon = [0.01, 0.1, 0.25, 1 / 3, 0.5, 0.7, 1.0, 0.05][trial % 8]
        if mode == "percentile_global":
            selector = GlobalTopFraction(epsilon, rows, sum(c.shape[1] for c in sites.values()))
            for counts in sites.values():
                selector.observe(counts)
            chosen = {s: selector.select(c) for s, c in sites.items()}
        else:
            chosen = {s: select_rows(c, totals, epsilon, mode) for s, c in sites.items()}
        for r in range(rows):
            frequency = {s: c[r].double() / max(int(totals[r]), 1) for s, c in sites.items()}
            expected = isn(frequency, epsilon, mode)
            assert all(torch.equal(expected[s], chosen[s][r]) for s in sites), (trial, r)


def test_threshold_count_is_the_exact_integer_bound():
    for total in range(0, 3000):
        bounds = threshold_count(0.1, torch.tensor([total])), threshold_count(1 / 3, torch.tensor([total]))
        for epsilon, bound in zip((0.1, 1 / 3), bounds, strict=True):
            c, t = int(bound[0]), max(total, 1)
            assert c / t >= epsilon and (c - 1) / t < epsilon


@pytest.mark.parametrize(("rows", "columns"), [(3, 1), (16, 64), (40, 1), (200, 333), (1200, 4096)])
def test_shared_counts_are_exact_on_either_kernel(rows, columns):
    generator = torch.Generator().manual_seed(rows * columns)
    for density in (0.02, 0.5, 0.98):
        chosen = torch.rand(rows, columns, generator=generator) < density
        exact = chosen.double() @ chosen.double().T
        assert torch.equal(shared_counts(chosen), exact)


@pytest.mark.parametrize("mode", ["threshold", "percentile_layer"])
def test_unique_isns_are_each_categorys_own_share_of_the_frequent_ones(mode):
    """``isn_set="unique"``: a category's ISNs that are ISNs of no other category. Against the
    frequent sets: each a subset, pairwise disjoint, and together every neuron in exactly one set."""
    import numpy as np

    from sparcom.stats.select import category_isns

    from helpers.synthetic import draw, moe_sites, random_population

    rng = np.random.default_rng(4)
    kinds, shapes, layers = moe_sites(layers=2)
    categories = ["classification", "code", "math"]
    snapshot = draw([random_population(rng, categories, shapes, kinds, layers)], 5, rng)[0]
    frequent = category_isns(snapshot, 0.4, mode)
    unique = category_isns(snapshot, 0.4, mode, isn_set="unique")
    for site in frequent["math"]:
        members = torch.stack([frequent[c][site] for c in categories]).sum(0)
        for category in categories:
            assert torch.equal(unique[category][site], frequent[category][site] & (members == 1))
        assert int(torch.stack([unique[c][site] for c in categories]).sum(0).max()) <= 1
    assert (
        0
        < sum(int(s.sum()) for s in unique["math"].values())
        < sum(int(s.sum()) for s in frequent["math"].values())
    )
    with pytest.raises(ValueError, match="unknown ISN set 'rare'; expected one of"):
        category_isns(snapshot, 0.4, mode, isn_set="rare")
