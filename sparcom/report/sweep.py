"""One view across a sweep: the jobs of a multirun folder (or any run folders) side by side, by the
settings they vary. For each job: its objective, the final ISN drift per category against its own
step 0 at every epsilon (from the stored counts, with bootstrap intervals), and the change of its
held-out loss per category; as a table (CSV and Markdown) and as figures against the swept setting.
No forward pass: everything comes from the jobs' snapshots and drift records."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import yaml

from sparcom.errors import ConfigError
from sparcom.stats.metrics import defined_mean
from sparcom.stats.results import Estimate
from sparcom.train.run_folder import CONFIG, flat


@dataclass(frozen=True)
class SweepJob:
    """One job of a sweep.

    Attributes:
        folder: its run folder.
        swept: the settings that vary across the sweep, as this job set them.
        objective: ``(name, value)``: what the job returned to the sweeper.
        steps: its first and last snapshot's steps.
        isn_jaccard: epsilon -> category (and "mean") -> its Estimate (with a 95% interval
            when statistics are on), last snapshot vs first.
        loss_start, loss_end: category -> held-out loss at the first and last snapshot (empty without).
    """

    folder: Path
    swept: dict[str, object]
    objective: tuple[str, float | None]
    steps: tuple[int, int]
    isn_jaccard: dict[float, dict[str, Estimate]]
    loss_start: dict[str, float]
    loss_end: dict[str, float]

    def loss_change(self, category: str) -> float | None:
        if category not in self.loss_end:
            return None
        return self.loss_end[category] - self.loss_start[category]


def sweep_folders(paths: list[str | Path]) -> list[Path]:
    """The finished jobs among ``paths`` (a multirun folder, whose numbered job folders are taken,
    or run folders): those with a drift record. Refuses, on one line, a sweep with no finished job
    or whose jobs fine-tuned different models (their drifts do not compare)."""
    jobs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ConfigError(
                f"sweep: {str(path)!r} is not a folder; expected a multirun folder or run folders"
            )
        children = sorted((p for p in path.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        jobs += children if children and not (path / CONFIG).is_file() else [path]
    finished = [
        job for job in jobs if (job / "snapshots" / "drift.jsonl").is_file() and (job / CONFIG).is_file()
    ]
    if not finished:
        raise ConfigError(
            f"sweep: {', '.join(map(str, paths))} holds no finished train.py job (no snapshots/drift.jsonl); "
            "expected a multirun folder or run folders of train.py"
        )
    models = {str(_config(job).get("model.name_or_path")) for job in finished}
    if len(models) > 1:
        raise ConfigError(
            f"sweep: the jobs fine-tuned different models ({', '.join(sorted(models))}); expected one model, "
            "whose drift the jobs compare"
        )
    return finished


def _config(folder: Path) -> dict:
    return flat(yaml.safe_load((folder / CONFIG).read_text()) or {})


def swept_settings(folders: list[Path]) -> dict[Path, dict[str, object]]:
    """Per job, the settings whose values differ across the jobs (the resume flag and run names aside)."""
    configs = {folder: _config(folder) for folder in folders}
    keys = sorted({k for c in configs.values() for k in c})
    varied = [
        k
        for k in keys
        if len({repr(c.get(k)) for c in configs.values()}) > 1 and not k.startswith(("logger.", "resume"))
    ]
    return {folder: {k: configs[folder].get(k) for k in varied} for folder in folders}


def sweep_jobs(folders: list[Path], epsilons: list[float], mode: str, statistics) -> list[SweepJob]:
    """Each job's numbers (``statistics``: a ``sparcom.stats.comparison.Statistics`` for intervals, or None)."""
    from tqdm.auto import tqdm

    from sparcom.snapshot import Snapshot, snapshot_series
    from sparcom.stats.analysis import isn_alteration
    from sparcom.stats.resampling import paired_bootstrap
    from sparcom.train.drift import read_drift

    settings = swept_settings(folders)
    jobs = []
    for folder in tqdm(folders, desc="sweep jobs", unit="job"):
        series = snapshot_series(folder / "snapshots")
        first, last = min(series), max(series)
        base, tuned = Snapshot.load(series[first]), Snapshot.load(series[last])
        boot = None
        if statistics is not None and base.per_instruction:
            boot = paired_bootstrap(base, tuned, epsilons, mode, statistics.resamples, statistics.seed)
        jaccard = {}
        for epsilon in epsilons:
            values = isn_alteration(base, tuned, epsilon, mode)
            values["mean"] = defined_mean(values.values())
            jaccard[epsilon] = {
                c: Estimate(v, ci95=boot.isn_jaccard[c][epsilon].ci95 if boot else None)
                for c, v in values.items()
            }
        points = read_drift(folder / "snapshots" / "drift.jsonl")
        name = str(_config(folder).get("objective") or "eval/loss/mean")
        value = points[-1].wandb_metrics().get(name) if points else None
        jobs.append(
            SweepJob(
                folder,
                settings[folder],
                (name, value),
                (first, last),
                jaccard,
                points[0].held_out_loss if points else {},
                points[-1].held_out_loss if points else {},
            )
        )
    return jobs


