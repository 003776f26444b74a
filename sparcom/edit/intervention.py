"""Scale chosen neurons' activations for the duration of a ``with`` block, and draw random-neuron
controls with the same per-site counts.

A neuron's activation ``f(g_i) * u_i`` reaches the rest of the model only through its column of the
down projection (for a routed-expert neuron, its column inside its expert), so multiplying that
column by ``scale`` multiplies exactly the neuron's contribution, whichever kernel runs the
experts (``eager``, ``batched_mm``, ``grouped_mm``). The weights are written in place and the
original entries written back on exit, bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparcom.models.loading import check_resident
from sparcom.models.sites import find_sites, neuron_weights, unwrap
from sparcom.stats.select import NEURON_KINDS, NeuronSet


def neuron_sites(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``site -> (kind, counts shape)`` for every neuron site (FFN and routed-expert neurons)."""
    return {s.name: (s.kind, s.shape) for s, _ in find_sites(model) if s.kind in NEURON_KINDS}


def check_neurons(neurons: NeuronSet, sites: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Refuse a set whose sites the model does not have, or whose masks are not shaped like them."""
    for site, chosen in neurons.items():
        if site not in sites:
            raise ValueError(
                f"unknown neuron site {site!r}; this model's neuron sites are {sorted(sites)[:4]}... "
                f"({len(sites)} in all, keyed as in sparcom.models.sites; routers have no neurons)"
            )
        if chosen.dtype != torch.bool or tuple(chosen.shape) != sites[site][1]:
            raise ValueError(
                f"neurons[{site!r}] is {chosen.dtype} {tuple(chosen.shape)}; expected a bool tensor "
                f"shaped like the site's counts {sites[site][1]}"
            )


def check_editable(model: nn.Module, sites) -> None:
    """Refuse sites whose weights accelerate keeps offloaded: an edit in place would not apply."""
    modules = dict(unwrap(model).named_modules())
    for site in sites:
        check_resident(modules[site], f"intervening on {site}")


@contextlib.contextmanager
def intervene(model: nn.Module, neurons: NeuronSet, scale: float) -> Iterator[None]:
    """Multiply the activations of ``neurons`` by ``scale`` inside the block (0 silences them).

    Args:
        model: a supported HF model (optionally wrapped); not under ZeRO-3, whose weights are shards.
        neurons: ``site -> bool`` tensor shaped like the site's counts (``[d_ff]`` for dense FFNs and
            shared experts, ``[num_experts, d_expert]`` for routed experts), as ``sparcom.stats.select``
            returns; sites absent from the dict are left alone.
        scale: any finite number; 1 changes nothing.

    Nests and composes with ``sparcom.record``: recording reads gate pre-activations, which an
    intervention changes only through earlier layers' outputs.
    """
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (0 silences, 1 leaves as is), got {scale!r}")
    sites = neuron_sites(model)
    check_neurons(neurons, sites)
    check_editable(model, neurons)
    modules = dict(unwrap(model).named_modules())
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for site, chosen in neurons.items():
                if scale == 1 or not bool(chosen.any()):
                    continue
                owner, name, mask = neuron_weights(modules[site], sites[site][0], chosen)[0]
                if parametrize.is_parametrized(owner, name):
                    raise ValueError(
                        f"{site}.{name} is parametrized (ISN-only training in progress); "
                        "intervene on a merged model (sparcom.train.isn_training.merge)"
                    )
                weight = getattr(owner, name)
                if hasattr(weight, "ds_id"):
                    raise ValueError(
                        f"{site}.{name} is a DeepSpeed ZeRO-3 shard; intervene on a gathered model"
                    )
                original = weight[mask]
                saved.append((weight, mask, original))
                weight[mask] = 0 if scale == 0 else original * scale  # exact zeros, even for -x or nan
        yield
    finally:
        with torch.no_grad():
            for weight, mask, original in reversed(saved):
                weight[mask] = original


def random_like(neurons: NeuronSet, generator: torch.Generator) -> NeuronSet:
    """As many neurons as ``neurons`` has in each site, and within a site of routed experts
    (``[E, d]``) in each expert, drawn uniformly from the same site (expert): a control that differs
    from the set only in which neurons it holds."""
    control = {}
    for site, chosen in neurons.items():
        rows = chosen.reshape(-1, chosen.shape[-1]) if chosen.dim() > 1 else chosen.reshape(1, -1)
        picked = torch.zeros(rows.shape, dtype=torch.bool)
        for row, count in enumerate(rows.sum(1).tolist()):
            picked[row, torch.randperm(rows.shape[1], generator=generator)[:count]] = True
        control[site] = picked.reshape(chosen.shape)
    return control


def random_sets(neurons: NeuronSet, draws: int, generator: torch.Generator) -> list[NeuronSet]:
    """``draws`` independent random-neuron controls for ``neurons``, each with its per-site counts."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(
            f"control_draws must be an integer >= 2 (a control is a distribution), got {draws!r}"
        )
    return [random_like(neurons, generator) for _ in range(draws)]
