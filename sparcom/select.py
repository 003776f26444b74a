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
    return {s: q for s, q in snapshot.frequency(category).items() if snapshot.site_kinds[s] == "router"}


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
