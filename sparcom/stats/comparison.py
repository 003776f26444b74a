"""A base-vs-tuned comparison as one typed result, and the one function that builds it.

``Comparison`` is the data model of analyze.py's report: tables, ``summary.json``, the HTML page
and its figures are renderings of it (``sparcom.report.pages``), and nothing is parsed back from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from sparcom.snapshot import Snapshot, check_comparable, instruction_order
from sparcom.stats import analysis
from sparcom.stats.estimates import phase_test
from sparcom.stats.metrics import category_block_means, defined_mean
from sparcom.stats.permutation import diagonal_dominance, token_control
from sparcom.stats.resampling import half_sample_alteration, paired_bootstrap, sampling_stability
from sparcom.stats.results import Estimate, Profile, Test, TokenControl
from sparcom.train.drift import DriftPoint

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
class Overlap:
    """The 6x6 mean pairwise Jaccard of per-instruction ISN sets, and whether its diagonal stands out."""

    matrix: list[list[float]]
    diagonal_dominance: Test | None = None
    per_category: dict[str, Test] | None = None


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
    unique_isn_jaccard: dict[str, Estimate] = field(default_factory=dict)

    @property
    def headline_epsilon(self) -> float:
        """The epsilon the findings speak of: ``overlap_epsilon`` where the alteration table has it,
        else the table's middle column."""
        epsilons = self.settings.epsilons
        return (
            self.settings.overlap_epsilon
            if self.settings.overlap_epsilon in epsilons
            else epsilons[len(epsilons) // 2]
        )

    def summary(self) -> dict:
        """The JSON document written as summary.json (schema in the README)."""

        def estimate(e: Estimate, keys: Sequence[str]) -> dict:
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(e).items() if k in keys}

        jaccard_keys = ("value", "ci95", "chance", "stability_base", "stability_tuned", "value_half")
        return _defined_or_null(
            {
                "base": asdict(self.base),
                "tuned": asdict(self.tuned),
                "settings": asdict(self.settings),
                "isn_jaccard": {
                    c: {f"eps={e:g}": estimate(v, jaccard_keys) for e, v in by_eps.items()}
                    for c, by_eps in self.isn_jaccard.items()
                },
                "unique_isn_jaccard": {
                    c: estimate(v, ("value", "chance")) for c, v in self.unique_isn_jaccard.items()
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
                        c: {**asdict(p), "ci95": list(p.ci95) if p.ci95 else None}
                        for c, p in profiles.items()
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
        )


def _defined_or_null(value):
    """Undefined numbers (nan) as JSON null: ``json`` would write ``NaN``, which is not JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _defined_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_defined_or_null(v) for v in value]
    return value


def _test(test: Test | None, holm: bool = True) -> dict | None:
    if test is None:
        return None
    out = {"statistic": test.statistic, "p_value": test.p_value, "significant": test.significant}
    return out | {"p_holm": test.p_holm} if holm else out


def describe(snapshot: Snapshot, label: str) -> Side:
    return Side(label=label, model=str(snapshot.meta.get("model", "")), step=snapshot.meta.get("step"))


@dataclass(frozen=True)
class Selection:
    """How ISNs are selected for a comparison: ``epsilons`` (the alteration table's columns),
    ``mode``, ``overlap_epsilon`` (overlap matrices, layer profiles, general and unique counts) and
    ``sweep_epsilons`` (the Jaccard-vs-epsilon curves, from the stored counts)."""

    epsilons: tuple[float, ...] = (0.3, 0.5, 0.7)
    mode: str = "threshold"
    overlap_epsilon: float = 0.5
    sweep_epsilons: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Statistics:
    """How the intervals and tests are computed (``None`` in ``compare``: not at all)."""

    resamples: int = 200  # paired bootstrap resamples of each category's instructions
    permutations: int = 1000  # label permutations of each permutation test
    splits: int = 20  # random half-splits averaged by the sampling stability
    seed: int = 0
    alpha: float = 0.05  # significance level of every test

    @classmethod
    def of(cls, stats) -> Statistics | None:
        """From the config's ``stats`` section (``StatsConfig``); None when statistics are off."""
        if not stats.enabled:
            return None
        return cls(stats.resamples, stats.permutations, stats.splits, stats.seed, stats.alpha)


def compare(
    base: Snapshot,
    tuned: Snapshot,
    *,
    labels: tuple[str, str] = ("base", "tuned"),
    selection: Selection | None = None,
    statistics: Statistics | None = Statistics(),
    token_similarity: torch.Tensor | None = None,
    drift: list[DriftPoint] | None = None,
    run: dict | None = None,
) -> Comparison:
    """Compare two snapshots of the same probe set: every table, matrix, profile and test of the report
    (ISNs selected as ``selection`` says; default ``Selection()``).

    ``token_similarity``: ``[N, N]`` Jaccard of the instructions' token sets (base order), for
    the vocabulary-overlap control; ``drift``: the run's recorded drift, if any. Intervals and
    tests need per-instruction counts; without them (or with ``statistics=None``) those fields
    are empty and ``notes`` says why.
    """
    check_comparable(base, tuned)
    chosen = selection or Selection()
    epsilons, selection_mode = list(chosen.epsilons), chosen.mode
    overlap_epsilon, sweep_epsilons = chosen.overlap_epsilon, list(chosen.sweep_epsilons)
    categories = list(base.categories)
    tallies = analysis.category_tallies(
        [base, tuned], [*epsilons, *sweep_epsilons, overlap_epsilon], selection_mode
    )
    every = [*categories, "mean"]
    notes: dict[str, str] = {}
    if statistics is not None and not (base.per_instruction and tuned.per_instruction):
        notes["statistics"] = (
            "no intervals, stability or tests: they resample instructions, and these snapshots have no "
            "per-instruction counts (recorded with sparcom.probe.per_instruction=false)"
        )
        statistics = None
    elif statistics is None:
        notes["statistics"] = (
            "no intervals, stability or tests: statistics were turned off (stats.enabled=false)"
        )
    boot = stability = None
    if statistics is not None:
        wanted = list(dict.fromkeys([*epsilons, overlap_epsilon]))
        boot = paired_bootstrap(base, tuned, wanted, selection_mode, statistics.resamples, statistics.seed)
        if min(base.meta.get("category_instructions", {}).values(), default=0) >= 2:
            stability = {
                side: sampling_stability(
                    snapshot, epsilons, selection_mode, statistics.splits, statistics.seed
                )
                for side, snapshot in zip(SIDES, (base, tuned), strict=True)
            }
            stability["half"] = half_sample_alteration(
                base, tuned, epsilons, selection_mode, statistics.splits, statistics.seed
            )
        else:
            notes["stability"] = "no split-half stability: a category has fewer than 2 instructions"

    def chance(epsilon: float, category: str) -> float:
        return tallies[epsilon].chance(category)

    isn_jaccard: dict[str, dict[float, Estimate]] = {c: {} for c in every}
    for epsilon in epsilons:
        values = {c: tallies[epsilon].jaccard(c) for c in categories}
        chances = {c: chance(epsilon, c) for c in categories}
        values["mean"], chances["mean"] = (
            defined_mean(list(values.values())),
            defined_mean(list(chances.values())),
        )
        for c in every:
            isn_jaccard[c][epsilon] = Estimate(
                values[c],
                ci95=boot.isn_jaccard[c][epsilon].ci95 if boot else None,
                chance=chances[c],
                stability_base=_stability(stability, "base", c, epsilon),
                stability_tuned=_stability(stability, "tuned", c, epsilon),
                value_half=_stability(stability, "half", c, epsilon),
            )
    pearson = analysis.ise_alteration(base, tuned)
    ise_pearson = None
    if pearson:
        pearson["mean"] = defined_mean(list(pearson.values()))
        ise_pearson = {
            c: Estimate(v, ci95=boot.ise_pearson[c].ci95 if boot else None) for c, v in pearson.items()
        }
    sweep = {c: [tallies[e].jaccard(c) for e in sweep_epsilons] for c in categories}
    empty = {
        c: [e for e, v in zip(sweep_epsilons, values, strict=True) if v != v] for c, values in sweep.items()
    }
    if any(empty.values()):
        notes["epsilon_sweep"] = (
            "null where neither model has an ISN (a Jaccard of two empty sets is undefined): "
            + "; ".join(f"{c} at eps {', '.join(f'{e:g}' for e in eps)}" for c, eps in empty.items() if eps)
        )
    focus = tallies[overlap_epsilon]
    unique_isn_jaccard = {
        c: Estimate(
            focus.jaccard(c, unique=True),
            chance=focus.chance(c, unique=True),
        )
        for c in categories
    }
    layer_profile = {}
    for index, side in enumerate(SIDES):
        tests = boot.layer_phases.get(side, {}) if boot else {}
        layer_profile[side] = {
            c: _profile(focus.layer_profile(c, index), tests.get(c, {}).get(overlap_epsilon))
            for c in categories
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
            statistics=asdict(statistics) if statistics else None,
        ),
        isn_jaccard=isn_jaccard,
        ise_pearson=ise_pearson,
        sweep=sweep,
        sweep_chance=[defined_mean([chance(e, c) for c in categories]) for e in sweep_epsilons],
        isn_counts={
            side: {c: (focus.count(c, index), focus.unique_count(c, index)) for c in categories}
            for index, side in enumerate(SIDES)
        },
        general={side: focus.general_count(index) for index, side in enumerate(SIDES)},
        layer_profile=layer_profile,
        drift=drift,
        notes=notes,
        unique_isn_jaccard=unique_isn_jaccard,
    )
    if base.per_instruction and tuned.per_instruction:
        _overlap(comparison, base, tuned, overlap_epsilon, selection_mode, statistics, token_similarity)
    else:
        comparison.notes["overlap"] = (
            "no per-instruction counts (recorded with sparcom.probe.per_instruction=false): "
            "overlap matrices and the vocabulary control need them"
        )
    return comparison


def _overlap(
    comparison: Comparison,
    base: Snapshot,
    tuned: Snapshot,
    epsilon: float,
    mode: str,
    statistics: Statistics | None,
    token_similarity: torch.Tensor | None,
) -> None:
    """Overlap matrices, their uniqueness tests and the vocabulary control, from the ``[N, N]``
    pairwise similarity of instructions (computed once per side, in base's instruction order)."""
    categories, labels = comparison.categories, base.instruction_categories
    order = instruction_order(base, tuned)
    similarity = {
        side: analysis.instruction_similarity(s, epsilon, mode)
        for side, s in zip(SIDES, (base, tuned), strict=True)
    }
    if order is not None:
        similarity["tuned"] = similarity["tuned"][order][:, order]
    comparison.overlap = {}
    for side, matrix in similarity.items():
        blocks = category_block_means(matrix, labels, categories)
        tests = None
        if statistics is not None:
            tests = diagonal_dominance(
                matrix, labels, categories, statistics.permutations, statistics.seed, statistics.alpha
            )
        comparison.overlap[side] = Overlap(
            blocks.tolist(),
            diagonal_dominance=tests.overall if tests else None,
            per_category=tests.per_category if tests else None,
        )
    if token_similarity is None:
        comparison.notes.setdefault(
            "token_control", "no tokenizer or records for the instructions' token sets"
        )
        return
    tokens = category_block_means(token_similarity, labels, categories)
    comparison.token_overlap = tokens.tolist()
    comparison.token_control = {}
    for side, matrix in similarity.items():
        correlation = analysis.matrix_correlation(torch.tensor(comparison.overlap[side].matrix), tokens)
        control = TokenControl()
        if statistics is not None:
            control = token_control(
                matrix, token_similarity, labels, statistics.permutations, statistics.seed, statistics.alpha
            )
        comparison.token_control[side] = replace(control, correlation=correlation)


def _stability(stability: dict | None, side: str, category: str, epsilon: float) -> float | None:
    if stability is None:
        return None
    by_category = stability[side]
    if category == "mean":
        return defined_mean([by_category[c][epsilon] for c in by_category])
    return by_category[category][epsilon]


def _profile(counts: list[int], test: Profile | None) -> Profile:
    """A layer profile with its three-phase test (without resamples: the margin alone decides)."""
    if len(counts) < 3:
        return Profile(counts, False, float("nan"))
    if test is None:
        return phase_test(torch.tensor([counts]))
    return replace(test, counts=counts)
