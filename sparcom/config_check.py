"""Early validation of train.py and analyze.py configs: every problem is found before data or a
model loads, and reported on one line naming the key, the bad value and what is accepted."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from sparcom.conversation import TOKEN_SCOPES
from sparcom.data import CATEGORIES
from sparcom.models import TINY_PRESETS
from sparcom.select import SELECTION_MODES

LOGGER_MODES = ("online", "offline", "disabled")


class ConfigError(ValueError):
    """A bad config value; the message is one line: ``key: value ...; expected ...``."""


def _epsilon(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{key}: {value!r} is not a valid epsilon; expected a number in (0, 1], e.g. 0.5")


def _one_of(key: str, value, accepted) -> None:
    if value not in accepted:
        raise ConfigError(f"{key}: {value!r} is unknown; expected one of {', '.join(map(str, accepted))}")


def _positive(key: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        extra = " or null" if allow_none else ""
        raise ConfigError(f"{key}: {value!r} is not allowed; expected a positive integer{extra}")


def _model(key: str, name_or_path: str) -> None:
    if (
        str(name_or_path).startswith("tiny-")
        and name_or_path not in TINY_PRESETS
        and not Path(name_or_path).exists()
    ):
        raise ConfigError(f"{key}: {name_or_path!r} is not a tiny preset; expected one of {', '.join(TINY_PRESETS)}, "
                          "a local model folder or a hub id")  # fmt: skip


def check_train(cfg) -> None:
    """Everything train.py can check without loading data or a model."""
    _model("model.name_or_path", cfg.model.name_or_path)
    for index, category in enumerate(cfg.data.categories):
        _one_of(f"data.categories[{index}]", category, CATEGORIES)
    if not cfg.data.categories:
        raise ConfigError(f"data.categories: [] is empty; expected some of {', '.join(CATEGORIES)}")
    if cfg.data.path is not None and not Path(cfg.data.path).is_file():
        raise ConfigError(
            f"data.path: {cfg.data.path!r} does not exist; expected a JSONL file or null for HexaInst"
        )
    _positive("data.max_length", cfg.data.max_length)
    if not cfg.sparcom.epsilons:
        raise ConfigError(
            "sparcom.epsilons: [] is empty; expected a list of numbers in (0, 1], e.g. [0.3, 0.5]"
        )
    for index, epsilon in enumerate(cfg.sparcom.epsilons):
        _epsilon(f"sparcom.epsilons[{index}]", epsilon)
    _one_of("sparcom.selection_mode", cfg.sparcom.selection_mode, SELECTION_MODES)
    _one_of("sparcom.token_scope", cfg.sparcom.token_scope, TOKEN_SCOPES)
    _positive("sparcom.probe.per_category", cfg.sparcom.probe.per_category)
    _positive("sparcom.probe.batch_size", cfg.sparcom.probe.batch_size)
    _positive("sparcom.record.every_steps", cfg.sparcom.record.every_steps, allow_none=True)
    args = cfg.trainer.args
    if str(args.save_strategy) == "steps":
        if isinstance(args.save_steps, float) and 0 < args.save_steps < 1:
            pass  # a fraction of the run, as transformers allows
        else:
            _positive("trainer.args.save_steps", args.save_steps)
    if isinstance(args.logging_steps, int):
        _positive("trainer.args.logging_steps", args.logging_steps)
    if args.max_steps == 0 or (isinstance(args.max_steps, int) and args.max_steps < -1):
        raise ConfigError(
            f"trainer.args.max_steps: {args.max_steps!r} is not allowed; expected a positive integer or -1"
        )
    _positive("trainer.args.per_device_train_batch_size", args.per_device_train_batch_size)
    config = cfg.deepspeed.config
    if isinstance(config, str) and not Path(config).is_file():
        raise ConfigError(f"deepspeed.config: {config!r} does not exist; expected a DeepSpeed JSON file, "
                          "a config mapping, or deepspeed=none|zero2|zero3")  # fmt: skip
    _one_of("logger.mode", cfg.logger.mode, LOGGER_MODES)
    resume = cfg.resume
    if resume not in (None, True, False) and not Path(str(resume)).is_dir():
        raise ConfigError(
            f"resume: {resume!r} is not a checkpoint folder; expected true, false, null or a folder"
        )


def check_probe_fits(records: list[dict], per_category: int, key: str = "sparcom.probe.per_category") -> None:
    """The probe set cannot ask for more instructions of a category than the data holds."""
    for category in sorted({r["category"] for r in records}):
        available = sum(r["category"] == category for r in records)
        if per_category > available:
            raise ConfigError(f"{key}: {per_category} is more than the {available} {category} records in the data; "
                              f"expected at most {available}")  # fmt: skip


def check_analyze(cfg) -> None:
    """Everything analyze.py can check without loading data or a model."""
    _one_of("mode", cfg.mode, ("compare", "ablate"))
    _one_of("selection_mode", cfg.selection_mode, SELECTION_MODES)
    _one_of("token_scope", cfg.token_scope, TOKEN_SCOPES)
    for key in ("epsilons", "sweep_epsilons"):
        if not cfg[key]:
            raise ConfigError(f"{key}: [] is empty; expected a list of numbers in (0, 1]")
        for index, epsilon in enumerate(cfg[key]):
            _epsilon(f"{key}[{index}]", epsilon)
    _epsilon("overlap_epsilon", cfg.overlap_epsilon)
    _epsilon("ablate.epsilon", cfg.ablate.epsilon)
    _positive("probe.per_category", cfg.probe.per_category)
    _positive("probe.batch_size", cfg.probe.batch_size)
    _positive("ablate.per_category", cfg.ablate.per_category)
    if cfg.run is not None and not (Path(cfg.run) / "snapshots").is_dir():
        raise ConfigError(
            f"run: {cfg.run!r} is not a train.py run folder; expected a folder holding snapshots/"
        )
    if cfg.run is None and not cfg.pairs and not cfg.base:
        raise ConfigError("base: null; expected run=<run folder>, or base=<...> and tuned=<...> "
                          "(snapshot files, conf/model presets, model folders or hub ids)")  # fmt: skip
    if cfg.run is None and not cfg.pairs and cfg.mode == "compare" and not cfg.tuned:
        raise ConfigError(
            "tuned: null; expected a snapshot file, conf/model preset, model folder or hub id to compare with base"
        )
    for key in ("base", "tuned"):
        spec = cfg[key]
        if spec and str(spec).endswith(".safetensors") and not Path(spec).is_file():
            raise ConfigError(f"{key}: {spec!r} does not exist; expected a snapshot file")
        if spec:
            _model(key, spec)


def exit_on_bad_input(main):
    """Bad input ends the program with its one message on stderr and exit status 2, no traceback;
    ``HYDRA_FULL_ERROR=1`` shows the traceback instead."""
    from sparcom.data import DataFileError
    from sparcom.snapshot import SnapshotError

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ConfigError, DataFileError, SnapshotError) as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
