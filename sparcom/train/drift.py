"""Drift of ISNs/ISEs during training: one typed point per snapshot, its one record on disk
(``drift.jsonl``) and its renderings (W&B keys, table rows). Nothing parses the keys back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sparcom.snapshot import Snapshot
from sparcom.stats.analysis import category_tallies, ise_alteration
from sparcom.stats.metrics import defined_mean

REFERENCES = ("base", "prev")  # against the vanilla model, against the previous snapshot


@dataclass(frozen=True)
class DriftPoint:
    """ISN/ISE drift of the snapshot at ``step`` against the base snapshot and the previous one.

    Attributes:
        isn_jaccard: reference ("base" | "prev") -> epsilon -> category -> Jaccard of ISN sets.
        isn_chance: epsilon -> category -> the Jaccard two random sets of the same per-site sizes
            would have (against the base).
        ise_pearson: reference -> category -> Pearson r of expert frequencies (MoE models).
        isn_stability: epsilon -> category -> split-half stability (the base snapshot only).
        held_out_loss: category -> response loss (nats/token) on the held-out instructions, never
            trained on, of the model at this step; empty where none was measured.
        headline_epsilon: the epsilon whose numbers are also logged under epsilon-free keys, so that
            runs that differ in ``sparcom.epsilons`` share one column (``sparcom.overlap_epsilon``).
    """

    step: int
    isn_jaccard: dict[str, dict[float, dict[str, float]]]
    isn_chance: dict[float, dict[str, float]]
    ise_pearson: dict[str, dict[str, float]] = field(default_factory=dict)
    isn_stability: dict[float, dict[str, float]] = field(default_factory=dict)
    held_out_loss: dict[str, float] = field(default_factory=dict)
    headline_epsilon: float | None = None

    def wandb_metrics(self) -> dict[str, float]:
        """``sparcom/isn_jaccard/{ref}/eps={E}/{category}`` (and ``/mean``), the chance level
        ``sparcom/isn_jaccard_chance/base/eps={E}/{category}``, ``sparcom/ise_pearson/{ref}/{category}``,
        at step 0 ``sparcom/isn_stability/eps={E}/{category}``, the headline epsilon's numbers again
        without ``/eps={E}``, and the held-out loss ``eval/loss/{category}`` (and ``/mean``, over
        categories)."""
        metrics: dict[str, float] = {}
        headline = self.headline_epsilon
        for reference, by_epsilon in self.isn_jaccard.items():
            for epsilon, values in by_epsilon.items():
                metrics |= _with_mean(f"sparcom/isn_jaccard/{reference}/eps={epsilon:g}", values)
                if epsilon == headline:
                    metrics |= _with_mean(f"sparcom/isn_jaccard/{reference}", values)
        for epsilon, values in self.isn_chance.items():
            metrics |= _with_mean(f"sparcom/isn_jaccard_chance/base/eps={epsilon:g}", values)
            if epsilon == headline:
                metrics |= _with_mean("sparcom/isn_jaccard_chance/base", values)
        for reference, values in self.ise_pearson.items():
            metrics |= _with_mean(f"sparcom/ise_pearson/{reference}", values)
        for epsilon, values in self.isn_stability.items():
            metrics |= _with_mean(f"sparcom/isn_stability/eps={epsilon:g}", values)
            if epsilon == headline:
                metrics |= _with_mean("sparcom/isn_stability", values)
        if self.held_out_loss:
            metrics |= _with_mean("eval/loss", self.held_out_loss)
        return metrics

    def table_rows(self) -> list[list]:
        """Rows ``[step, category, epsilon, isn_jaccard_base, isn_jaccard_prev, chance, ise_pearson_base,
        held_out_loss]``."""
        rows = []
        for epsilon, values in self.isn_jaccard["base"].items():
            for category, value in values.items():
                previous = self.isn_jaccard.get("prev", {}).get(epsilon, {}).get(category)
                pearson = self.ise_pearson.get("base", {}).get(category)
                rows.append(
                    [
                        self.step,
                        category,
                        epsilon,
                        value,
                        previous,
                        self.isn_chance[epsilon][category],
                        pearson,
                        self.held_out_loss.get(category),
                    ]
                )
        return rows

    def to_json(self) -> dict:
        def keyed(by_epsilon: dict[float, dict]) -> dict[str, dict]:
            return {f"{e:g}": v for e, v in by_epsilon.items()}

        return {
            "step": self.step,
            "isn_jaccard": {ref: keyed(v) for ref, v in self.isn_jaccard.items()},
            "isn_chance": keyed(self.isn_chance),
            "ise_pearson": self.ise_pearson,
            "isn_stability": keyed(self.isn_stability),
            "held_out_loss": self.held_out_loss,
            "headline_epsilon": self.headline_epsilon,
        }

    @classmethod
    def from_json(cls, row: dict) -> DriftPoint:
        def unkeyed(by_epsilon: dict[str, dict]) -> dict[float, dict]:
            return {float(e): v for e, v in by_epsilon.items()}

        return cls(
            step=int(row["step"]),
            isn_jaccard={ref: unkeyed(v) for ref, v in row["isn_jaccard"].items()},
            isn_chance=unkeyed(row["isn_chance"]),
            ise_pearson=row.get("ise_pearson", {}),
            isn_stability=unkeyed(row.get("isn_stability", {})),
            held_out_loss=row.get("held_out_loss") or {},
            headline_epsilon=row.get("headline_epsilon"),
        )


TABLE_COLUMNS = [
    "step",
    "category",
    "epsilon",
    "isn_jaccard_base",
    "isn_jaccard_prev",
    "chance",
    "ise_pearson_base",
    "held_out_loss",
]


def _with_mean(prefix: str, values: dict[str, float]) -> dict[str, float]:
    """Each category's value and their mean (over the defined ones: nan marks an undefined Jaccard)."""
    return {f"{prefix}/{c}": v for c, v in values.items()} | {f"{prefix}/mean": defined_mean(values.values())}


