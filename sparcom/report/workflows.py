"""What analyze.py does, as plain functions: read a run folder, get snapshots (from files, or by
recording models), compare them, and write the report. No Hydra here: every setting is an argument."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from sparcom.config import ExplainConfig, ProbeConfig
from sparcom.data import Record
from sparcom.edit.effects import Edits
from sparcom.recording.probe import Recording
from sparcom.report import pages as report
from sparcom.snapshot import Snapshot, SnapshotError, dataset_hash, snapshot_series
from sparcom.stats.analysis import token_similarity
from sparcom.stats.comparison import Selection, Statistics, compare
from sparcom.train.drift import read_drift

# Training settings worth a place in a report's header, by their trainer.args name (the length of
# the run is shown as what governed it: max_steps, or num_train_epochs when max_steps is -1).
RUN_SETTINGS = ("learning_rate", "per_device_train_batch_size", "lr_scheduler_type")


@dataclass(frozen=True)
class RunFolder:
    """A train.py run folder: its snapshot series, its model and last checkpoint, its settings."""

    path: Path
    series: dict[int, Path]
    model: dict  # name_or_path, dtype, chat_template_from of the model it started from
    final_model: dict  # the same for its last checkpoint (the model itself when there is none)
    settings: dict  # learning rate, steps, trainer kind, ...

    @property
    def name(self) -> str:
        return self.path.name

    def drift(self):
        return read_drift(self.path / "snapshots" / "drift.jsonl")


def read_run(path: str | Path) -> RunFolder:
    """Read a run folder written by train.py; a folder without snapshots is refused by name."""
    path = Path(path)
    series = snapshot_series(path / "snapshots")
    if not series:
        raise SnapshotError(f"no snapshots in {path / 'snapshots'}; is {path} a train.py run folder?")
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    model = config.get("model") or {"name_or_path": Snapshot.load(series[min(series)]).meta["model"]}
    checkpoints = sorted(path.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    final_model = {**model, "name_or_path": str(checkpoints[-1])} if checkpoints else model
    args = (config.get("trainer") or {}).get("args") or {}
    settings = {k: args[k] for k in RUN_SETTINGS if args.get(k) not in (None, -1)}
    length = _run_length(args, checkpoints[-1] if checkpoints else None)
    if length:
        settings["length"] = length
    kind = (config.get("trainer") or {}).get("kind") or (
        "lora" if (config.get("trainer") or {}).get("peft") else None
    )
    if kind:
        settings["trainer"] = kind
    isn = (config.get("trainer") or {}).get("isn")
    if isn:
        control = isn.get("control") == "random"
        settings["trainer"] = "isn" + (
            f" (control: random neurons matched to the ISNs, seed {isn.get('control_seed')})"
            if control
            else ""
        )
    return RunFolder(path, series, model, final_model, settings)


def _run_length(args: dict, checkpoint: Path | None) -> str | None:
    """What governed the run's length, and how far it got: "60 steps (max_steps; 0.13 epochs)"."""
    import json

    state = {}
    if checkpoint is not None and (checkpoint / "trainer_state.json").is_file():
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    epochs = f"{state['epoch']:.2g} epochs" if state.get("epoch") is not None else None
    if args.get("max_steps") not in (None, -1):
        return f"{args['max_steps']} steps (max_steps" + (f"; {epochs})" if epochs else ")")
    if args.get("num_train_epochs") is not None:
        reached = f"; {state['global_step']} steps" if state.get("global_step") is not None else ""
        return f"{args['num_train_epochs']:g} epochs (num_train_epochs{reached})"
    return None


@dataclass(frozen=True)
class Loading:
    """How analyze.py loads a model: ``dtype`` (None: the spec's, else bfloat16 on a GPU and float32
    on CPU) and accelerate's placement (``device_map``, ``max_memory``, ``offload_folder``, as
    ``sparcom.models.loading.load_model`` takes them) for a model bigger than one device."""

    dtype: str | None = None
    device_map: str | None = None
    max_memory: dict | None = None
    offload_folder: str | None = None


def load_for_analysis(spec: dict, loading: Loading | None = None):
    """``(model, tokenizer)`` of a model spec, as ``loading`` says (the command line's dtype wins over
    the spec's); without a ``device_map`` the model goes whole to the GPU when there is one."""
    import torch

    from sparcom.models.loading import load_model

    loading = loading or Loading()
    dtype = loading.dtype
    placement = {
        "device_map": loading.device_map,
        "max_memory": loading.max_memory,
        "offload_folder": loading.offload_folder,
    }
    placement = {key: value for key, value in placement.items() if value}  # {}: no max_memory
    if placement.get("max_memory"):  # Hydra gives strings; accelerate wants GPU indices and bytes as ints
        placement["max_memory"] = {
            int(key) if str(key).isdigit() else key: int(value) if str(value).isdigit() else value
            for key, value in placement["max_memory"].items()
        }
    dtype = dtype or spec.get("dtype") or ("bfloat16" if torch.cuda.is_available() else "float32")
    model, tokenizer = load_model(spec["name_or_path"], dtype, spec.get("chat_template_from"), **placement)
    if "device_map" not in placement and torch.cuda.is_available():
        model = model.cuda()
    return model, tokenizer


