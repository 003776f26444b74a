"""What a live recorder holds: every tensor reachable from it, measured while it records."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sparcom.recording.recorder import Recorder


def held_bytes(root, skip: object = ()) -> dict[int, int]:
    """Storage bytes of every tensor reachable from ``root`` through containers and plain objects
    (not through modules or functions, which lead into the model), by storage address; tensors
    reachable from ``skip`` are left out."""
    left_out = _reachable(skip) if skip != () else {}
    return {address: size for address, size in _reachable(root).items() if address not in left_out}


def _reachable(root) -> dict[int, int]:
    found, seen, stack = {}, set(), [root]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, nn.Module) or callable(item):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found[item.untyped_storage().data_ptr()] = item.untyped_storage().nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return found


def count_bytes_at_fullest(model: nn.Module, run: Callable):
    """Run ``run()`` (a recording of ``model``); returns the most bytes of count buffers its
    recorder held at the end of a forward (when a batch's rows and the category totals are both
    alive: as ``finish_batch`` begins), and what ``run`` returned. Count buffers: every tensor the
    recorder holds except the per-token inputs and workspace (the batch's mask, the scratch
    buffers), which are activation-sized, not counts."""
    fullest = [0]
    original = Recorder.finish_batch

    def measured(recorder: Recorder):
        workspace = [recorder._on_device, recorder._scratch_buffers, recorder._mask]
        fullest[0] = max(fullest[0], sum(held_bytes(recorder, skip=workspace).values()))
        return original(recorder)

    Recorder.finish_batch = measured
    try:
        result = run()
    finally:
        Recorder.finish_batch = original
    return fullest[0], result