def drift_point(
    step: int,
    base: Snapshot,
    current: Snapshot,
    previous: Snapshot | None,
    *,
    epsilons: Sequence[float],
    mode: str = "threshold",
    headline_epsilon: float | None = None,
) -> DriftPoint:
    """Compare ``current`` with the base snapshot (and with the previous one, if any). What is
    measured beside the snapshots (the base's split-half stability, the held-out loss) is added
    with ``dataclasses.replace``."""
    references = {"base": base} | ({"prev": previous} if previous is not None else {})
    jaccard, pearson, chance = {}, {}, {}
    for name, reference in references.items():
        tallies = category_tallies([reference, current], epsilons, mode)
        jaccard[name] = {e: {c: t.jaccard(c) for c in current.categories} for e, t in tallies.items()}
        if name == "base":
            chance = {e: {c: t.chance(c) for c in current.categories} for e, t in tallies.items()}
        correlations = ise_alteration(reference, current)
        if correlations:
            pearson[name] = correlations
    return DriftPoint(step, jaccard, chance, pearson, headline_epsilon=headline_epsilon)


# ------------------------------------------------------------------------------ a run's result


@dataclass(frozen=True)
class RunResult:
    """What a training run ends with, for a sweeper to rank it by: its folder, its last snapshot's
    drift and held-out loss (``final``), and its first snapshot's (``start``).

    ``objective(name)`` is any number the run logged at its last snapshot, by its W&B key:
    ``eval/loss/mean`` (the held-out response loss, mean over categories), ``eval/loss/math``,
    ``sparcom/isn_jaccard/base/mean`` (the headline epsilon's drift), ``.../eps=0.3/code``, ...
    """

    run_dir: Path
    final: DriftPoint
    start: DriftPoint | None = None

    @property
    def step(self) -> int:
        return self.final.step

    def numbers(self) -> dict[str, float]:
        """Every number of the last snapshot, by W&B key."""
        return self.final.wandb_metrics()

    def objective(self, name: str) -> float:
        numbers = self.numbers()
        if name not in numbers:
            known = sorted(k for k in numbers if "/eps=" not in k)
            raise KeyError(f"objective {name!r} is not among the run's numbers; expected one of {known}")
        return float(numbers[name])


def run_result(run_dir: str | Path) -> RunResult:
    """The result of the run in ``run_dir``, from its ``drift.jsonl``."""
    points = read_drift(Path(run_dir) / "snapshots" / "drift.jsonl")
    if not points:
        raise FileNotFoundError(f"{run_dir} has no drift.jsonl rows; is it a finished train.py run?")
    return RunResult(Path(run_dir), points[-1], points[0])


# How a run's W&B summary sums each key up: the best held-out loss, the drift where the run ended.
SUMMARIES = {"eval/loss/*": "min", "sparcom/*": "last"}


# ------------------------------------------------------------------------------ the record


def read_drift(path: str | Path) -> list[DriftPoint]:
    """The whole rows of a ``drift.jsonl`` (a torn last line from a killed run is skipped), by step."""
    path = Path(path)
    points = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                point = DriftPoint.from_json(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            points[point.step] = point
    return [points[step] for step in sorted(points)]


def write_drift(path: str | Path, points: Sequence[DriftPoint]) -> None:
    """Rewrite the record atomically (temporary file, then rename)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(p.to_json()) + "\n" for p in points), encoding="utf-8")
    temporary.replace(path)


def append_drift(path: str | Path, point: DriftPoint) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(point.to_json()) + "\n")