def tokenizer_for(spec: dict | None, snapshot: Snapshot):
    """The tokenizer a snapshot was recorded with: its model spec's, or its recorded model's."""
    from sparcom.models.loading import load_tokenizer

    if spec is None:
        return load_tokenizer(snapshot.meta["model"])
    return load_tokenizer(spec["name_or_path"], spec.get("chat_template_from"))


def record_model(
    spec: dict, records: list[Record], probe: ProbeConfig, how: Recording, loading: Loading | None = None
) -> Snapshot:
    """Record a model (a spec as ``load_for_analysis`` takes) on the seeded probe set
    (``probe.per_category`` instructions per category, drawn with ``probe.seed``)."""
    from sparcom.recording.probe import record
    from sparcom.train.sft import probe_set

    model, tokenizer = load_for_analysis(spec, loading)
    return record(model, tokenizer, probe_set(records, probe.per_category, probe.seed), how)


def write_comparison(
    out: Path,
    base: Snapshot,
    tuned: Snapshot,
    *,
    records: list[Record],
    selection: Selection,
    statistics: Statistics | None = None,
    labels: tuple[str, str] = ("base", "tuned"),
    source: RunFolder | dict | None = None,
) -> Path:
    """Compare two snapshots (with intervals and tests unless ``statistics`` is None) and write the
    report folder; returns the report page. ``source``: the training run the snapshots come from (its
    drift and settings join the report), or the model spec they were recorded from; either gives the
    tokenizer of the vocabulary control (without one, the snapshot's model's)."""
    run = source if isinstance(source, RunFolder) else None
    spec = run.model if run else source
    notes = {}
    try:
        tokenizer = tokenizer_for(spec, base)
    except (OSError, ValueError) as err:  # a hub tokenizer offline: the report says so
        tokenizer = None
        notes["token_control"] = (
            f"no tokenizer for {spec['name_or_path'] if spec else base.meta.get('model')} ({err})"
        )
    by_id = {r["id"]: r for r in records}
    tokens = None
    if tuned.per_instruction and tokenizer is not None and all(i in by_id for i in base.instruction_ids):
        tokens = token_similarity(base, by_id, tokenizer)
    comparison = compare(
        base,
        tuned,
        labels=labels,
        selection=selection,
        statistics=statistics,
        token_similarity=tokens,
        drift=run.drift() if run else None,
        run=run.settings if run else None,
    )
    comparison.notes.update(notes)
    return report.write_comparison(comparison, out)


def _edited(
    model_spec: dict, snapshot: Snapshot, records: list[Record], edits: Edits, loading: Loading | None
):
    """The model to edit and the held-out instructions it is evaluated on."""
    from sparcom.edit.steer import held_out

    model, tokenizer = load_for_analysis(model_spec, loading)
    return model, tokenizer, held_out(records, snapshot, edits.per_category, edits.seed)


def write_ablation(
    out: Path,
    model_spec: dict,
    snapshot: Snapshot,
    records: list[Record],
    edits: Edits,
    loading: Loading | None = None,
) -> Path:
    """Zero each category's ISNs (selected on ``snapshot``) and, as the null, as many random
    neurons from the same sites ``control_draws`` times; measure the response loss on held-out
    instructions of every category and write the report folder; returns its page."""
    from sparcom.edit.ablation import ablation_matrices

    model, tokenizer, evaluated = _edited(model_spec, snapshot, records, edits, loading)
    e = edits
    result = ablation_matrices(model, tokenizer, evaluated, snapshot, e)
    return report.write_ablation(
        result,
        snapshot.categories,
        out,
        model=model_spec["name_or_path"],
        epsilon=e.epsilon,
        held_out=_unseen(evaluated, snapshot),
        isn_set=e.isn_set,
        total_neurons=_neuron_count(snapshot),
    )


def _unseen(records: list[Record], snapshot: Snapshot) -> bool:
    """Whether none of ``records`` was in the probe set the snapshot selected ISNs on."""
    seen = set(snapshot.instruction_ids)
    return all(r["id"] not in seen for r in records)


def _neuron_count(snapshot: Snapshot) -> int:
    """FFN and routed-expert neurons of the model the snapshot counted."""
    import math

    from sparcom.stats.analysis import neuron_sites

    return sum(math.prod(snapshot.site_shape(site)) for site in neuron_sites(snapshot))


