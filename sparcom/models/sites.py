"""Where each architecture keeps its FFN neurons, experts and routers: the one architecture table.

A site is keyed by the module path (from ``named_modules()`` of the unwrapped HF model) of the
module that owns it:

- ``ffn``: a dense FFN, shared experts included; counts ``[d_ff]``. Read from the input of the
  MLP's activation module, which is the gate pre-activation ``g``; ``f(g) > 0`` iff ``g > 0`` for
  every activation in ``SIGN_PRESERVING``.
- ``experts``: a fused routed-experts module called as ``experts(x, top_k_index, top_k_weights)``
  (transformers 5); counts ``[num_experts, d_expert]``.
- ``router``: the block's router; counts how often each expert was selected, ``[num_experts]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Architecture:
    """How one ``model_type`` lays out its FFNs.

    Attributes:
        dense_mlp: class name of its dense FFNs (and shared experts), or None if it has none.
        activation: attribute of the dense FFN holding the activation module applied to the gate.
        moe_block: class name of its sparse MoE block, or None for dense models.
        router: attribute of the MoE block holding the router.
        experts: attribute of the MoE block holding the fused experts.
    """

    dense_mlp: str | None
    activation: str = "act_fn"
    moe_block: str | None = None
    router: str = "gate"
    experts: str = "experts"


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaMLP"),
    "qwen2": Architecture("Qwen2MLP"),
    "qwen3": Architecture("Qwen3MLP"),
    "mistral": Architecture("MistralMLP"),
    "gemma": Architecture("GemmaMLP"),
    "gemma2": Architecture("Gemma2MLP"),
    "phi3": Architecture("Phi3MLP", activation="activation_fn"),  # fused gate_up_proj: act sees the gate half
    "qwen2_moe": Architecture("Qwen2MoeMLP", moe_block="Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": Architecture("Qwen3MoeMLP", moe_block="Qwen3MoeSparseMoeBlock"),
    "mixtral": Architecture(None, moe_block="MixtralSparseMoeBlock"),
    "olmoe": Architecture("OlmoeMLP", moe_block="OlmoeSparseMoeBlock"),
    "deepseek_v2": Architecture("DeepseekV2MLP", moe_block="DeepseekV2Moe"),
    "deepseek_v3": Architecture("DeepseekV3MLP", moe_block="DeepseekV3MoE"),
}

# Activations with f(g) > 0 exactly when g > 0, so counting g > 0 counts A > 0.
SIGN_PRESERVING = {
    "silu",
    "swish",
    "relu",
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "gelu_python",
}

SITE_KINDS = ("ffn", "experts", "router")


@dataclass(frozen=True)
class Site:
    """One place whose neurons or experts are counted."""

    name: str  # module path of the owning module
    kind: str  # one of SITE_KINDS
    layer: int
    shape: tuple[int, ...]


class UnsupportedModelError(ValueError):
    pass


def unwrap(model: nn.Module) -> nn.Module:
    """The HF ``PreTrainedModel`` inside PEFT, DDP, DeepSpeed or torch.compile wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif (
            hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config")
        ):
            model = model.module
        else:
            return model


def architecture_of(model: nn.Module) -> Architecture:
    """The table entry for a model, or an error listing what is supported."""
    config = unwrap(model).config
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if activation not in SIGN_PRESERVING:
        raise UnsupportedModelError(
            f"activation {activation!r} of {model_type!r} is not sign-preserving (f(g) > 0 iff g > 0); "
            f"supported activations: {sorted(SIGN_PRESERVING)}"
        )
    return ARCHITECTURES[model_type]


def layer_of(name: str) -> int:
    match = re.search(r"\.layers\.(\d+)\.", name + ".")
    return int(match.group(1)) if match else -1


def check_experts(experts: nn.Module) -> None:
    """Refuse fused-experts layouts whose gate the recorder cannot read exactly."""
    if not getattr(experts, "has_gate", True) or getattr(experts, "has_bias", False):
        raise UnsupportedModelError(
            f"{type(experts).__name__}: only gated experts without bias are supported"
        )
    if type(experts)._apply_gate.__name__ != "_default_apply_gate":
        raise UnsupportedModelError(
            f"{type(experts).__name__} applies a custom gate; counts would not be exact"
        )


