"""A base-vs-tuned comparison as one typed result, and the one function that builds it.

``Comparison`` is the data model of analyze.py's report: tables, ``summary.json``, the HTML page
and its figures are renderings of it (``sparcom.report``), and nothing is parsed back from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from sparcom import analysis
from sparcom.drift import DriftPoint
from sparcom.metrics import category_block_means
from sparcom.snapshot import Snapshot, check_comparable
from sparcom.stats import expected_jaccard

SIDES = ("base", "tuned")


@dataclass(frozen=True)
class Side:
    """One side of a comparison: what the user named, and what it was."""

    label: str  # the preset, path or run the user gave
    model: str  # the model the snapshot was recorded from
    step: int | None  # training step (None for a model that was not trained here)


@dataclass(frozen=True)
class Settings:
    """What was compared and how; shown in the report's header and kept in summary.json."""

    epsilons: list[float]
    selection_mode: str
    token_scope: str
    overlap_epsilon: float
    sweep_epsilons: list[float]
    instructions: dict[str, int]  # probe instructions per category
    run: dict = field(default_factory=dict)  # the training run's settings (learning rate, steps, ...)
    statistics: dict | None = None  # resamples, permutations, splits, seed (None: not computed)


@dataclass(frozen=True)
class Estimate:
    """A number with how far it can be trusted: its 95% interval, and for an ISN Jaccard the
    chance level (random sets of the same per-site sizes) and the split-half stability."""

    value: float
    ci95: tuple[float, float] | None = None
    chance: float | None = None
    stability_base: float | None = None
    stability_tuned: float | None = None


@dataclass(frozen=True)
class Test:
    """A statistic with its permutation p-value (``p_holm``: Holm-adjusted across categories)."""

    statistic: float
    p_value: float
    p_holm: float | None = None


@dataclass(frozen=True)
class Overlap:
    """The 6x6 mean pairwise Jaccard of per-instruction ISN sets, and whether its diagonal stands out."""

    matrix: list[list[float]]
    diagonal_dominance: Test | None = None
    per_category: dict[str, Test] | None = None


@dataclass(frozen=True)
class TokenControl:
    """ISN overlap against vocabulary overlap: their correlation over the 6x6 matrices, and the
    category effect on ISN similarity beyond token similarity (a regression over instruction pairs)."""

    correlation: float
    category_effect: float | None = None
    p_value: float | None = None
    verdict: str | None = None


@dataclass(frozen=True)
class Profile:
    """ISN count per layer; three-phase when the middle third's mean is below both others."""

    counts: list[int]
    three_phase: bool
    margin: float  # min(early, late) - middle, in ISNs per layer
    ci95: tuple[float, float] | None = None


@dataclass
class Comparison:
    """Everything analyze.py reports about a base and a tuned snapshot.

    ``isn_jaccard[category][epsilon]`` (categories and "mean"), ``ise_pearson[category]`` (MoE
    only), ``sweep[category]`` over ``settings.sweep_epsilons``, ``isn_counts[side][category] =
    (ISNs, unique ISNs)``, ``general[side]``, ``layer_profile[side][category]``, and, with
    per-instruction counts, ``overlap[side]``, ``token_overlap`` and ``token_control[side]``.
    ``notes[field]`` says why a field is empty.
    """

    categories: list[str]
    base: Side
    tuned: Side
    settings: Settings
    isn_jaccard: dict[str, dict[float, Estimate]]
    ise_pearson: dict[str, Estimate] | None
    sweep: dict[str, list[float]]
    sweep_chance: list[float]
    isn_counts: dict[str, dict[str, tuple[int, int]]]
    general: dict[str, int]
    layer_profile: dict[str, dict[str, Profile]]
    overlap: dict[str, Overlap] | None = None
    token_overlap: list[list[float]] | None = None
    token_control: dict[str, TokenControl] | None = None
    drift: list[DriftPoint] | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        """The JSON document written as summary.json (schema in the README)."""

        def estimate(e: Estimate, keys: Sequence[str]) -> dict:
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(e).items() if k in keys}

        jaccard_keys = ("value", "ci95", "chance", "stability_base", "stability_tuned")
        return {
            "base": asdict(self.base),
            "tuned": asdict(self.tuned),
            "settings": asdict(self.settings),
            "isn_jaccard": {
                c: {f"eps={e:g}": estimate(v, jaccard_keys) for e, v in by_eps.items()}
                for c, by_eps in self.isn_jaccard.items()
            },
            "ise_pearson": None
            if self.ise_pearson is None
            else {c: estimate(v, ("value", "ci95")) for c, v in self.ise_pearson.items()},
            "epsilon_sweep": {
                "epsilons": self.settings.sweep_epsilons,
                "chance": self.sweep_chance,
                **self.sweep,
            },
            "isn_counts": {
                side: {c: {"isns": n, "unique": u} for c, (n, u) in counts.items()}
                | {"general": self.general[side]}
                for side, counts in self.isn_counts.items()
            },
            "layer_profile": {
                side: {
                    c: {**asdict(p), "ci95": list(p.ci95) if p.ci95 else None} for c, p in profiles.items()
                }
                for side, profiles in self.layer_profile.items()
            },
            "overlap": None
            if self.overlap is None
            else {
                side: {
                    "matrix": o.matrix,
                    "diagonal_dominance": _test(o.diagonal_dominance, holm=False),
                    "per_category": None
                    if o.per_category is None
                    else {c: _test(t) for c, t in o.per_category.items()},
                }
                for side, o in self.overlap.items()
            },
            "token_overlap": self.token_overlap,
            "token_control": None
            if self.token_control is None
            else {side: asdict(t) for side, t in self.token_control.items()},
            "drift": None if self.drift is None else [p.to_json() for p in self.drift],
            "notes": self.notes,
        }


