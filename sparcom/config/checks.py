"""What types cannot say about a config: ranges, files that must exist, model presets and rules
between fields. Written once for train.py and analyze.py, torch-free, and every problem is one
line: ``<key>: <value> ...; expected ...``.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparcom.errors import ConfigError, closest

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sparcom.config import AnalyzeConfig, SparcomConfig, TrainConfig


# -------------------------------------------------------------------------- single values


def epsilon_list(key: str, value: Any) -> list[float]:
    """A list of epsilons in (0, 1]; a single number is taken as a one-element list."""
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:
        raise ConfigError(f"{key}: [] is empty; expected a list of numbers in (0, 1], e.g. [0.3, 0.5]")
    for index, epsilon in enumerate(values):
        check_epsilon(f"{key}[{index}]" if isinstance(value, list | tuple) else key, epsilon)
    return [float(e) for e in values]


def check_epsilon(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{key}: {value!r} is not a valid epsilon; expected a number in (0, 1], e.g. 0.5")


def positive(key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        extra = " or null" if allow_none else ""
        raise ConfigError(f"{key}: {value!r} is not allowed; expected a positive integer{extra}")


def one_of(key: str, value: Any, accepted: Iterable[str]) -> None:
    accepted = list(accepted)
    if value not in accepted:
        raise ConfigError(
            f"{key}: {value!r} is unknown{closest(value, accepted)}; expected one of {', '.join(accepted)}"
        )


def model_name(key: str, name_or_path: str) -> None:
    """A model a config names must be a preset, an existing model folder or what could be a hub id:
    a path that does not exist is refused here, never tried as a hub id. Whether a packaged preset's
    package is installed, or a hub id can be reached, is ``check_loadable``'s question."""
    from sparcom.config import PACKAGED_PRESET_NAMES, TINY_PRESET_NAMES

    name = str(name_or_path)
    if name in TINY_PRESET_NAMES or name in PACKAGED_PRESET_NAMES:
        return
    path = Path(name).expanduser()
    if name.startswith("tiny-") and not path.exists():
        raise ConfigError(
            f"{key}: {name!r} is not a tiny preset{closest(name, TINY_PRESET_NAMES)}; expected one of "
            f"{', '.join(TINY_PRESET_NAMES)}, a local model folder or a hub id"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{key}: {name!r} is a folder without config.json; expected a model folder written by "
                "save_pretrained, a preset or a hub id"
            )
        return
    if _looks_like_path(name) or path.exists():
        presets = (*PACKAGED_PRESET_NAMES, "tiny-*")
        raise ConfigError(
            f"{key}: {name!r} does not exist{closest(name, PACKAGED_PRESET_NAMES)}; expected a model folder "
            f"written by save_pretrained, a preset ({', '.join(presets)}) or a hub id"
        )


def check_loadable(key: str, name_or_path: str) -> None:
    """What ``model_name`` leaves to the environment, checked in seconds: a packaged preset's package
    is installed and whole; a hub id is in the local cache or the hub answers."""
    from sparcom.config import PACKAGED_PRESET_NAMES

    name = str(name_or_path)
    if name in PACKAGED_PRESET_NAMES:
        from sparcom.models.packaged import check_installed

        check_installed(key, name)
    elif _HUB_ID.fullmatch(name) and not name.startswith("tiny-") and not Path(name).expanduser().exists():
        hub_model(key, name)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith("/")
        or not _HUB_ID.fullmatch(name)
    )


def check_models_loadable(cfg: TrainConfig | AnalyzeConfig) -> None:
    """Every model a config loads can be loaded here and now (``check_loadable``), presets resolved."""
    from sparcom.config import TrainConfig, model_preset

    if isinstance(cfg, TrainConfig):
        named = [
            ("model.name_or_path", cfg.model.name_or_path),
            ("model.chat_template_from", cfg.model.chat_template_from),
        ]
    else:
        named = [("base", cfg.base), ("tuned", cfg.tuned)]
        named += [
            (f"pairs[{i}].{side}", getattr(p, side))
            for i, p in enumerate(cfg.pairs or [])
            for side in ("base", "tuned")
        ]
    for key, spec in named:
        if spec and not str(spec).endswith(".safetensors"):
            preset = model_preset(str(spec))
            for name in (preset["name_or_path"], preset.get("chat_template_from")):
                if name:
                    check_loadable(key, name)