def gate_weight(experts: nn.Module) -> torch.Tensor:
    """``[num_experts, d_expert, hidden]``: the gate half of a fused experts module's input projection."""
    weight = experts.gate_up_proj
    if getattr(experts, "is_transposed", False):
        weight = weight.transpose(1, 2)  # [E, 2 d, H]
    if getattr(experts, "is_concatenated", True):
        return weight[:, : weight.shape[1] // 2]
    return weight[:, 0::2]  # interleaved [g0, u0, g1, u1, ...]


def find_sites(model: nn.Module) -> list[tuple[Site, nn.Module]]:
    """Every counted site of a supported model with the module its hook attaches to.

    For ``ffn`` sites that module is the activation inside the MLP; for ``experts`` and
    ``router`` sites it is the experts module, whose inputs carry the router's actual selection.
    """
    model = unwrap(model)
    architecture = architecture_of(model)
    found: list[tuple[Site, nn.Module]] = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == architecture.dense_mlp:
            activation = getattr(module, architecture.activation)
            width = _ffn_width(module)
            found.append((Site(name, "ffn", layer_of(name), (width,)), activation))
        elif kind == architecture.moe_block:
            experts = getattr(module, architecture.experts)
            num_experts, d_expert = _experts_shape(experts)
            found.append(
                (
                    Site(
                        f"{name}.{architecture.experts}", "experts", layer_of(name), (num_experts, d_expert)
                    ),
                    experts,
                )
            )
            found.append(
                (Site(f"{name}.{architecture.router}", "router", layer_of(name), (num_experts,)), experts)
            )
    if not found:
        raise UnsupportedModelError(f"no FFN or MoE sites found in {type(model).__name__}")
    return found


def _experts_shape(experts: nn.Module) -> tuple[int, int]:
    check_experts(experts)
    # Under ZeRO-3 a parameter is a placeholder between forwards; ds_shape keeps its real shape.
    shape = tuple(getattr(experts.gate_up_proj, "ds_shape", experts.gate_up_proj.shape))
    fused = shape[2] if getattr(experts, "is_transposed", False) else shape[1]
    return shape[0], fused // 2


def _ffn_width(mlp: nn.Module) -> int:
    if hasattr(mlp, "gate_proj"):
        return mlp.gate_proj.out_features
    return mlp.gate_up_proj.out_features // 2  # Phi-3: [gate; up] fused


def neuron_weights(
    module: nn.Module, kind: str, chosen: torch.Tensor
) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Where the weights of chosen neurons live in a site's module (the MLP of an ``ffn`` site, the
    fused experts of an ``experts`` site): ``(owner, parameter name, mask)`` triples, ``mask`` a bool
    tensor shaped like the parameter and True on every entry that belongs to a chosen neuron.

    ``chosen`` is shaped like the site's counts (``[d_ff]`` or ``[num_experts, d_expert]``). The
    output (down) projection comes first: scaling its entries scales exactly the chosen neurons'
    contributions. Then the gate and up rows (and their biases, where the FFN has them); a down
    projection's bias belongs to no neuron.
    """
    chosen = chosen.to(next(module.parameters()).device)
    if kind == "ffn":
        rows = chosen[:, None]
        found = [(module.down_proj, "weight", chosen[None, :])]
        inputs = [module.gate_proj, module.up_proj] if hasattr(module, "gate_proj") else [module.gate_up_proj]
        for linear in inputs:
            fused = linear.out_features // chosen.numel()  # 2 for Phi-3's [gate; up]
            found.append((linear, "weight", rows.repeat(fused, 1)))
            if linear.bias is not None:
                found.append((linear, "bias", chosen.repeat(fused)))
    elif kind == "experts":
        check_experts(module)
        transposed = getattr(module, "is_transposed", False)
        if getattr(module, "is_concatenated", True):
            fused = torch.cat([chosen, chosen], dim=1)  # [E, 2d]: gate rows, then up rows
        else:
            fused = torch.stack([chosen, chosen], dim=2).flatten(1)  # interleaved g0, u0, g1, u1, ...
        found = [
            (module, "down_proj", chosen[:, :, None] if transposed else chosen[:, None, :]),
            (module, "gate_up_proj", fused[:, None, :] if transposed else fused[:, :, None]),
        ]
    else:
        raise ValueError(f"site kind {kind!r} has no neurons; expected 'ffn' or 'experts'")
    return [
        (owner, name, torch.broadcast_to(mask, getattr(owner, name).shape)) for owner, name, mask in found
    ]