def _test(test: Test | None, holm: bool = True) -> dict | None:
    if test is None:
        return None
    out = {"statistic": test.statistic, "p_value": test.p_value}
    return out | {"p_holm": test.p_holm} if holm else out


def describe(snapshot: Snapshot, label: str) -> Side:
    return Side(label=label, model=str(snapshot.meta.get("model", "")), step=snapshot.meta.get("step"))


def compare(
    base: Snapshot,
    tuned: Snapshot,
    *,
    labels: tuple[str, str],
    epsilons: Sequence[float],
    selection_mode: str,
    overlap_epsilon: float,
    sweep_epsilons: Sequence[float],
    token_similarity: torch.Tensor | None = None,
    drift: list[DriftPoint] | None = None,
    run: dict | None = None,
) -> Comparison:
    """Compare two snapshots of the same probe set: every table, matrix and profile of the report.

    ``token_similarity``: ``[N, N]`` Jaccard of the instructions' token sets (base order), for
    the vocabulary-overlap control; ``drift``: the run's recorded drift, if any.
    """
    check_comparable(base, tuned)
    categories = list(base.categories)
    every_epsilon = [*epsilons, *sweep_epsilons, overlap_epsilon]
    tallies = analysis.category_tallies([base, tuned], every_epsilon, selection_mode)

    def chance(epsilon: float, category: str) -> float:
        t, row = tallies[epsilon], categories.index(category)
        return expected_jaccard(t.sizes[0][row], t.sizes[1][row], t.widths)

    isn_jaccard: dict[str, dict[float, Estimate]] = {c: {} for c in [*categories, "mean"]}
    for epsilon in epsilons:
        for category in categories:
            value = tallies[epsilon].jaccard(category)
            isn_jaccard[category][epsilon] = Estimate(value, chance=chance(epsilon, category))
        per_category = [isn_jaccard[c][epsilon] for c in categories]
        isn_jaccard["mean"][epsilon] = Estimate(
            _mean([e.value for e in per_category]), chance=_mean([e.chance for e in per_category])
        )
    pearson = analysis.ise_alteration(base, tuned)
    ise_pearson = (
        {c: Estimate(v) for c, v in pearson.items()} | {"mean": Estimate(_mean(list(pearson.values())))}
        if pearson
        else None
    )
    focus = tallies[overlap_epsilon]
    layer_profile = {
        side: {c: _profile(focus.layer_profile(c, index)) for c in categories}
        for index, side in enumerate(SIDES)
    }
    comparison = Comparison(
        categories=categories,
        base=describe(base, labels[0]),
        tuned=describe(tuned, labels[1]),
        settings=Settings(
            epsilons=list(epsilons),
            selection_mode=selection_mode,
            token_scope=str(base.meta.get("token_scope")),
            overlap_epsilon=overlap_epsilon,
            sweep_epsilons=list(sweep_epsilons),
            instructions=dict(base.meta.get("category_instructions", {})),
            run=run or {},
        ),
        isn_jaccard=isn_jaccard,
        ise_pearson=ise_pearson,
        sweep={c: [tallies[e].jaccard(c) for e in sweep_epsilons] for c in categories},
        sweep_chance=[_mean([chance(e, c) for c in categories]) for e in sweep_epsilons],
        isn_counts={
            side: {c: (focus.count(c, index), focus.unique_count(c, index)) for c in categories}
            for index, side in enumerate(SIDES)
        },
        general={side: focus.general_count(index) for index, side in enumerate(SIDES)},
        layer_profile=layer_profile,
        drift=drift,
    )
    if base.per_instruction and tuned.per_instruction:
        matrices = {
            side: analysis.overlap_matrix(snapshot, overlap_epsilon, selection_mode)
            for side, snapshot in zip(SIDES, (base, tuned), strict=True)
        }
        comparison.overlap = {side: Overlap(m.tolist()) for side, m in matrices.items()}
        if token_similarity is not None:
            tokens = category_block_means(token_similarity, base.instruction_categories, categories)
            comparison.token_overlap = tokens.tolist()
            comparison.token_control = {
                side: TokenControl(analysis.matrix_correlation(m, tokens)) for side, m in matrices.items()
            }
    else:
        comparison.notes["overlap"] = (
            "no per-instruction counts (recorded with sparcom.probe.per_instruction=false): "
            "overlap matrices, the token control and every interval and test need them"
        )
    return comparison


def _profile(counts: list[int]) -> Profile:
    early, middle, late = (_mean(part) for part in _thirds(counts))
    margin = min(early, late) - middle
    return Profile(counts=counts, three_phase=margin > 0, margin=margin)


def _thirds(values: list) -> list[list]:
    """Early, middle and late thirds; a remainder goes to the outer thirds (4 layers -> 2/1/1,
    5 -> 2/1/2), so the middle third is never the largest."""
    size = len(values)
    middle = size // 3
    early = (size - middle + 1) // 2
    return [values[:early], values[early : early + middle], values[early + middle :]]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
