"""Where a recording runs: this process's place among several, and the device its inputs go to."""

from __future__ import annotations

import torch
from torch import nn


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device (an offloaded embedding is on "meta"; accelerate's
    hooks then move the inputs themselves)."""
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device
