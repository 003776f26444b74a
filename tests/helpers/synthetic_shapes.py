"""Random snapshots with the site layout of real models, written one site at a time.

Counts are drawn from per-neuron firing frequencies (a category shift on top of a shared base
rate), so ISN sets have realistic sizes; a "tuned" twin moves a fraction of the frequencies.
Nothing holds more than one site in memory, so 5 GB snapshots can be written on a laptop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sparcom.data import CATEGORIES
from sparcom.snapshot import Snapshot


@dataclass(frozen=True)
class Layout:
    """Per layer: a dense FFN width (or 0), routed experts ``(E, d)`` (or None), shared FFN width."""

    model: str
    model_type: str
    layers: int
    dense: int = 0
    experts: tuple[int, int] | None = None
    shared: int = 0
    first_dense: int = 0  # DeepSeek: the first layers are dense FFNs of this width

    def sites(self) -> dict[str, tuple[str, int, tuple[int, ...]]]:
        """site -> (kind, layer, shape), in the order a recording lists them."""
        out: dict[str, tuple[str, int, tuple[int, ...]]] = {}
        for layer in range(self.layers):
            prefix = f"model.layers.{layer}.mlp"
            if self.first_dense and layer == 0:
                out[prefix] = ("ffn", layer, (self.first_dense,))
                continue
            if self.dense:
                out[prefix] = ("ffn", layer, (self.dense,))
            if self.experts:
                out[f"{prefix}.experts"] = ("experts", layer, self.experts)
                out[f"{prefix}.gate"] = ("router", layer, (self.experts[0],))
            if self.shared:
                out[f"{prefix}.shared_expert"] = ("ffn", layer, (self.shared,))
        return out

    def scaled(self, layers: int | None = None, width: float = 1.0) -> Layout:
        """The same layout with fewer layers and neuron widths scaled by ``width``."""

        def w(n: int) -> int:
            return max(1, int(n * width))

        return Layout(
            self.model,
            self.model_type,
            layers or self.layers,
            w(self.dense) if self.dense else 0,
            (self.experts[0], w(self.experts[1])) if self.experts else None,
            w(self.shared) if self.shared else 0,
            w(self.first_dense) if self.first_dense else 0,
        )


LAYOUTS = {
    "llama-3.1-8b": Layout("meta-llama/Llama-3.1-8B", "llama", 32, dense=14336),
    "qwen1.5-moe-a2.7b": Layout("Qwen/Qwen1.5-MoE-A2.7B", "qwen2_moe", 24, experts=(60, 1408), shared=5632),
    "mixtral-8x7b": Layout("mistralai/Mixtral-8x7B-v0.1", "mixtral", 32, experts=(8, 14336)),
    "deepseek-v2-lite": Layout(
        "deepseek-ai/DeepSeek-V2-Lite", "deepseek_v2", 27, experts=(64, 1408), shared=2816, first_dense=10944
    ),
}


def random_snapshot(
    path: str | Path, layout: Layout, instructions: int = 1200, seed: int = 0, drift: float = 0.0
) -> Path:
    """Write a random snapshot of ``layout`` over ``instructions`` (an equal share per category).

    ``drift``: the fraction of each site's neuron frequencies redrawn, as fine-tuning would move
    them; twins written with the same ``seed`` and different ``drift`` share everything else.
    """
    categories = list(CATEGORIES)
    sites = layout.sites()
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(instructions) % len(categories)
    tokens = torch.randint(30, 120, (instructions,), generator=generator)

    def draw(site: str) -> torch.Tensor:
        """``[N, *shape]`` int16 counts of one site, the same every time it is called."""
        kind, layer, shape = sites[site]
        local = torch.Generator().manual_seed(seed * 100_003 + list(sites).index(site))
        width = int(torch.tensor(shape).prod())
        if kind == "router":  # each token selects a few experts: frequencies of about top-k / E
            rate = torch.rand(len(categories), width, generator=local) * 4 / width
        else:
            rate = torch.rand(width, generator=local) ** 2 + 0.25 * torch.rand(
                len(categories), width, generator=local
            )
        if drift:
            moved = torch.rand(width, generator=torch.Generator().manual_seed(seed + 7 + layer)) < drift
            rate = torch.where(moved, torch.rand(rate.shape, generator=local), rate)
        rate = rate.clamp(0, 1)
        # Stochastic rounding with a cheap pseudo-random offset (row phase + column phase, mod 1):
        # each count is floor(T * p + u) with u uniform over the table, without one draw per count.
        row_phase, column_phase = (
            torch.rand(instructions, 1, generator=local),
            torch.rand(width, generator=local),
        )
        out = torch.empty(instructions, width, dtype=torch.int16)
        for category in range(len(categories)):
            rows = (labels == category).nonzero().flatten()
            offset = (row_phase[rows] + column_phase).frac_()
            out[rows] = (tokens[rows, None] * rate[category]).add_(offset).floor_().to(torch.int16)
        return out.reshape(instructions, *shape)

    def category_counts(site: str) -> torch.Tensor:
        counts = draw(site)
        totals = torch.zeros(len(categories), *counts.shape[1:], dtype=torch.int64)
        return totals.index_add_(0, labels, counts.long())

    shapes = {site: shape for site, (_, _, shape) in sites.items()}
    snapshot = Snapshot(
        categories=categories,
        category_tokens=torch.zeros(len(categories), dtype=torch.int64).index_add_(0, labels, tokens),
        category_counts=Computed(shapes, len(categories), category_counts),
        site_kinds={s: kind for s, (kind, _, _) in sites.items()},
        site_layers={s: layer for s, (_, layer, _) in sites.items()},
        instruction_ids=[f"synthetic-{i:05d}" for i in range(instructions)],
        instruction_categories=[categories[int(c)] for c in labels],
        instruction_tokens=tokens,
        instruction_counts=Computed(shapes, instructions, draw),
        meta={
            "model": layout.model,
            "model_type": layout.model_type,
            "config_hash": f"synthetic-{layout.model}",
            "dataset_hash": f"{seed:016x}",
            "token_scope": "prompt",
            "step": None,
        },
    )
    return snapshot.save(path)


class Computed(Mapping[str, torch.Tensor]):
    """site -> ``[rows, *shape]`` counts computed at each access, with shapes known up front
    (as a loaded snapshot's lazy tensors are), so a snapshot can be saved one site at a time."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], rows: int, produce: Callable[[str], torch.Tensor]):
        self._shapes, self._rows, self._produce = shapes, rows, produce

    def __getitem__(self, site: str) -> torch.Tensor:
        return self._produce(site)

    def shape(self, site: str) -> tuple[int, ...]:
        return (self._rows, *self._shapes[site])

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)
