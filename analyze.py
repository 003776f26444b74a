"""Turn snapshots into the paper's tables and figures, statistics, a causal check, and HTML reports.

python analyze.py run=outputs/<run>                       # a train.py run: base = step 0, tuned = last
python analyze.py base=tiny-olmoe tuned=path/to/finetuned # record both (or give .safetensors snapshots)
python analyze.py mode=ablate run=outputs/<run>           # zero each category's ISNs, measure losses
python analyze.py mode=explain run=outputs/<run>          # each category's most specific neurons, top contexts
python analyze.py mode=explain base=tiny-olmoe 'explain.neuron="model.layers.3.mlp.experts:2,17"'  # one card
python analyze.py experiment=paper                        # the paper's real-model comparisons (GPU)

Each mode writes its own folder (compare/, ablate/, explain/, ...) under the analysis folder, and an
index.html there links every report. In Python: ``analyze(cfg, out)`` with ``cfg`` a
``sparcom.config.AnalyzeConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sparcom import cli
from sparcom.config import AnalyzeConfig, PairConfig, model_preset
from sparcom.config.checks import check, check_data, check_models_loadable, to_object


@dataclass
class Inputs:
    """What one comparison (or ablation) works on, however the user named it."""

    name: str  # subfolder for one of several pairs, "" otherwise
    labels: tuple[str, str]
    base: object  # a Snapshot, or a model spec to record
    tuned: object
    model: dict | None  # the model to ablate: the tuned side's (None: only snapshots were given)
    run: object = None  # the RunFolder, for a run


def inputs_of(cfg: AnalyzeConfig) -> list[Inputs]:
    """The comparisons to make: a run's first and last snapshots, or each pair of specs."""
    from sparcom.report.workflows import read_run
    from sparcom.snapshot import Snapshot

    if cfg.run:
        run = read_run(cfg.run)
        base, tuned = (Snapshot.load(run.series[step]) for step in (min(run.series), max(run.series)))
        return [Inputs("", (run.name, run.name), base, tuned, run.final_model, run)]

    def side(spec: str):
        return Snapshot.load(spec) if spec.endswith(".safetensors") else model_preset(spec)

    found = []
    for pair in cfg.pairs or [PairConfig(name="", base=cfg.base, tuned=cfg.tuned)]:
        base = side(pair.base)
        tuned = side(pair.tuned) if pair.tuned else base  # ablation needs one model only
        model = tuned if isinstance(tuned, dict) else None
        found.append(Inputs(pair.name, (pair.base, pair.tuned or pair.base), base, tuned, model))
    return found


def analyze(cfg: AnalyzeConfig, out: Path) -> list[Path]:
    """Write the reports of ``cfg.mode`` under ``out`` (one subfolder per mode, an index page
    linking them); returns the report pages written."""
    check(cfg)  # what to_object checked, for a config built in Python
    records = check_data(cfg)
    check_models_loadable(cfg)
    from sparcom.report.pages import write_index

    if cfg.sweep:
        reports = [sweep(cfg, out / "sweep")]
    elif cfg.mode == "explain":
        explained = explain(cfg, out / "explain", records)
        if isinstance(explained, str):  # one neuron's card, for the terminal
            print(explained)
            return []
        reports = [explained]
    else:
        work = {"compare": compare, "ablate": ablate, "steer": steer}[str(cfg.mode)]
        reports = [work(cfg, out / item.name / str(cfg.mode), item, records) for item in inputs_of(cfg)]
    write_index(out)
    return reports


def sweep(cfg: AnalyzeConfig, out: Path) -> Path:
    """A sweep's jobs side by side: table and figures against the swept settings."""
    from sparcom.data import CATEGORIES
    from sparcom.report.sweep import sweep_folders, sweep_jobs, write_sweep
    from sparcom.stats.comparison import Statistics

    jobs = sweep_jobs(
        sweep_folders(cfg.sweep), cfg.sparcom.epsilons, cfg.sparcom.selection_mode, Statistics.of(cfg.stats)
    )
    categories = [c for c in CATEGORIES if c in jobs[0].isn_jaccard[cfg.sparcom.epsilons[0]]]
    return write_sweep(out, jobs, categories)


