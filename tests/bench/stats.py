"""``python tests/bench/stats.py``: cost of the statistics passes at their defaults.

Each measurement runs in a fresh process on counts built there (1,200 instructions, six
categories, int16 as stored): wall time, the time of the full-sample statistic it resamples
(``isn_alteration`` over the same epsilons, measured in the same process) as the reference ratio,
and the peak resident memory of the pass beside the size of the per-instruction counts it reads.

Shapes: ``tiny`` is tiny-qwen2-moe (4 layers; 8 experts x 32; shared expert 64); ``qwen-layer`` is
one layer of Qwen1.5-MoE-A2.7B at full width (60 experts x 1,408; shared expert 5,632; router 60),
so a whole model costs about 24 times that layer's time, at that layer's memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparcom.stats.analysis import category_tallies, instruction_similarity, isn_alteration  # noqa: E402
from sparcom.stats.estimates import expected_jaccard  # noqa: E402
from sparcom.stats.metrics import pairwise_jaccard  # noqa: E402
from sparcom.stats.permutation import diagonal_dominance, token_control  # noqa: E402
from sparcom.stats.resampling import paired_bootstrap, sampling_stability  # noqa: E402

from helpers.synthetic import Population, assemble, draw, moe_sites  # noqa: E402 (path set above)
from recording import memory, reset_peak  # noqa: E402

EPSILONS = [0.3, 0.5, 0.7]  # conf/sparcom/default.yaml
CATEGORIES = ["classification", "code", "general_qa", "generation", "math", "summarization"]
SHAPES = {"tiny": dict(layers=4, experts=8, expert_width=32, shared_width=64), "qwen-layer": None}


def snapshot_pair(shape: str, per_category: int):
    rng = np.random.default_rng(0)
    if shape == "tiny":
        kinds, shapes, layers = moe_sites(**SHAPES["tiny"])
        frequencies = {s: rng.beta(2, 3, (len(CATEGORIES), *v)) for s, v in shapes.items()}
        base = Population(CATEGORIES, frequencies, kinds, layers)
        moved = {s: np.clip(f + rng.normal(0, 0.05, f.shape), 0.01, 0.99) for s, f in frequencies.items()}
        return draw([base, base.with_frequencies(moved)], per_category, rng)
    # Full width, one layer: uniform random counts (the cost does not depend on their values).
    kinds, shapes, layers = moe_sites(layers=1, experts=60, expert_width=1408, shared_width=5632)
    size = len(CATEGORIES) * per_category
    category_of = np.repeat(np.arange(len(CATEGORIES)), per_category)
    tokens = rng.integers(30, 200, size)
    population = Population(CATEGORIES, {}, kinds, layers)
    pair = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(len(pair))
        counts = {
            s: (
                torch.rand(size, *v, generator=generator)
                * torch.from_numpy(tokens).float().reshape(-1, *[1] * len(v))
            ).to(torch.int16)
            for s, v in shapes.items()
        }
        pair.append(assemble(population, category_of, tokens, counts))
    return pair


def measure(name: str, shape: str, per_category: int, mode: str) -> dict:
    base, tuned = snapshot_pair(shape, per_category)
    counts_bytes = sum(c.numel() * c.element_size() for c in base.instruction_counts.values())
    start = time.perf_counter()
    for epsilon in EPSILONS:
        isn_alteration(base, tuned, epsilon, mode)
    reference = time.perf_counter() - start
    labels = base.instruction_categories
    if name in ("diagonal_dominance", "token_control"):
        similarity = instruction_similarity(base, 0.5)
        tokens = pairwise_jaccard(torch.rand(similarity.shape[0], 2048) < 0.03)
    if name == "chance_levels":  # every category and epsilon, from the per-site sizes of the tallies
        tallies = category_tallies([base, tuned], EPSILONS, mode)
        # At full width one layer is timed as 24 (Qwen1.5-MoE-A2.7B): its sites' sizes repeated.
        repeat = 24 if shape == "qwen-layer" else 1
        sizes = [
            (t.sizes[0].repeat(1, repeat), t.sizes[1].repeat(1, repeat), t.widths.repeat(repeat))
            for t in tallies.values()
        ]
    calls = {
        "paired_bootstrap": lambda: paired_bootstrap(base, tuned, EPSILONS, mode),
        "sampling_stability": lambda: sampling_stability(base, EPSILONS, mode),
        "chance_levels": lambda: [
            expected_jaccard(a[row], b[row], widths)
            for a, b, widths in sizes
            for row in range(len(CATEGORIES))
        ],
        "diagonal_dominance": lambda: diagonal_dominance(similarity, labels, CATEGORIES),
        "token_control": lambda: token_control(similarity, tokens, labels),
    }
    resident = memory("VmRSS")
    reset_peak()
    start = time.perf_counter()
    calls[name]()
    seconds = time.perf_counter() - start
    return dict(
        seconds=seconds,
        reference_seconds=reference,
        peak_above_start_mb=(memory("VmHWM") - resident) / 2**20,
        counts_per_snapshot_mb=counts_bytes / 2**20,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--one", nargs=4, metavar=("NAME", "SHAPE", "PER_CATEGORY", "MODE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--skip-qwen", action="store_true", help="only the tiny shapes")
    args = parser.parse_args()
    if args.one:
        name, shape, per_category, mode = args.one
        print(json.dumps(measure(name, shape, int(per_category), mode)))
        return
    runs = [
        ("paired_bootstrap", "tiny", 200, mode)
        for mode in ("threshold", "percentile_layer", "percentile_global")
    ]
    runs += [
        ("sampling_stability", "tiny", 200, "threshold"),
        ("sampling_stability", "tiny", 20, "threshold"),  # the live check at step 0, on the probe set
        ("chance_levels", "tiny", 20, "threshold"),
        ("diagonal_dominance", "tiny", 200, "threshold"),
        ("token_control", "tiny", 200, "threshold"),
    ]
    if not args.skip_qwen:
        runs += [("paired_bootstrap", "qwen-layer", 200, m) for m in ("threshold", "percentile_global")]
        runs += [
            ("sampling_stability", "qwen-layer", 200, "threshold"),
            ("chance_levels", "qwen-layer", 200, "threshold"),
        ]
    print(
        f"{'pass':<20}{'shape':<12}{'N':>6}  {'mode':<18}{'seconds':>9}{'x full-sample':>15}{'peak MB':>9}{'counts MB':>11}"
    )
    for name, shape, per_category, mode in runs:
        command = [sys.executable, __file__, "--one", name, shape, str(per_category), mode]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        ratio = result["seconds"] / result["reference_seconds"]
        print(
            f"{name:<20}{shape:<12}{6 * per_category:>6}  {mode:<18}{result['seconds']:>9.2f}{ratio:>15.1f}"
            f"{result['peak_above_start_mb']:>9.0f}{result['counts_per_snapshot_mb']:>11.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