def write_sweep(out: Path, jobs: list[SweepJob], categories: list[str]) -> Path:
    """``sweep.csv``/``sweep.md``, the figures and ``report.html`` of a sweep in ``out``."""
    from sparcom.report import figures
    from sparcom.report.pages import PAGE, Table, _figure, write_page

    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    keys = list(jobs[0].swept)
    epsilons = list(jobs[0].isn_jaccard)
    header = ["job", *keys, jobs[0].objective[0]]
    header += [f"isn_jaccard_eps{e:g}_{c}" for e in epsilons for c in [*categories, "mean"]]
    header += [f"isn_jaccard_eps{e:g}_{c}_ci95" for e in epsilons for c in categories]
    header += [f"held_out_loss_change_{c}" for c in categories]
    rows = []
    for job in jobs:
        row = [job.folder.name, *[job.swept[k] for k in keys], job.objective[1]]
        row += [job.isn_jaccard[e][c].value for e in epsilons for c in [*categories, "mean"]]
        row += [job.isn_jaccard[e][c].ci95 for e in epsilons for c in categories]
        row += [job.loss_change(c) for c in categories]
        rows.append(row)
    table = Table("sweep", header, rows)
    table.write(out)

    axis, labels = _axis(jobs, keys)
    order = sorted(range(len(jobs)), key=lambda i: axis[i])
    x = [axis[i] for i in order]
    log = len(keys) == 1 and all(v > 0 for v in x) and max(x) / min(x) >= 10
    panels = {
        f"ISN Jaccard, last vs step 0, eps={e:g}": {
            c: [jobs[i].isn_jaccard[e][c].value for i in order] for c in categories
        }
        for e in epsilons
    }
    drift = figures.lines(
        x,
        panels,
        out / "figures" / "drift.png",
        (labels, "ISN Jaccard vs the job's step 0"),
        x_scale="log" if log else "linear",
        ylim=(0, 1.02),
    )
    sections = [
        (
            "Final drift against the swept setting",
            [
                _figure(
                    drift,
                    "Each job's ISN sets at its last snapshot against its own step 0, per category, one panel per "
                    "epsilon (every epsilon from the stored counts; no forward pass). 1 = unchanged.",
                )
            ],
        )
    ]
    if all(job.loss_end for job in jobs):
        changes = {c: [jobs[i].loss_change(c) for i in order] for c in categories}
        loss = figures.lines(
            x,
            {"held-out loss change": changes},
            out / "figures" / "held_out_loss.png",
            (labels, "last - step 0 (nats/token)"),
            x_scale="log" if log else "linear",
        )
        sections.append(
            (
                "Held-out loss against the swept setting",
                [_figure(loss, "Change of each category's response loss on instructions never trained on.")],
            )
        )
    shown = Table(
        "",
        ["job", *keys, jobs[0].objective[0], *[f"mean Jaccard eps={e:g}" for e in epsilons]],
        [
            [
                job.folder.name,
                *[job.swept[k] for k in keys],
                job.objective[1],
                *[job.isn_jaccard[e]["mean"].value for e in epsilons],
            ]
            for job in jobs
        ],
    )
    sections.append(
        ("Jobs", [shown.html(), '<p class="note">Every number, per category with intervals: sweep.csv.</p>'])
    )
    setting = f"<p>{len(jobs)} jobs of {html.escape(str(jobs[0].folder.parent))}, varying {html.escape(', '.join(keys) or 'nothing')}.</p>"
    return write_page(
        out / PAGE,
        "SPARCOM sweep",
        sections,
        header=setting,
        description=f"sweep: {len(jobs)} jobs varying {', '.join(keys) or 'nothing'}",
    )


def _axis(jobs: list[SweepJob], keys: list[str]) -> tuple[list[float], str]:
    """The x axis: the one numeric swept setting's values, else the jobs in order."""
    if len(keys) == 1 and all(isinstance(job.swept[keys[0]], int | float) for job in jobs):
        return [float(job.swept[keys[0]]) for job in jobs], keys[0]
    return [float(i) for i in range(len(jobs))], "job (" + ", ".join(keys) + ")" if keys else "job"