def hub_model(key: str, repo_id: str) -> None:
    """A hub id loads offline only from the local cache: refuse one that is not there when the hub
    cannot be reached (``HF_HUB_OFFLINE=1``, or no answer within 3 seconds), rather than retry for minutes."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if reason is None:
        endpoint = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
        except OSError:
            reason = f"{endpoint.hostname} cannot be reached"
    if reason:
        raise ConfigError(
            f"{key}: {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{reason}; expected a preset, a local model folder, or a hub id downloaded before"
        )


def existing_file(key: str, path: str | None, what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{key}: {path!r} does not exist; expected {what}")


# -------------------------------------------------------------------------- whole configs


def check(cfg: TrainConfig | AnalyzeConfig) -> None:
    """Every rule for a typed config; normalises ``sparcom.epsilons`` (and ``sweep_epsilons``) to lists."""
    from sparcom.config import AnalyzeConfig

    check_sparcom(cfg.sparcom)
    positive("stats.resamples", cfg.stats.resamples)
    positive("stats.permutations", cfg.stats.permutations)
    positive("stats.splits", cfg.stats.splits)
    positive("stats.control_draws", cfg.stats.control_draws)
    if not 0 < cfg.stats.alpha < 1:
        raise ConfigError(
            f"stats.alpha: {cfg.stats.alpha!r} is not a significance level; expected 0 < alpha < 1"
        )
    existing_file("data.path", cfg.data.path, "a JSONL file of HexaInst-schema records, or null for HexaInst")
    if isinstance(cfg, AnalyzeConfig):
        check_analyze(cfg)
    else:
        check_train(cfg)


def check_sparcom(sparcom: SparcomConfig) -> None:
    sparcom.epsilons = epsilon_list("sparcom.epsilons", sparcom.epsilons)
    check_epsilon("sparcom.overlap_epsilon", sparcom.overlap_epsilon)
    positive("sparcom.probe.per_category", sparcom.probe.per_category)
    positive("sparcom.probe.batch_size", sparcom.probe.batch_size)
    positive("sparcom.max_new_tokens", sparcom.max_new_tokens)


def check_train(cfg: TrainConfig) -> None:
    from sparcom.config import SFT_CHOICES

    model_name("model.name_or_path", cfg.model.name_or_path)
    positive("data.max_length", cfg.data.max_length)
    if not cfg.data.categories:
        raise ConfigError("data.categories: [] is empty; expected some of the six HexaInst categories")
    positive("sparcom.record.every_steps", cfg.sparcom.record.every_steps, allow_none=True)
    args = cfg.trainer.args
    for name, choices in SFT_CHOICES.items():
        one_of(f"trainer.args.{name}", getattr(args, name), choices)
    if not args.learning_rate > 0:
        raise ConfigError(
            f"trainer.args.learning_rate: {args.learning_rate!r} is not allowed; expected a positive number"
        )
    positive("trainer.args.per_device_train_batch_size", args.per_device_train_batch_size)
    positive("trainer.args.gradient_accumulation_steps", args.gradient_accumulation_steps)
    if args.max_steps == 0 or args.max_steps < -1:
        raise ConfigError(
            f"trainer.args.max_steps: {args.max_steps!r} is not allowed; expected a positive integer or -1"
        )
    for name in ("save_steps", "logging_steps"):
        value = getattr(args, name)
        # transformers takes a step count, or a fraction of the run in (0, 1)
        if not (value > 0 and (value < 1 or float(value).is_integer())):
            raise ConfigError(
                f"trainer.args.{name}: {value!r} is not allowed; expected a positive integer or a fraction in (0, 1)"
            )
    peft = cfg.trainer.peft
    if peft is not None:
        positive("trainer.peft.r", peft.r)
        if not peft.lora_alpha > 0:
            raise ConfigError(
                f"trainer.peft.lora_alpha: {peft.lora_alpha!r} is not allowed; expected a positive number"
            )
        if not 0 <= peft.lora_dropout < 1:
            raise ConfigError(
                f"trainer.peft.lora_dropout: {peft.lora_dropout!r} is not allowed; expected a number in [0, 1)"
            )
    if cfg.trainer.isn is not None:
        isn = cfg.trainer.isn
        check_isn_training(isn.epsilon, isn.categories, cfg.deepspeed.config, peft, "trainer.isn.")
    config = cfg.deepspeed.config
    if isinstance(config, str):
        existing_file(
            "deepspeed.config",
            config,
            "a DeepSpeed JSON file, a config mapping, or deepspeed=none|zero2|zero3",
        )
    elif config is not None and not isinstance(config, dict):
        raise ConfigError(
            f"deepspeed.config: {config!r} is not allowed; expected a mapping, a JSON file or null"
        )
    check_objective(cfg)
    if isinstance(cfg.resume, str) and not Path(cfg.resume).is_dir():
        raise ConfigError(
            f"resume: {cfg.resume!r} is not a checkpoint folder; expected true, false, null or a folder"
        )


_OBJECTIVE = re.compile(
    r"(?P<family>eval/loss|sparcom/isn_jaccard/base|sparcom/isn_jaccard/prev|sparcom/isn_jaccard_chance/base"
    r"|sparcom/ise_pearson/base|sparcom/ise_pearson/prev)(/eps=(?P<epsilon>[0-9.]+))?/(?P<category>\w+)"
)


def check_objective(cfg: TrainConfig) -> None:
    """``objective`` names a number the run logs at its last snapshot."""
    match = _OBJECTIVE.fullmatch(str(cfg.objective))
    expected = (
        "expected eval/loss/<category|mean>, sparcom/isn_jaccard/base/<category|mean> (the overlap epsilon's), "
        "sparcom/isn_jaccard/base/eps=<E>/<category|mean>, or the same under isn_jaccard/prev, "
        "isn_jaccard_chance/base, ise_pearson/base|prev"
    )
    if match is None:
        raise ConfigError(f"objective: {cfg.objective!r} is not a number a run logs; {expected}")
    category = match["category"]
    categories = [str(c) for c in cfg.data.categories]
    if category not in (*categories, "mean"):
        raise ConfigError(
            f"objective: {cfg.objective!r} names {category!r}{closest(category, categories)}; expected one of "
            f"{', '.join(categories)} or mean"
        )
    if match["epsilon"] is not None and float(match["epsilon"]) not in [
        float(e) for e in cfg.sparcom.epsilons
    ]:
        raise ConfigError(
            f"objective: {cfg.objective!r} asks for eps={match['epsilon']}, which sparcom.epsilons "
            f"({cfg.sparcom.epsilons}) does not measure; expected one of them"
        )
    # With data.held_out=0 there is no held-out loss; train.py then returns no objective and says so.


def check_isn_training(
    epsilon: float, categories: list[str] | None, deepspeed: Any, peft: Any, prefix: str = ""
) -> None:
    """ISN-only fine-tuning: its epsilon and categories, and what it cannot be combined with."""
    check_epsilon(f"{prefix}epsilon", epsilon)
    if categories is not None and not categories:
        raise ConfigError(f"{prefix}categories: [] is empty; expected null (all six) or some categories")
    stage = (
        ((deepspeed or {}).get("zero_optimization") or {}).get("stage", 0)
        if isinstance(deepspeed, dict)
        else 0
    )
    if stage == 3:
        raise ConfigError(
            "deepspeed: ZeRO-3 is not supported with trainer=isn (it shards the frozen base weights that every "
            "forward reads); expected deepspeed=zero2 or none"
        )
    if peft is not None:
        raise ConfigError(
            "trainer.peft: LoRA cannot be combined with trainer=isn; expected trainer.peft=null"
        )


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "cuda")


def check_placement(device_map: str | None, max_memory: dict | None, offload_folder: str | None) -> None:
    if device_map is not None and device_map not in DEVICE_MAPS and not re.fullmatch(r"cuda:\d+", device_map):
        raise ConfigError(
            f"device_map: {device_map!r} is unknown; expected one of {list(DEVICE_MAPS)}, cuda:N or null"
        )
    for key, value in (("max_memory", max_memory), ("offload_folder", offload_folder)):
        if value and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ConfigError(
                f"{key}: {value!r} needs device_map=auto (accelerate's dispatch); got device_map={device_map!r}"
            )
    for device, size in (max_memory or {}).items():
        if not (str(device).isdigit() or device in ("cpu", "disk", "mps")):
            raise ConfigError(
                f"max_memory: device {device!r} is unknown; expected GPU indices (0, 1, ...), cpu or disk"
            )
        if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?", str(size)):
            raise ConfigError(f"max_memory.{device}: {size!r} is not a size; expected e.g. 20GiB or 500MB")


def check_analyze(cfg: AnalyzeConfig) -> None:
    check_placement(cfg.device_map, cfg.max_memory, cfg.offload_folder)
    cfg.sweep_epsilons = epsilon_list("sweep_epsilons", cfg.sweep_epsilons)
    for name, settings in (("ablate", cfg.ablate), ("steer", cfg.steer)):
        check_epsilon(f"{name}.epsilon", settings.epsilon)
        positive(f"{name}.per_category", settings.per_category)
        positive(f"{name}.batch_size", settings.batch_size)
    if not cfg.steer.scales:
        raise ConfigError("steer.scales: [] is empty; expected factors such as [0, 0.5, 1.5, 2, 3]")
    if cfg.stats.control_draws < 2:
        raise ConfigError(f"stats.control_draws: {cfg.stats.control_draws!r} is too few; expected at least 2")
    if cfg.mode == "explain":
        check_explain(cfg)
    if cfg.sweep is not None:
        check_sweep(cfg)
        return
    if cfg.run is not None:
        if cfg.base or cfg.tuned or cfg.pairs:
            raise ConfigError(
                f"run: {cfg.run!r} is given with base, tuned or pairs; expected run or those, not both"
            )
        if not (Path(cfg.run) / "snapshots").is_dir():
            raise ConfigError(
                f"run: {cfg.run!r} is not a train.py run folder; expected a folder holding snapshots/"
            )
        return
    if cfg.pairs:
        names = [pair.name for pair in cfg.pairs]
        for index, pair in enumerate(cfg.pairs):
            if names.index(pair.name) != index:
                raise ConfigError(
                    f"pairs[{index}].name: {pair.name!r} is used twice; expected distinct names"
                )
            check_inputs(f"pairs[{index}].", pair.base, pair.tuned, cfg.mode)
        return
    check_inputs("", cfg.base, cfg.tuned, cfg.mode)


def check_sweep(cfg: AnalyzeConfig) -> None:
    """sweep=: alone, in mode=compare, naming finished jobs of one model (``sweep_folders``)."""
    from sparcom.report.sweep import sweep_folders

    if cfg.run or cfg.base or cfg.tuned or cfg.pairs:
        raise ConfigError(
            "sweep: given with run, base, tuned or pairs; expected sweep=<multirun folder> alone"
        )
    if cfg.mode != "compare":
        raise ConfigError(f"sweep: given with mode={cfg.mode}; expected mode=compare (the default)")
    cfg.sweep = [str(p) for p in (cfg.sweep if isinstance(cfg.sweep, list | tuple) else [cfg.sweep])]
    sweep_folders(cfg.sweep)


def check_explain(cfg: AnalyzeConfig) -> None:
    """mode=explain: how many neurons and contexts, and the one neuron asked for."""
    positive("explain.per_category", cfg.explain.per_category)
    positive("explain.top", cfg.explain.top)
    neuron = cfg.explain.neuron
    if neuron is not None and not re.fullmatch(r"[^:\s]+:\s*\d+(\s*,\s*\d+)?", str(neuron)):
        raise ConfigError(
            f"explain.neuron: {neuron!r} is not a neuron; expected <site>:<i>, or <site>:<expert>,<i> for a "
            "routed expert (quoted on the command line: 'explain.neuron=\"model.layers.3.mlp.experts:2,17\"')"
        )
    if cfg.pairs or cfg.tuned:
        raise ConfigError(
            f"{'pairs' if cfg.pairs else 'tuned'}: given with mode=explain; expected run=<run folder> or base=<model>"
        )


def check_inputs(prefix: str, base: str | None, tuned: str | None, mode: str) -> None:
    """base and tuned of one comparison: what each mode needs, files that exist, known presets."""
    if not base:
        raise ConfigError(
            f"{prefix}base: null; expected run=<run folder>, or base=<...> and tuned=<...> "
            "(snapshot files, conf/model presets, model folders or hub ids)"
        )
    if mode == "compare" and not tuned:
        raise ConfigError(
            f"{prefix}tuned: null; expected a snapshot file, conf/model preset, model folder "
            f"or hub id to compare with {prefix}base"
        )
    if mode in ("ablate", "steer", "explain"):
        key, spec = (f"{prefix}tuned", tuned) if tuned else (f"{prefix}base", base)
        if spec.endswith(".safetensors"):
            raise ConfigError(
                f"{key}: {spec!r} is a snapshot, and mode={mode} needs a model; expected "
                "a run folder, conf/model preset, model folder or hub id"
            )
    for key, spec in ((f"{prefix}base", base), (f"{prefix}tuned", tuned)):
        if spec and spec.endswith(".safetensors"):
            existing_file(key, spec, "a snapshot file")
        elif spec:
            model_name(key, spec)


def check_data(cfg: TrainConfig | AnalyzeConfig) -> list[dict]:
    """The records a config reads, loaded and checked (every problem of the file named by line; a
    training split or probe set that asks for more instructions than the data holds); returns them."""
    from sparcom.config import TrainConfig
    from sparcom.data import load_records
    from sparcom.train.sft import split_records

    if not isinstance(cfg, TrainConfig):
        return load_records(cfg.data.path)
    records = load_records(cfg.data.path, tuple(cfg.data.categories))
    held_out, split = cfg.data.held_out, cfg.sparcom.probe_split
    if held_out < 0:
        raise ConfigError(f"data.held_out: {held_out} is not allowed; expected 0 or a positive integer")
    for category in sorted({r["category"] for r in records}):
        available = sum(r["category"] == category for r in records)
        if held_out >= available:
            raise ConfigError(
                f"data.held_out: {held_out} leaves no {category} record to train on ({available} in the data); "
                f"expected at most {available - 1}"
            )
    if split == "held_out" and not held_out:
        raise ConfigError(
            "sparcom.probe_split: 'held_out' with data.held_out=0 has no instructions to probe; expected "
            "data.held_out > 0, or sparcom.probe_split=train or all"
        )
    train, kept = split_records(records, held_out, cfg.data.split_seed)
    pool, what = {
        "held_out": (kept, "held-out records (data.held_out)"),
        "train": (train, "records left to train on (beside data.held_out)"),
        "all": (records, "records in the data"),
    }[split]
    check_probe_fits(pool, cfg.sparcom.probe.per_category, what=what)
    if cfg.trainer.args.eval_strategy != "no" and not held_out:
        raise ConfigError(
            f"trainer.args.eval_strategy: {cfg.trainer.args.eval_strategy!r} evaluates on the held-out "
            "instructions, and data.held_out is 0; expected data.held_out > 0, or eval_strategy=no"
        )
    return records


def check_probe_fits(
    records: list[dict],
    per_category: int,
    key: str = "sparcom.probe.per_category",
    what: str = "records in the data",
) -> None:
    """A setting cannot ask for more instructions of a category than ``records`` hold."""
    for category in sorted({r["category"] for r in records}):
        available = sum(r["category"] == category for r in records)
        if per_category > available:
            raise ConfigError(
                f"{key}: {per_category} is more than the {available} {category} {what}; expected at most {available}"
            )


# ----------------------------------------------------------------------------- composed configs


def to_object(cfg: DictConfig) -> TrainConfig | AnalyzeConfig:
    """The typed config of a composed one, checked: raises ``ConfigError`` (one line) on any
    value that the types or the rules of ``sparcom.config.checks`` refuse. Enum-typed fields come
    back as plain strings, as the library takes them."""
    from omegaconf import OmegaConf

    from sparcom.config.messages import check_keys, one_line

    check_keys(cfg)
    try:
        typed = OmegaConf.to_object(cfg)
    except Exception as err:  # OmegaConf's errors span lines and lack what is accepted
        raise one_line(err) from err
    check(typed)
    return _plain_strings(typed)


def _plain_strings(value):
    if isinstance(value, enum.StrEnum):
        return str(value)
    if isinstance(value, list):
        return [_plain_strings(item) for item in value]
    if dataclasses.is_dataclass(value):
        for item in dataclasses.fields(value):
            setattr(value, item.name, _plain_strings(getattr(value, item.name)))
    return value
