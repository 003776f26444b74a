"""Drift of ISNs/ISEs between two snapshots as flat, loggable metrics. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Sequence

from sparcom.metrics import ise_alteration, isn_alteration, mean_over
from sparcom.snapshot import Snapshot


def drift_metrics(
    reference: Snapshot, current: Snapshot, epsilons: Sequence[float], mode: str, against: str
) -> dict[str, float]:
    """``sparcom/isn_jaccard/{against}/eps={eps}/{category}`` for every epsilon, with a ``mean``
    over categories, and ``sparcom/ise_pearson/{against}/{category}`` for MoE models.

    ``against`` names the reference in the key: "base" (the vanilla model) or "prev" (the last snapshot).
    """
    metrics: dict[str, float] = {}
    for epsilon in epsilons:
        per_category = isn_alteration(reference, current, epsilon, mode)
        prefix = f"sparcom/isn_jaccard/{against}/eps={epsilon:g}"
        metrics |= {f"{prefix}/{c}": v for c, v in per_category.items()}
        metrics[f"{prefix}/mean"] = mean_over(list(per_category.values()))
    pearson = ise_alteration(reference, current)
    if pearson:
        metrics |= {f"sparcom/ise_pearson/{against}/{c}": v for c, v in pearson.items()}
        metrics[f"sparcom/ise_pearson/{against}/mean"] = mean_over(list(pearson.values()))
    return metrics
