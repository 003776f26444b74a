"""The config schema of train.py and analyze.py: dataclasses registered with Hydra's ConfigStore.

Torch-free, so a config is type-checked and validated before anything heavy is imported. Both
entry points spell the shared settings the same way (``sparcom.epsilons``,
``sparcom.probe.per_category``, ...). The schema imports no checks: ``sparcom.config.checks.to_object``
turns a composed config into these dataclasses and runs the rules that types cannot express.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field, make_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from sparcom.config.sft_fields import load_sft_fields
from sparcom.data import CATEGORIES

# The tiny offline presets of sparcom.models.loading, named here so that checking a config imports no
# torch (a test keeps the two lists equal).
TINY_PRESET_NAMES = (
    "tiny-llama",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-mistral",
    "tiny-gemma",
    "tiny-gemma2",
    "tiny-phi3",
    "tiny-qwen2-moe",
    "tiny-qwen3-moe",
    "tiny-mixtral",
    "tiny-olmoe",
    "tiny-deepseek-v2",
    "tiny-deepseek-v3",
)

# The Hydra config folder (conf/ beside the package in this repository's layout).
CONF = Path(__file__).resolve().parents[2] / "conf"

# Real models that a registry package ships, loaded by name offline (sparcom.models.loading.PACKAGED).
PACKAGED_PRESET_NAMES = ("smollm2-135m-instruct",)

Category = StrEnum("Category", {name: name for name in CATEGORIES})


class TokenScope(StrEnum):
    """Which tokens of a conversation are counted (``sparcom.recording.conversation.TOKEN_SCOPES``)."""

    prompt = "prompt"
    response = "response"
    all = "all"
    generated = "generated"


class SelectionMode(StrEnum):
    """How epsilon selects ISNs (``sparcom.stats.select.SELECTION_MODES``)."""

    threshold = "threshold"
    percentile_layer = "percentile_layer"
    percentile_global = "percentile_global"


class ProbeSplit(StrEnum):
    """Which instructions a training run's probe set is drawn from."""

    held_out = "held_out"
    train = "train"
    all = "all"


class IsnControl(StrEnum):
    """What ISN-only training trains: the ISNs, or its control, a random set of the same sizes."""

    none = "none"
    random = "random"


class IsnSet(StrEnum):
    """Which of a category's ISNs a causal edit or ISN-only training takes (``sparcom.stats.select.ISN_SETS``)."""

    frequent = "frequent"
    unique = "unique"


