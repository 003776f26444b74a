"""The one place that touches hooks: streaming firing counts while the model runs forward.

Counts accumulate on the model's device into ``[G, *site_shape]`` int32 tensors, one row per
group (an instruction, or a category when per-instruction statistics are off). Per batch, the
hooks see the FFN inputs of ``B`` padded rows of length ``L`` and add, for every row, how many of
its counted tokens fired each neuron. Nothing per-token outlives the batch, and the loop has no
host synchronisation (no ``.item()``/``.cpu()``), so accelerator work stays asynchronous.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from sparcom.sites import Site, find_sites, gate_weight


class Recorder:
    """Hooks that count, for each site, how often each neuron (or expert) fires per group.

    Use as a context manager: hooks are attached on entry and always removed on exit.
    Before each forward call ``set_batch(mask, groups)``.
    """

    def __init__(self, model: nn.Module, num_groups: int):
        self.sites = find_sites(model)
        device = next(model.parameters()).device
        self.device = device
        self.num_groups = num_groups
        self.counts: dict[str, torch.Tensor] = {
            site.name: torch.zeros((num_groups, *site.shape), dtype=torch.int32, device=device)
            for site, _ in self.sites
        }
        # A running sum of every gate value: NaN or inf anywhere makes it non-finite. One cheap
        # reduction per call, checked once after the loop, instead of an isfinite pass per batch.
        self.checksums: dict[str, torch.Tensor] = {
            site.name: torch.zeros((), dtype=torch.float64, device=device)
            for site, _ in self.sites
            if site.kind != "router"
        }
        self._handles: list = []
        self._mask: torch.Tensor | None = None
        self._groups: torch.Tensor | None = None

    def set_batch(self, mask: torch.Tensor, groups: torch.Tensor) -> None:
        """``mask``: ``[B, L]`` bool, the tokens to count; ``groups``: ``[B]`` long, each row's group."""
        self._mask = mask.to(self.device, non_blocking=True)
        self._groups = groups.to(self.device, non_blocking=True)
        # MoE blocks see tokens flattened to [B*L]: the same mask and groups, one entry per token.
        self._mask_flat = self._mask.reshape(-1)
        self._mask_float = self._mask.to(torch.float32)[:, None, :]  # [B, 1, L]
        self._groups_flat = self._groups.repeat_interleave(mask.shape[1])

    def __enter__(self) -> Recorder:
        by_module: dict[int, list[Site]] = {}
        for site, module in self.sites:
            by_module.setdefault(id(module), []).append(site)
        seen: set[int] = set()
        for site, module in self.sites:
            if id(module) in seen:
                continue
            seen.add(id(module))
            if site.kind == "ffn":
                self._handles.append(module.register_forward_pre_hook(self._ffn_hook(site)))
            else:
                names = {s.kind: s.name for s in by_module[id(module)]}
                self._handles.append(
                    module.register_forward_pre_hook(self._experts_hook(names), with_kwargs=True)
                )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------------------- hooks

    def _row_sums(self, fired: torch.Tensor) -> torch.Tensor:
        """``fired``: ``[B*L, X]`` or ``[B, L, X]`` bool -> ``[B, X]`` int32 counts over counted tokens.

        One batched matmul ``[B, 1, L] @ [B, L, X]`` (faster than mask-and-sum); float32 sums of
        0/1 are exact for any L below 2**24."""
        batch, length = self._mask.shape
        fired = fired.reshape(batch, length, -1).to(torch.float32)
        return torch.bmm(self._mask_float, fired).squeeze(1).to(torch.int32)

    def _ffn_hook(self, site: Site):
        counts = self.counts[site.name]
        checksum = self.checksums[site.name]

        def hook(module, args):
            gate = args[0]
            checksum.add_(gate.sum(dtype=torch.float32))
            counts.index_add_(0, self._groups, self._row_sums(gate > 0))

        return hook

    def _experts_hook(self, names: dict[str, str]):
        neuron_counts = self.counts[names["experts"]]
        router_counts = self.counts[names["router"]]
        checksum = self.checksums[names["experts"]]
        num_experts = router_counts.shape[1]
        # One row per (group, expert): a pair's counts land at group * E + expert.
        neuron_rows = neuron_counts.view(self.num_groups * num_experts, -1)
        router_rows = router_counts.view(self.num_groups * num_experts)

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # [B*L, H]
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]  # [B*L, k]
            # Token-expert pairs sorted by expert (indices >= E are expert-parallel sentinels).
            expert_ids, order = torch.sort(top_k_index.reshape(-1))
            token_of_pair = order // top_k_index.shape[-1]  # [S]
            counted = self._mask_flat[token_of_pair] & (expert_ids < num_experts)  # [S]
            rows = self._groups_flat[token_of_pair] * num_experts + expert_ids.clamp(max=num_experts - 1)
            router_rows.index_add_(0, rows, counted.to(torch.int32))
            gate = expert_gate(hidden[token_of_pair], gate_weight(module), expert_ids, num_experts)  # [S, d]
            checksum.add_(gate.sum(dtype=torch.float32))
            neuron_rows.index_add_(0, rows, ((gate > 0) & counted[:, None]).to(torch.int32))

        return hook


