"""Statistics on stored counts (placeholder: the chance level only)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.signal import fftconvolve
from scipy.stats import hypergeom


def expected_jaccard(sizes_a: torch.Tensor, sizes_b: torch.Tensor, widths: torch.Tensor) -> float:
    """Expected Jaccard of two sets drawn uniformly within each site with these per-site sizes."""
    a, b = int(sizes_a.sum()), int(sizes_b.sum())
    if a + b == 0:
        return 1.0
    pmf = np.ones(1)
    for x, y, n in zip(sizes_a.tolist(), sizes_b.tolist(), widths.tolist(), strict=True):
        if x and y:
            pmf = np.clip(fftconvolve(pmf, hypergeom(n, x, y).pmf(np.arange(min(x, y) + 1))), 0, None)
    overlap = np.arange(len(pmf))
    return float((pmf * overlap / (a + b - overlap)).sum() / pmf.sum())
