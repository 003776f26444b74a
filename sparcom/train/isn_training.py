"""ISN-only fine-tuning: train the weights of the instruction-specific neurons selected on the base
model, and nothing else.

A neuron's weights are its gate and up rows and its down column (for a routed-expert neuron, the
same inside its expert). Masking gradients would not freeze the rest: decoupled weight decay and
Adam's moments still move masked entries. So the rest is frozen by construction: every parameter
holding chosen entries is parametrized as ``base.index_put(chosen, values)``, where ``values`` (the
chosen entries, initialised from the base) is the only trainable tensor and ``base`` is the
original, frozen parameter. No optimizer ever sees a base entry.

``model.state_dict()`` and ``load_state_dict`` keep the model's ordinary keys (the merged weights),
so checkpoints written by any trainer load with ``sparcom.models.loading.load_model`` as ordinary models,
and resuming loads them back into the parametrized model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from sparcom.config import IsnTrainingConfig
from sparcom.config.checks import check_isn_training
from sparcom.data import CATEGORIES
from sparcom.edit.intervention import check_neurons, neuron_sites, random_like
from sparcom.models.sites import neuron_weights, unwrap
from sparcom.snapshot import Snapshot
from sparcom.stats.select import SELECTION_MODES, NeuronSet, category_isns

MASK_FILE = "isn_mask.safetensors"


class ChosenEntries(nn.Module):
    """Parametrization: the frozen base tensor with its chosen entries replaced by trainable ``values``."""

    def __init__(self, base: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("index", mask.reshape(-1).nonzero().flatten(), persistent=False)
        self.values = nn.Parameter(base.detach().reshape(-1)[self.index].clone())

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base.reshape(-1).index_put((self.index,), self.values).view(base.shape)


@dataclass(frozen=True)
class IsnTraining:
    """What ``isn_only`` set up.

    Attributes:
        mask: ``site -> bool`` tensor shaped like the site's counts: the trained neurons.
        neurons: how many neurons are trained.
        trainable: trainable parameters (entries of the neurons' weights).
        total: all parameters of the model.
    """

    mask: NeuronSet
    neurons: int
    trainable: int
    total: int

    def __str__(self) -> str:
        return (
            f"ISN-only training: {self.neurons} neurons, {self.trainable:,} trainable parameters "
            f"of {self.total:,} ({100 * self.trainable / self.total:.3f}%)"
        )


def check_isn_settings(
    epsilon: float,
    categories: Sequence[str] | None,
    selection_mode: str,
    deepspeed: dict | None = None,
    peft: object = None,
) -> None:
    """Refuse bad ISN-training settings in one line each, before any model is loaded."""
    check_isn_training(epsilon, None if categories is None else list(categories), deepspeed, peft)
    if selection_mode not in SELECTION_MODES:
        raise ValueError(
            f"unknown selection mode {selection_mode!r}; expected one of {list(SELECTION_MODES)}"
        )
    unknown = [c for c in categories or [] if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"ISN categories {unknown!r} are unknown; expected some of {list(CATEGORIES)}")


def select_isns(
    snapshot: Snapshot,
    epsilon: float,
    categories: Sequence[str] | None = None,
    selection_mode: str = "threshold",
    isn_set: str = "frequent",
) -> NeuronSet:
    """The union of the ISNs (``isn_set``: frequent or unique) of ``categories`` (default: all of
    the snapshot's)."""
    check_isn_settings(epsilon, categories, selection_mode)
    categories = list(categories or snapshot.categories)
    missing = [c for c in categories if c not in snapshot.categories]
    if missing:
        raise ValueError(f"categories {missing} are not in the snapshot (it has {snapshot.categories})")
    every = category_isns(snapshot, epsilon, selection_mode, isn_set)
    sets = [every[c] for c in categories]
    return {site: torch.stack([s[site] for s in sets]).any(0) for site in sets[0]}


def save_mask(mask: NeuronSet, path: str | Path, settings: dict | None = None) -> Path:
    """Write the mask (one bool tensor per site) atomically; ``settings`` go to the file's metadata."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(
        {site: chosen.contiguous() for site, chosen in mask.items()},
        temporary,
        metadata={"settings": json.dumps(settings or {})},
    )
    temporary.replace(path)
    return path


def load_mask(path: str | Path) -> NeuronSet:
    if not Path(path).is_file():
        raise ValueError(
            f"ISN mask file {str(path)!r} not found (expected an {MASK_FILE} written by isn_only)"
        )
    return dict(load_file(str(path)))


def check_mask(model: nn.Module, mask: NeuronSet) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Refuse a mask that does not fit the model or selects nothing, and a model set up already;
    returns the model's neuron sites."""
    hf_model = unwrap(model)
    sites = neuron_sites(hf_model)
    check_neurons(mask, sites)
    if any(parametrize.is_parametrized(m) for m in hf_model.modules()):
        raise ValueError("the model is already parametrized (ISN-only training set up twice?)")
    if not any(bool(chosen.any()) for chosen in mask.values()):
        raise ValueError("the ISN mask selects no neuron: nothing to train (lower epsilon?)")
    return sites


def train_only(model: nn.Module, mask: NeuronSet) -> int:
    """Freeze every parameter and make only the weights of the chosen neurons trainable; returns the
    number of trainable parameters."""
    sites = check_mask(model, mask)
    hf_model = unwrap(model)
    hf_model.requires_grad_(False)
    modules = dict(hf_model.named_modules())
    trainable = 0
    for site, chosen in mask.items():
        if not bool(chosen.any()):
            continue
        for owner, name, weight_mask in neuron_weights(modules[site], sites[site][0], chosen):
            chosen_entries = ChosenEntries(getattr(owner, name), weight_mask)
            parametrize.register_parametrization(owner, name, chosen_entries)
            chosen_entries.handles = [
                owner.register_state_dict_post_hook(_merged_keys(name)),
                owner.register_load_state_dict_pre_hook(_parametrized_keys(name, chosen_entries.index)),
            ]
            trainable += chosen_entries.values.numel()
    return trainable


def merge(model: nn.Module) -> nn.Module:
    """Write the trained entries into the base parameters and remove the parametrizations: an
    ordinary model again, every parameter trainable (as ``from_pretrained`` leaves it)."""
    for module in list(unwrap(model).modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations):
            chosen_entries = module.parametrizations[name][0]
            if isinstance(chosen_entries, ChosenEntries):
                for handle in chosen_entries.handles:
                    handle.remove()
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model.requires_grad_(True)


def isn_only(
    model: nn.Module,
    selection: Snapshot | NeuronSet | str | Path,
    run_dir: str | Path | None = None,
    settings: IsnTrainingConfig | None = None,
) -> IsnTraining:
    """Set ``model`` up to fine-tune only its ISNs, before the trainer is built.

    Args:
        selection: the base model's snapshot (its step-0 recording of the probe set), from which the
            ISNs are selected as ``settings`` say (the union of ``settings.categories``' ISNs at
            ``settings.epsilon``); or a mask already selected (a ``site -> bool`` dict, or the path of
            an ``isn_mask.safetensors``, as on resume).
        run_dir: where ``isn_mask.safetensors`` is written; a different mask already there is refused.
        settings: ``trainer.isn`` (default: its defaults). ``control="random"`` trains, instead of the
            ISNs, random neurons with exactly their counts in every site and expert
            (``sparcom.edit.intervention.random_like``, seeded by ``control_seed``): the control that
            says whether the ISNs themselves matter.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    s = settings or IsnTrainingConfig()
    check_isn_settings(
        s.epsilon,
        s.categories,
        s.selection_mode,
        {"zero_optimization": {"stage": 3}} if is_deepspeed_zero3_enabled() else None,
    )
    if s.control not in ("none", "random"):
        raise ValueError(f"unknown ISN-training control {s.control!r}; expected none or random")
    if isinstance(selection, Snapshot):
        mask = select_isns(selection, s.epsilon, s.categories, s.selection_mode, s.isn_set)
        if s.control == "random":
            mask = random_like(mask, torch.Generator().manual_seed(s.control_seed))
    elif isinstance(selection, dict):
        mask = selection
    else:
        mask = load_mask(selection)
    check_mask(model, mask)
    if run_dir is not None:
        path = Path(run_dir) / MASK_FILE
        if path.is_file():
            saved = load_mask(path)
            if saved.keys() != mask.keys() or any(not torch.equal(saved[s], mask[s]) for s in mask):
                raise ValueError(
                    f"{path} holds a different ISN mask; resume with that mask or use a new run folder"
                )
        else:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            chosen = {
                "epsilon": s.epsilon,
                "categories": list(s.categories or CATEGORIES),
                "selection_mode": str(s.selection_mode),
                "isn_set": str(s.isn_set),
                "control": str(s.control),
                **({"control_seed": s.control_seed} if s.control == "random" else {}),
                "trains": "random neurons matched to the ISNs" if s.control == "random" else "the ISNs",
            }
            save_mask(mask, path, chosen)
    total = sum(p.numel() for p in unwrap(model).parameters())
    trainable = train_only(model, mask)
    neurons = int(sum(int(chosen.sum()) for chosen in mask.values()))
    return IsnTraining(mask, neurons, trainable, total)


def _merged_keys(name: str):
    """A state-dict post-hook: ``<name>`` (merged) in place of the parametrization's two entries."""

    def hook(module, state_dict, prefix, local_metadata) -> None:
        state_dict.pop(f"{prefix}parametrizations.{name}.original", None)
        state_dict.pop(f"{prefix}parametrizations.{name}.0.values", None)
        state_dict[prefix + name] = getattr(module, name).detach()

    return hook


def _parametrized_keys(name: str, index: torch.Tensor):
    """A load-state-dict pre-hook: an ordinary ``<name>`` becomes the base and the trainable values
    (entries outside the mask are the base's, so base := the loaded tensor is exact)."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if prefix + name in state_dict:
            loaded = state_dict.pop(prefix + name)
            state_dict[f"{prefix}parametrizations.{name}.original"] = loaded
            state_dict[f"{prefix}parametrizations.{name}.0.values"] = loaded.reshape(-1)[
                index.to(loaded.device)
            ]

    return hook


def lora_rank_matching(
    model: nn.Module, trainable: int, target_modules: str | Sequence[str] = "all-linear"
) -> int:
    """The LoRA rank whose adapters train the number of parameters closest to ``trainable``, for a
    like-for-like comparison with ISN-only training. A rank-``r`` adapter on an ``in x out`` linear
    trains ``r * (in + out)``; ``target_modules`` as peft reads it: ``"all-linear"`` (every linear but
    the output head) or module-name suffixes."""
    hf_model = unwrap(model)
    head = hf_model.get_output_embeddings()
    per_rank = sum(
        module.in_features + module.out_features
        for name, module in hf_model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not head
        and (target_modules == "all-linear" or name.rsplit(".", 1)[-1] in target_modules)
    )
    if per_rank == 0:
        raise ValueError(f"no linear modules match target_modules={target_modules!r}")
    return max(1, round(trainable / per_rank))