def expert_gate(
    hidden: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Gate pre-activations of token-expert pairs sorted by expert.

    Args:
        hidden: ``[S, H]`` the token of each pair. weight: ``[E, d, H]`` gate weights.
        expert_ids: ``[S]`` sorted expert of each pair (values >= E, if any, sort last and are ignored).
    Returns:
        ``[S, d]``; rows of ignored pairs are unspecified.
    """
    sizes = torch.bincount(expert_ids.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts]
    offsets = torch.cumsum(sizes, dim=0, dtype=torch.int32)
    hidden = hidden.to(weight.dtype)
    with contextlib.suppress(RuntimeError, AttributeError):
        # grouped_mm takes device-side offsets: no host synchronisation.
        return torch.nn.functional.grouped_mm(hidden, weight.transpose(1, 2), offs=offsets)
    # Fallback (unaligned weights, old torch): one matmul per expert, one sync for the sizes.
    out = hidden.new_zeros(hidden.shape[0], weight.shape[1])
    start = 0
    for expert, size in enumerate(sizes.tolist()):
        if size:
            out[start : start + size] = hidden[start : start + size] @ weight[expert].T
        start += size
    return out


@contextlib.contextmanager
def inference_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for a probe; restores train mode and gradient checkpointing after."""
    was_training = model.training
    checkpointing = _checkpointing(model)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if checkpointing and not _checkpointing(model):
            model.gradient_checkpointing_enable()
        _forget_zero3_trace(model)


def _forget_zero3_trace(model: nn.Module) -> None:
    """ZeRO-3 records the module order of one forward+backward and prefetches parameters by it;
    a forward-only probe would be taken for that trace and break the next backward. Invalidate
    it, so the next training step records afresh. (No-op without DeepSpeed.)"""
    for module in (model, getattr(model, "module", None)):
        for hook in getattr(module, "_forward_pre_hooks", {}).values():
            offload = _closure_owner(hook, "get_param_coordinator")
            coordinator = offload.get_param_coordinator() if offload is not None else None
            if coordinator is not None and not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()


def _closure_owner(function, attribute: str, depth: int = 3):
    """The object with ``attribute`` captured by a hook function (DeepSpeed wraps its hooks in
    decorators, so the search goes a few closures deep)."""
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if hasattr(value, attribute):
            return value
        if depth and callable(value):
            found = _closure_owner(value, attribute, depth - 1)
            if found is not None:
                return found
    return None


def _checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing; read whichever this version has.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or hasattr(model, name):
            return bool(getattr(model, name))
    return False
