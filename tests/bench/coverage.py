"""``python tests/bench/coverage.py``: how often the 95% paired bootstrap interval of an ISN Jaccard
covers the population value, over synthetic datasets whose population is known.

Each dataset draws per-neuron population frequencies ``mu`` (base) and ``mu'`` (tuned, ``mu`` moved
by ``shift``), so the population ISN sets ``isn(mu)``, ``isn(mu')`` and their Jaccard are known;
instructions are then drawn as in ``tests/synthetic.py`` (per-instruction rates spread around
``mu``, binomial counts over 30-200 tokens, base and tuned paired). The interval is computed by
``paired_bootstrap`` at its defaults. Printed per regime: coverage with its binomial standard
error, mean width, the estimate's mean error against the population value, and for comparison the
coverage of the basic (reverse percentile) and bias-corrected percentile intervals from the same
resamples.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparcom.stats.metrics import (
    jaccard,  # noqa: E402
    jaccard_ratio,  # noqa: E402
)
from sparcom.stats.resampling import paired_bootstrap, resample_pass  # noqa: E402
from sparcom.stats.select import isn  # noqa: E402

from helpers.synthetic import Population, draw  # noqa: E402 (path set above)

SITES = 4
# name: (mode, epsilon, per_category, neurons, spread, shift, beta a, beta b)
REGIMES = {
    "threshold eps=0.5, 200 instructions": ("threshold", 0.5, 200, 2000, 0.5, 0.05, 2, 3),
    "threshold eps=0.3, 200 instructions": ("threshold", 0.3, 200, 2000, 0.5, 0.05, 2, 3),
    "threshold eps=0.5, Jaccard ~0.5": ("threshold", 0.5, 200, 2000, 0.5, 0.2, 2, 3),
    "threshold eps=0.5, 20 instructions": ("threshold", 0.5, 20, 2000, 0.5, 0.05, 2, 3),
    "threshold eps=0.5, mu crowded at eps": ("threshold", 0.5, 200, 2000, 0.5, 0.05, 30, 30),
    "percentile_layer eps=0.1": ("percentile_layer", 0.1, 200, 2000, 0.5, 0.05, 2, 3),
    "percentile_global eps=0.1": ("percentile_global", 0.1, 200, 2000, 0.5, 0.05, 2, 3),
}


def one_dataset(rng, mode, epsilon, per_category, neurons, spread, shift, a, b, seed, resamples):
    kinds = {f"s{i}": "ffn" for i in range(SITES)}
    layers = {s: i for i, s in enumerate(kinds)}
    mu = {s: rng.beta(a, b, size=(1, neurons // SITES)) for s in kinds}
    moved = {s: np.clip(m + rng.normal(0, shift, m.shape), 0.005, 0.995) for s, m in mu.items()}
    population = Population(["all"], mu, kinds, layers)
    truth = jaccard(
        *(isn({s: torch.from_numpy(m[0]) for s, m in f.items()}, epsilon, mode) for f in (mu, moved))
    )
    base, tuned = draw([population, population.with_frequencies(moved)], per_category, rng, spread=spread)
    estimate = paired_bootstrap(base, tuned, [epsilon], mode, resamples=resamples, seed=seed).isn_jaccard[
        "all"
    ][epsilon]
    # The same resamples again, for the alternative intervals (paired_bootstrap keeps only its own).
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(per_category, (resamples, per_category), generator=generator)
    weights = torch.zeros(resamples, per_category).scatter_add_(1, draws, torch.ones(resamples, per_category))
    weights = {"all": torch.cat([torch.ones(1, per_category), weights])}
    every = torch.arange(resamples + 1)
    result = resample_pass([base, tuned], weights, [epsilon], mode, ((0, every), (1, every)))
    sizes = result.sizes.sum(-1)
    values = jaccard_ratio(result.intersections.sum(-1), sizes[0], sizes[1])[0, 0]
    value, resampled = float(values[0]), values[1:]
    assert value == estimate.value
    basic = (2 * value - estimate.ci95.hi, 2 * value - estimate.ci95.lo)
    bias = norm.ppf(
        min(
            max(
                float((resampled < value).double().mean() + 0.5 * (resampled == value).double().mean()), 1e-6
            ),
            1 - 1e-6,
        )
    )
    tails = torch.tensor(norm.cdf([2 * bias - 1.96, 2 * bias + 1.96]), dtype=torch.float64)
    corrected = torch.quantile(resampled, tails).tolist()
    return truth, estimate, basic, corrected


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--only", help="run only regimes whose name contains this")
    args = parser.parse_args()
    print(
        f"{'regime':<40}{'truth J':>8}{'coverage':>10}{'+-se':>7}{'width':>8}{'bias':>9}{'basic':>7}{'BC':>7}"
    )
    for name, (mode, epsilon, per_category, neurons, spread, shift, a, b) in REGIMES.items():
        if args.only and args.only not in name:
            continue
        rng = np.random.default_rng(0)
        hits, basic_hits, corrected_hits, widths, errors, truths = 0, 0, 0, [], [], []
        for dataset in range(args.datasets):
            truth, estimate, basic, corrected = one_dataset(
                rng, mode, epsilon, per_category, neurons, spread, shift, a, b, dataset, args.resamples
            )
            hits += estimate.ci95.lo <= truth <= estimate.ci95.hi
            basic_hits += basic[0] <= truth <= basic[1]
            corrected_hits += corrected[0] <= truth <= corrected[1]
            widths.append(estimate.ci95.hi - estimate.ci95.lo)
            errors.append(estimate.value - truth)
            truths.append(truth)
        n = args.datasets
        coverage = hits / n
        print(
            f"{name:<40}{np.mean(truths):>8.3f}{coverage:>10.3f}{math.sqrt(coverage * (1 - coverage) / n):>7.3f}"
            f"{np.mean(widths):>8.4f}{np.mean(errors):>+9.4f}{basic_hits / n:>7.3f}{corrected_hits / n:>7.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