def write_steering(
    out: Path,
    model_spec: dict,
    snapshot: Snapshot,
    records: list[Record],
    edits: Edits,
    scales: list[float],
    loading: Loading | None = None,
) -> Path:
    """Scale each category's ISNs by each factor and measure the response-loss change on held-out
    instructions of every category, against random neurons of the same per-site counts."""
    from sparcom.edit.steer import dose_response, steering_dominance, write_dose_response

    model, tokenizer, evaluated = _edited(model_spec, snapshot, records, edits, loading)
    e = edits
    rows = dose_response(model, tokenizer, evaluated, snapshot, e, scales)
    written = write_dose_response(rows, out)
    return report.write_steering(
        rows,
        written["figures"],
        steering_dominance(rows, e.control_draws, e.alpha),
        out,
        model=model_spec["name_or_path"],
        epsilon=e.epsilon,
        held_out=_unseen(evaluated, snapshot),
        isn_set=e.isn_set,
    )


def explained_snapshot(run: RunFolder) -> Snapshot:
    """The snapshot of a run's final model: recorded at its last checkpoint's step (the callback
    records at every save), else its last snapshot."""
    step = _checkpoint_step(run.final_model["name_or_path"])
    return Snapshot.load(run.series.get(step, run.series[max(run.series)]))


def _checkpoint_step(path: str) -> int | None:
    name = Path(path).name
    return int(name.rsplit("-", 1)[1]) if name.startswith("checkpoint-") else None


def write_explanation(
    out: Path,
    model_spec: dict,
    snapshot: Snapshot | None,
    records: list[Record],
    *,
    settings: ExplainConfig,
    probe: ProbeConfig,
    how: Recording,
    loading: Loading | None = None,
) -> Path | str:
    """The neuron explorer: each category's ``settings.per_category`` most specific neurons in
    ``snapshot`` (None: recorded now on the seeded probe set, as ``probe`` and ``how`` say), their
    ``settings.top`` probe contexts, written as ``neurons.jsonl`` and ``report.html`` in ``out``;
    returns the page. With ``settings.neuron`` (``<site>:<i>`` or ``<site>:<expert>,<i>``), only that
    neuron's card, returned as text."""
    per_category, top, neuron = settings.per_category, settings.top, settings.neuron
    from sparcom.edit.explain import explain, most_specific, neuron_named, parse_neuron, write_neurons
    from sparcom.errors import ConfigError
    from sparcom.models.sites import find_sites
    from sparcom.recording.probe import record
    from sparcom.report.cards import card_text, write_explain_page

    def named(check) -> None:
        try:
            check()
        except ValueError as err:  # the user's name for a neuron: reported on one line, before the work
            raise ConfigError(f"explain.neuron: {err}") from err

    if neuron and snapshot is not None:
        named(lambda: neuron_named(snapshot, neuron))
    model, tokenizer = load_for_analysis(model_spec, loading)
    if neuron and snapshot is None:
        shapes = {site.name: site.shape for site, _ in find_sites(model) if site.kind != "router"}
        named(lambda: parse_neuron(neuron, shapes))
    batch_size = how.batch_size
    probe = _probe_of(snapshot, records, probe.per_category, probe.seed)
    if snapshot is None:
        # The explorer reads category counts only.
        snapshot = record(model, tokenizer, probe, dataclasses.replace(how, per_instruction=False))
    neurons = [neuron_named(snapshot, neuron)] if neuron else most_specific(snapshot, per_category)
    cards = explain(model, tokenizer, probe, snapshot, neurons, top, batch_size, progress=True)
    if neuron:
        return card_text(cards[0])
    write_neurons(cards, out / "neurons.jsonl")
    scope = snapshot.meta.get("token_scope")
    setting = (
        f"{len(probe)} probe instructions, {scope} tokens; the {per_category} neurons of each category "
        "with the largest frequency gap p(category) - max p(other category), "
        f"{top} contexts each"
    )
    return write_explain_page(cards, out, model=model_spec["name_or_path"], setting=setting)


def _probe_of(snapshot: Snapshot | None, records: list[Record], per_category: int, seed: int) -> list[Record]:
    """The probe set a snapshot was recorded on (its instructions, by id), or the seeded one."""
    from sparcom.train.sft import probe_set

    if snapshot is not None and snapshot.instruction_ids:
        by_id = {r["id"]: r for r in records}
        missing = [i for i in snapshot.instruction_ids if i not in by_id]
        if missing:
            raise SnapshotError(
                f"the snapshot's instruction {missing[0]!r} is not in the data; expected the data it was recorded on"
            )
        return [by_id[i] for i in snapshot.instruction_ids]
    probe = probe_set(records, per_category, seed)
    if snapshot is not None and snapshot.meta.get("dataset_hash") != dataset_hash(probe):
        raise SnapshotError(
            "the snapshot has no instruction ids and was not recorded on the seeded probe set; record it "
            "with the same sparcom.probe.per_category and seed, or with per-instruction counts"
        )
    return probe
