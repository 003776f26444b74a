"""Synthetic snapshots with planted truth, for the statistics tests.

A population assigns every neuron (and expert) of every site a firing frequency ``mu`` per
category. An instruction of category ``c`` has ``T`` counted tokens and its own per-neuron rate
``pi = mu + s * (2u - 1)`` with ``u ~ U(0, 1)`` and ``s = spread * min(mu, 1 - mu)``, so
``E[pi] = mu`` exactly and ``pi`` stays in [0, 1]; its counts are ``Binomial(T, pi)``. The population
frequency ``E[sum counts] / E[sum T]`` is therefore ``mu`` itself, and the population ISN sets are
``isn(mu)``. Snapshots drawn together (base and tuned) share their instructions: the same ids,
token counts and ``u``, so their counts are paired as a model's before and after fine-tuning are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparcom.snapshot import Snapshot


@dataclass
class Population:
    """``frequencies[site]``: ``[C, *shape]`` firing frequency ``mu`` per category."""

    categories: list[str]
    frequencies: dict[str, np.ndarray]
    site_kinds: dict[str, str]
    site_layers: dict[str, int]

    def with_frequencies(self, frequencies: dict[str, np.ndarray]) -> Population:
        return Population(self.categories, frequencies, self.site_kinds, self.site_layers)


def moe_sites(layers: int = 4, experts: int = 8, expert_width: int = 32, shared_width: int = 64):
    """Sites shaped as in ``tiny-qwen2-moe``: per layer a router, routed experts and a shared expert."""
    kinds, shapes, layer_of = {}, {}, {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp"
        for name, kind, shape in (
            (f"{prefix}.gate", "router", (experts,)),
            (f"{prefix}.experts", "experts", (experts, expert_width)),
            (f"{prefix}.shared_expert", "ffn", (shared_width,)),
        ):
            kinds[name], shapes[name], layer_of[name] = kind, shape, layer
    return kinds, shapes, layer_of


def random_population(
    rng: np.random.Generator, categories: list[str], shapes: dict, kinds: dict, layers: dict, a=2.0, b=3.0
) -> Population:
    """Frequencies drawn from Beta(a, b), independently per category and neuron."""
    frequencies = {s: rng.beta(a, b, size=(len(categories), *shape)) for s, shape in shapes.items()}
    return Population(categories, frequencies, kinds, layers)


def draw(
    populations: list[Population],
    per_category: int,
    rng: np.random.Generator,
    tokens: tuple[int, int] = (30, 200),
    spread: float = 0.5,
    spreads: list[float] | None = None,
) -> list[Snapshot]:
    """One snapshot per population, over the same ``per_category`` instructions of each category.
    ``spreads`` (one per population) overrides ``spread``."""
    first = populations[0]
    size = len(first.categories) * per_category
    category_of = np.repeat(np.arange(len(first.categories)), per_category)
    token_counts = rng.integers(tokens[0], tokens[1] + 1, size=size)
    shared_u = {s: rng.random((size, *mu.shape[1:])) for s, mu in first.frequencies.items()}
    snapshots = []
    for index, population in enumerate(populations):
        heterogeneity = spread if spreads is None else spreads[index]
        instruction_counts = {}
        for site, mu in population.frequencies.items():
            mean = mu[category_of]
            rate = mean + heterogeneity * np.minimum(mean, 1 - mean) * (2 * shared_u[site] - 1)
            shape = (-1, *[1] * (mean.ndim - 1))
            instruction_counts[site] = torch.from_numpy(rng.binomial(token_counts.reshape(shape), rate))
        snapshots.append(assemble(population, category_of, token_counts, instruction_counts))
    return snapshots


def assemble(
    population: Population, category_of: np.ndarray, token_counts: np.ndarray, instruction_counts: dict
) -> Snapshot:
    """A snapshot whose category counts are the sums of its instructions' counts."""
    categories = population.categories
    rows = torch.from_numpy(category_of)
    instruction_tokens = torch.from_numpy(np.asarray(token_counts, dtype=np.int64))
    category_tokens = torch.zeros(len(categories), dtype=torch.int64).index_add_(0, rows, instruction_tokens)
    category_counts = {
        s: torch.zeros((len(categories), *c.shape[1:]), dtype=torch.int64).index_add_(0, rows, c.long())
        for s, c in instruction_counts.items()
    }
    labels = [categories[c] for c in category_of]
    return Snapshot(
        categories=list(categories),
        category_tokens=category_tokens,
        category_counts=category_counts,
        site_kinds=dict(population.site_kinds),
        site_layers=dict(population.site_layers),
        instruction_ids=[f"{label}-{i}" for i, label in enumerate(labels)],
        instruction_categories=labels,
        instruction_tokens=instruction_tokens,
        instruction_counts={s: c.to(torch.int16) for s, c in instruction_counts.items()},
        meta={"model_type": "synthetic", "token_scope": "prompt"},
    )


def vocabulary_snapshot(
    rng: np.random.Generator, per_category: int, beyond: float = 0.0, categories: int = 6, neurons: int = 400
) -> tuple[Snapshot, torch.Tensor]:
    """A snapshot whose ISNs are driven by the instructions' token sets, and those token sets.

    Categories differ in vocabulary only: each draws 60% of its tokens from 100 common ones and the
    rest from 40 of its own (Zipf weights). A neuron fires on every token of an instruction that
    contains one of the ~1% of tokens wired to it, and otherwise at a rate drawn per instruction
    from U(0, 0.7) (noise independent of category), so at epsilon 0.5 an instruction's ISN set is
    the union of its tokens' neurons plus noise: ISN overlap follows token overlap alone. With
    ``beyond > 0`` each category also has 30 neurons of its own that fire at rate ``beyond`` on its
    instructions whatever their tokens: structure beyond vocabulary.
    Returns the snapshot and ``[N, V]`` bool token presence.
    """
    size, own, common = categories * per_category, 40, 100
    category_of = np.repeat(np.arange(categories), per_category)
    lengths = rng.integers(20, 61, size)
    zipf_common, zipf_own = 1 / np.arange(1, common + 1), 1 / np.arange(1, own + 1)
    from_common = rng.choice(common, size=(size, 60), p=zipf_common / zipf_common.sum())
    from_own = (
        common + own * category_of[:, None] + rng.choice(own, size=(size, 60), p=zipf_own / zipf_own.sum())
    )
    tokens = np.where(rng.random((size, 60)) < 0.6, from_common, from_own)
    present = np.zeros((size, common + own * categories), dtype=bool)
    for i in range(size):
        present[i, tokens[i, : lengths[i]]] = True
    wired = rng.random((present.shape[1], neurons)) < 0.01
    on = (present.astype(np.float32) @ wired.astype(np.float32)) > 0  # float: numpy has no integer BLAS
    rate = rng.uniform(0, 0.7, (size, neurons))
    if beyond:
        for c in range(categories):
            rate[category_of == c, 30 * c : 30 * c + 30] = beyond
    counts = np.where(on, lengths[:, None], rng.binomial(lengths[:, None], rate))
    names = [f"c{c}" for c in range(categories)]
    population = Population(names, {"mlp": np.zeros((categories, neurons))}, {"mlp": "ffn"}, {"mlp": 0})
    snapshot = assemble(population, category_of, lengths, {"mlp": torch.from_numpy(counts)})
    return snapshot, torch.from_numpy(present)