def loading(cfg: AnalyzeConfig):
    """How models are loaded here: the dtype and accelerate's dispatch settings."""
    from sparcom.report.workflows import Loading

    return Loading(cfg.dtype, cfg.device_map, cfg.max_memory, cfg.offload_folder)


def recorded(cfg: AnalyzeConfig, side, records):
    """A snapshot as given, or recorded now from a model spec on the configured probe set."""
    from sparcom.report.workflows import record_model
    from sparcom.snapshot import Snapshot

    if isinstance(side, Snapshot):
        return side
    from sparcom.recording.probe import Recording

    return record_model(side, records, cfg.sparcom.probe, Recording.of(cfg.sparcom), loading(cfg))


def compare(cfg: AnalyzeConfig, out: Path, item: Inputs, records) -> Path:
    from sparcom.report.workflows import write_comparison
    from sparcom.stats.comparison import Selection, Statistics

    base, tuned = recorded(cfg, item.base, records), recorded(cfg, item.tuned, records)
    s = cfg.sparcom
    return write_comparison(
        out,
        base,
        tuned,
        records=records,
        selection=Selection(
            tuple(s.epsilons), s.selection_mode, s.overlap_epsilon, tuple(cfg.sweep_epsilons)
        ),
        statistics=Statistics.of(cfg.stats),
        labels=item.labels,
        source=item.run or item.model or (item.base if isinstance(item.base, dict) else None),
    )


def edits(cfg: AnalyzeConfig, settings):
    """The ablation's or steering's settings (``cfg.ablate`` or ``cfg.steer``) as ``Edits``."""
    from sparcom.edit.effects import Edits

    return Edits(
        epsilon=settings.epsilon,
        selection_mode=cfg.sparcom.selection_mode,
        per_category=settings.per_category,
        seed=settings.seed,
        batch_size=settings.batch_size,
        control_draws=cfg.stats.control_draws,
        isn_set=cfg.sparcom.isn_set,
        alpha=cfg.stats.alpha,
    )


def ablate(cfg: AnalyzeConfig, out: Path, item: Inputs, records) -> Path:
    from sparcom.report.workflows import write_ablation

    snapshot = recorded(cfg, item.tuned, records)
    return write_ablation(out, item.model, snapshot, records, edits(cfg, cfg.ablate), loading(cfg))


def steer(cfg: AnalyzeConfig, out: Path, item: Inputs, records) -> Path:
    from sparcom.report.workflows import write_steering

    snapshot = recorded(cfg, item.tuned, records)
    e = edits(cfg, cfg.steer)
    return write_steering(out, item.model, snapshot, records, e, cfg.steer.scales, loading(cfg))


def explain(cfg: AnalyzeConfig, out: Path, records) -> Path | str:
    """A run's final model with its snapshot, or the ``base`` model recorded now; one neuron's card as text."""
    from sparcom.report.workflows import explained_snapshot, read_run, write_explanation

    if cfg.run:
        run = read_run(cfg.run)
        spec, snapshot = run.final_model, explained_snapshot(run)
    else:
        spec, snapshot = model_preset(cfg.base), None
    from sparcom.recording.probe import Recording

    return write_explanation(
        out,
        spec,
        snapshot,
        records,
        settings=cfg.explain,
        probe=cfg.sparcom.probe,
        how=Recording.of(cfg.sparcom),
        loading=loading(cfg),
    )


@hydra.main(config_path="conf", config_name="analyze", version_base="1.3")
@cli.exits_on_bad_input
def main(cfg: DictConfig) -> None:
    out = cli.run_dir()
    reports = analyze(to_object(cfg), out)
    for report in reports:
        print(f"report: {report}")
    if reports:
        print(f"index: {out / 'index.html'}")


if __name__ == "__main__":
    cli.prepare("analyze")  # the config is checked before Hydra creates the output folder
    main()