class Dtype(StrEnum):
    """Weights' dtype when a model is loaded."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"
    auto = "auto"


class LoggerMode(StrEnum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class AnalyzeMode(StrEnum):
    compare = "compare"
    ablate = "ablate"
    steer = "steer"
    explain = "explain"


# ----------------------------------------------------------------------------- shared settings


@dataclass
class ProbeConfig:
    """The probe set: the HexaInst instructions whose neurons are counted.

    Parameters:
        per_category: instructions per category (200 = all of HexaInst).
        seed: which instructions: a seeded sample, the same in every run.
        batch_size: conversations per forward pass while recording.
        per_instruction: keep per-instruction counts (overlap matrices); off for very large MoE models.
    """

    per_category: int = 20
    seed: int = 0
    batch_size: int = 16
    per_instruction: bool = True


@dataclass
class SparcomConfig:
    """How neurons are counted and selected; spelt the same in train.py and analyze.py.

    Parameters:
        epsilons: ISN thresholds, each in (0, 1]; a single number is taken as a one-element list.
        selection_mode: threshold (p >= eps), percentile_layer or percentile_global (top eps fraction).
        token_scope: the tokens counted: the prompt, the response, all, or generated (each model's own
            greedy continuation of the prompt, at most max_new_tokens).
        overlap_epsilon: the epsilon of overlap matrices, layer profiles, general/unique counts and figures.
        probe: the probe set.
        max_new_tokens: tokens generated per instruction, for scopes that count generated tokens.
        isn_set: which ISNs ablation and steering edit: frequent (every neuron that fires often on the
            category, the paper's ISNs) or unique (those that are ISNs of no other category).
    """

    epsilons: Any = field(default_factory=lambda: [0.3, 0.5, 0.7])
    selection_mode: SelectionMode = SelectionMode.threshold
    token_scope: TokenScope = TokenScope.prompt
    overlap_epsilon: float = 0.5
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    max_new_tokens: int = 128
    isn_set: IsnSet = IsnSet.frequent


@dataclass
class StatsConfig:
    """How far the numbers can be trusted: resampling and permutation settings.

    Parameters:
        enabled: compute intervals, p-values and controls.
        resamples: paired bootstrap resamples per interval.
        permutations: label permutations per test.
        splits: random half-splits for instruction-sampling stability.
        control_draws: random-neuron control sets per comparison.
        seed: the seed of every random draw; the same seed gives the same numbers.
        alpha: significance level of every test and verdict (Holm-adjusted across categories).
    """

    enabled: bool = True
    resamples: int = 200
    permutations: int = 1000
    splits: int = 20
    control_draws: int = 10
    seed: int = 0
    alpha: float = 0.05


@dataclass
class ModelConfig:
    """A model: a conf/model preset, a local folder or a hub id.

    Parameters:
        name_or_path: a tiny preset name, a folder written by save_pretrained, or a hub id.
        dtype: weights' dtype (null: float32 on CPU, bfloat16 on a GPU).
        chat_template_from: a model whose chat template to use (a base model borrows its instruct sibling's).
    """

    name_or_path: str = "tiny-qwen2-moe"
    dtype: Dtype | None = None
    chat_template_from: str | None = None


@dataclass
class DataSource:
    """Parameters:
    path: a JSONL file of HexaInst-schema records (null: the shipped HexaInst).
    """

    path: str | None = None


# ----------------------------------------------------------------------------------- train.py


@dataclass
class DataConfig(DataSource):
    """Parameters:
    path: a JSONL file of HexaInst-schema records (null: the shipped HexaInst).
    max_length: longest conversation in tokens; longer ones are truncated (the response end first).
    categories: the categories trained on and probed.
    held_out: instructions per category never trained on (a seeded split): the held-out loss per
        category is measured on them at every snapshot, and the probe set is drawn from them by
        default (sparcom.probe_split); 0 trains on everything.
    split_seed: which instructions are held out.
    """

    max_length: int = 512
    categories: list[Category] = field(default_factory=lambda: list(Category))
    held_out: int = 20
    split_seed: int = 0


_TYPES: dict[str, Any] = {
    "bool": bool,
    "int": int,
    "float": float,
    "str": str,
    "int|str": int | str,
    "str|bool": str | bool,
    "list[str]": list[str],
    "any": Any,
}


def _sft_args_class() -> type:
    """A dataclass of every TRL SFTConfig field (type, default, doc) from the checked-in description."""
    fields, docs = [], []
    for spec in load_sft_fields():
        kind = _TYPES[spec["type"].rstrip("?")]
        if spec["type"].endswith("?") and kind is not Any:
            kind = kind | None
        default = spec["default"]
        if isinstance(default, list | dict):
            fields.append(
                (spec["name"], kind, field(default_factory=functools.partial(copy.deepcopy, default)))
            )
        else:
            fields.append((spec["name"], kind, field(default=default)))
        docs.append(f"    {spec['name']}: {spec['help']}")
    cls = make_dataclass("SFTArgs", fields)
    # Named as where it lives, so a pickled config (a launcher's job in another process) finds this
    # very class again; make_dataclass would call it types.SFTArgs.
    cls.__module__ = __name__
    cls.__doc__ = "Every TRL SFTConfig field, with TRL's defaults.\n\nParameters:\n" + "\n".join(docs)
    return cls


SFTArgs = _sft_args_class()
SFT_CHOICES: dict[str, list[str]] = {s["name"]: s["choices"] for s in load_sft_fields() if "choices" in s}


@dataclass
class PeftConfig:
    """LoRA adapters (peft.LoraConfig).

    Parameters:
        r: the adapters' rank.
        lora_alpha: scaling numerator (the update is scaled by lora_alpha / r).
        lora_dropout: dropout on the adapters' input.
        target_modules: modules to adapt: "all-linear" or a list of module names.
    """

    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: Any = "all-linear"


@dataclass
class IsnTrainingConfig:
    """ISN-only fine-tuning (trainer=isn): train the ISNs the base model's step-0 recording selects.

    Parameters:
        epsilon: the epsilon of the trained ISNs.
        categories: whose ISNs are trained (their union); null: all six.
        selection_mode: how epsilon selects them.
        isn_set: frequent (every neuron that fires often on the category) or unique (those that are
            ISNs of no other category: the categories' own neurons).
        control: none trains the ISNs; random trains the matched control instead, random neurons with
            exactly the ISN set's counts in every site and expert, so two runs differ only in which
            neurons move.
        control_seed: which random neurons the control draws.
    """

    epsilon: float = 0.5
    categories: list[Category] | None = None
    selection_mode: SelectionMode = SelectionMode.threshold
    isn_set: IsnSet = IsnSet.frequent
    control: IsnControl = IsnControl.none
    control_seed: int = 0


@dataclass
class TrainerConfig:
    """Parameters:
    args: every TRL SFTConfig field (trainer.args.<field>=...).
    peft: LoRA settings; null trains every parameter.
    isn: ISN-only settings; null trains every parameter (or the LoRA adapters).
    """

    args: SFTArgs = field(default_factory=SFTArgs)
    peft: PeftConfig | None = None
    isn: IsnTrainingConfig | None = None


@dataclass
class DeepSpeedConfig:
    """Parameters:
    config: a DeepSpeed config mapping or JSON file; null runs plain PyTorch (DDP under torchrun).
    """

    config: Any = None


@dataclass
class RecordConfig:
    """When the training callback records a snapshot (always at step 0 and at the end).

    Parameters:
        on_save: at every checkpoint save.
        every_steps: and every N optimizer steps, if set.
    """

    on_save: bool = True
    every_steps: int | None = None


@dataclass
class TrainSparcomConfig(SparcomConfig):
    """Parameters:
    record: when snapshots are recorded during training.
    probe_split: which instructions the probe set is drawn from: held_out (never trained on: drift
        measured on unseen instructions, the default), train (instructions trained on) or all.
    """

    record: RecordConfig = field(default_factory=RecordConfig)
    probe_split: ProbeSplit = ProbeSplit.held_out


@dataclass
class LoggerConfig:
    """Weights & Biases.

    Parameters:
        mode: online (falls back to offline without an API key or network), offline or disabled.
        project: the W&B project.
        entity: the W&B entity (user or team); null: the default one.
        group: the run's group (default: a sweep's folder name).
        name: the run's name (default: a sweep job's swept overrides, else the run folder's name).
        tags: extra tags (the model and the trainer kind are always added).
    """

    mode: LoggerMode = LoggerMode.offline
    project: str = "sparcom"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """train.py: TRL SFT on HexaInst while recording ISN/ISE drift.

    Parameters:
        model: the model fine-tuned.
        data: training and probe data.
        trainer: SFTConfig fields and LoRA.
        deepspeed: DeepSpeed settings.
        sparcom: what is recorded and how neurons are selected.
        stats: resampling settings.
        logger: W&B.
        seed: the seed of model construction, data order and training.
        resume: true (the newest complete checkpoint of hydra.run.dir), a checkpoint folder, or null.
        objective: the number train.py returns to a Hydra sweeper, by its W&B key at the last
            snapshot: eval/loss/mean (the held-out loss, mean over categories), eval/loss/<category>,
            sparcom/isn_jaccard/base/mean (drift at sparcom.overlap_epsilon), .../eps=<E>/<category>, ...
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    sparcom: TrainSparcomConfig = field(default_factory=TrainSparcomConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    resume: bool | str | None = None
    objective: str = "eval/loss/mean"


# --------------------------------------------------------------------------------- analyze.py


@dataclass
class PairConfig:
    """One comparison of several (``pairs``).

    Parameters:
        name: the pair's output subfolder.
        base: a snapshot file, conf/model preset, model folder or hub id.
        tuned: the same kinds; not needed by mode=ablate, which silences base's ISNs.
    """

    name: str = MISSING
    base: str = MISSING
    tuned: str | None = None


@dataclass
class AblateConfig:
    """The causal check: silence each category's ISNs, measure the response loss on every category.

    Parameters:
        epsilon: the epsilon of the ISNs silenced.
        per_category: held-out instructions per category on which the loss is measured.
        seed: which held-out instructions, and the random control's neurons.
        batch_size: conversations per forward pass.
    """

    epsilon: float = 0.5
    per_category: int = 20
    seed: int = 0
    batch_size: int = 8


@dataclass
class SteerConfig:
    """Steering: scale each category's ISN activations, measure the response loss on every category.

    Parameters:
        scales: factors applied to the ISNs' activations (0 silences them, 1 changes nothing).
        epsilon: the epsilon of the ISNs scaled.
        per_category: held-out instructions per category on which the loss is measured.
        seed: which held-out instructions, and the random control's neurons.
        batch_size: conversations per forward pass.
    """

    scales: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.5, 2.0, 3.0])
    epsilon: float = 0.5
    per_category: int = 20
    seed: int = 0
    batch_size: int = 8


@dataclass
class ExplainConfig:
    """Parameters:
    per_category: the most specific ISNs of each category that are explained.
    top: the top-activating probe contexts kept for each neuron.
    neuron: one neuron to print (``<site>:<index>``, the index ``i`` or ``expert,i``); null explains them all.
    """

    per_category: int = 20
    top: int = 10
    neuron: str | None = None


@dataclass
class AnalyzeConfig:
    """analyze.py: compare, ablate, steer or explain, from a run folder, snapshots or models.

    Parameters:
        mode: compare (tables, figures, report), ablate (causal check), steer, explain.
        run: a train.py run folder: base = its first snapshot, tuned = its last.
        sweep: a multirun folder (or a list of run folders): its jobs side by side (mode=compare).
        base: a snapshot file, conf/model preset, model folder or hub id (mode=ablate, steer and explain: the model).
        tuned: the same kinds, compared with base.
        pairs: several comparisons at once: [{name, base, tuned}, ...].
        out: the output folder (default: <run>/analysis, or analysis/<launch time>).
        data: the records probed (null: the shipped HexaInst).
        dtype: for models loaded here (null: the model preset's, else float32 on CPU, bfloat16 on a GPU).
        device_map: where models loaded here go: auto (accelerate spreads a model over the GPUs, CPU
            memory and disk), cpu, cuda, cuda:N (null: the GPU when there is one).
        max_memory: with device_map=auto, the most each device may hold ({0: 20GiB, cpu: 60GiB}; {}: no limit).
        offload_folder: with device_map=auto, where weights that fit nowhere else go.
        sparcom: how neurons are counted and selected.
        sweep_epsilons: the epsilons of the Jaccard-vs-epsilon curves.
        stats: resampling settings.
        ablate: mode=ablate settings.
        steer: mode=steer settings.
        explain: mode=explain settings.
    """

    mode: AnalyzeMode = AnalyzeMode.compare
    run: str | None = None
    sweep: Any = None
    base: str | None = None
    tuned: str | None = None
    pairs: list[PairConfig] | None = None
    out: str | None = None
    data: DataSource = field(default_factory=DataSource)
    dtype: Dtype | None = None
    device_map: str | None = None
    max_memory: dict[Any, Any] = field(default_factory=dict)
    offload_folder: str | None = None
    sparcom: SparcomConfig = field(default_factory=lambda: SparcomConfig(probe=ProbeConfig(per_category=200)))
    sweep_epsilons: Any = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])
    stats: StatsConfig = field(default_factory=StatsConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)


SCHEMAS = {"train": TrainConfig, "analyze": AnalyzeConfig}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore, as ``train_schema`` and ``analyze_schema``."""
    from hydra.core.config_store import ConfigStore

    for name, schema in SCHEMAS.items():
        ConfigStore.instance().store(name=f"{name}_schema", node=schema)


def model_preset(spec: str) -> dict:
    """A model spec: a ``conf/model`` preset by name (``name_or_path``, ``dtype``,
    ``chat_template_from``), or a path / hub id as it is."""
    import yaml

    preset = CONF / "model" / f"{spec}.yaml"
    if preset.is_file():
        return yaml.safe_load(preset.read_text())
    return {"name_or_path": spec, "dtype": None, "chat_template_from": None}


def as_plain(cfg: TrainConfig | AnalyzeConfig) -> dict:
    """The typed config as plain YAML values (what ``config.yaml`` holds): nested dicts, lists,
    strings and numbers."""
    import yaml

    return yaml.safe_load(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
