"""ISN masks the tests share: random masks, the entries a mask trains, and the check that only
they moved (byte for byte)."""

from __future__ import annotations

import torch

from sparcom.edit.intervention import neuron_sites


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def byte_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def entries_of(mask: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict key -> bool mask of the entries that belong to chosen neurons, written out by hand
    for the layouts of the tiny presets: gate and up rows and the down column of a dense FFN
    (``[d_ff, H]``, ``[d_ff, H]``, ``[H, d_ff]``), and of each expert of fused experts
    (``gate_up_proj [E, 2d, H]`` with the gate rows first, ``down_proj [E, H, d]``)."""
    inside = {}
    for site, chosen in mask.items():
        if chosen.dim() == 1:
            rows = chosen[:, None]
            if f"{site}.gate_proj.weight" in state:
                inside[f"{site}.gate_proj.weight"] = rows
                inside[f"{site}.up_proj.weight"] = rows
            else:  # Phi-3: gate_up_proj = [gate; up]
                inside[f"{site}.gate_up_proj.weight"] = torch.cat([rows, rows])
            inside[f"{site}.down_proj.weight"] = chosen[None, :]
        else:
            inside[f"{site}.gate_up_proj"] = torch.cat([chosen, chosen], 1)[:, :, None]
            inside[f"{site}.down_proj"] = chosen[:, None, :]
    return {name: entries.expand_as(state[name]) for name, entries in inside.items()}


def assert_only_isns_moved(base: dict, after: dict, mask: dict) -> None:
    assert after.keys() == base.keys()
    inside = entries_of(mask, base)
    for name, value in base.items():
        if name not in inside:
            assert byte_equal(after[name], value), name
            continue
        chosen = inside[name]
        assert byte_equal(after[name][~chosen], value[~chosen]), name
        assert bool((after[name][chosen] != value[chosen]).all()), f"{name}: some ISN entries did not move"


def random_mask(model, fraction: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        s: torch.rand(shape, generator=generator) < fraction for s, (_, shape) in neuron_sites(model).items()
    }
