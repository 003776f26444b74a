"""The one place that touches hooks: streaming firing counts while the model runs forward.

Per batch of ``B`` padded rows of length ``L`` (one row per instruction), every site yields
``[B, *site_shape]`` counts of how many of each row's counted tokens fired each neuron (or selected
each expert), on the device where that site runs:

- dense FFNs (shared experts included): a forward pre-hook on the activation module reads the
  gate pre-activation ``g`` it is given, so a count costs a comparison and a batched row sum;
- fused routed experts: while recording, the experts module runs transformers' grouped-matmul
  computation op for op (outputs bitwise those of its ``grouped_mm`` implementation), and counts
  every token-expert pair the router actually selected from the gate half of the projection that
  computation makes anyway. Counting therefore never projects a gate twice, and holds whichever
  experts implementation the model is configured with.

Nothing the model computes after its last site is needed for counts (the last layer's up and down
projections, the final norm, the vocabulary head): once every site has counted, the forward is cut
short with ``ForwardDone``, unless something else hooks the model's modules (DeepSpeed ZeRO-3,
accelerate's dispatch), whose bookkeeping expects every module to finish.

``finish_batch`` adds the rows into the category totals ``[C, *site_shape]`` on the same device and
hands them to the caller, which moves them to host memory (``sparcom.recording.host_rows``). Device memory for
counts is one batch's rows plus the category totals, whatever the number of instructions
(``count_memory``); the loop makes no host synchronisation (no ``.item()``/``.cpu()``), so
accelerator work stays asynchronous.

``NeuronTap`` reads the activation values of a few chosen neurons at every token instead (the
neuron explorer, ``sparcom.edit.explain``), under the same rules of what a neuron sees.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sparcom.models.sites import Site, find_sites, gate_weight


class ForwardDone(Exception):
    """Raised by the last site's hook once every site has counted: the rest of the forward is not
    needed. ``Recorder.forward`` catches it."""


@dataclass
class _Batch:
    """One batch's bookkeeping on one device."""

    mask: torch.Tensor  # [B, 1, L] float32: 1 for counted tokens
    token_row: torch.Tensor  # [B*L] long: each token's row, or B (a discard row) for tokens not counted
    categories: torch.Tensor  # [B] long: each row's category


class Recorder:
    """Counts, per batch row, how often each neuron (or expert) of every site fires.

    Use as a context manager (hooks are attached on entry and always removed on exit); per batch:
    ``set_batch(mask, categories)``, the model's forward, then ``finish_batch()``.
    """

    def __init__(self, model: nn.Module, num_categories: int, largest_total: int = 2**24 - 1):
        """``largest_total``: the most tokens any category counts (no count can exceed it)."""
        self.sites = find_sites(model)
        self.num_categories = num_categories
        self.total_dtype = exact_float(largest_total)
        # Per site, on the site's device: [C, *shape] category totals, allocated at the site's first call.
        self.totals: dict[str, torch.Tensor] = {}
        # A running sum of every gate value: NaN or inf anywhere makes it non-finite. One cheap
        # reduction per call, checked once after the loop, instead of an isfinite pass per batch.
        self.checksums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}  # this batch's [B, *shape] float32 counts per site
        self._detach: list[Callable[[], None]] = []
        self._mask = self._categories = None
        self._on_device: dict[torch.device, _Batch] = {}
        self._scratch_buffers: dict[tuple, torch.Tensor] = {}
        # Hook calls per forward (one per dense site, one per fused experts module), and whether the
        # forward may stop after the last of them (see the module's docstring).
        self.calls_per_forward = len({id(m) for _, m in self.sites})
        self._calls = 0
        self.stops_early = stops_early_safely(model)

    def forward(self, model: nn.Module, **inputs) -> None:
        """Run ``model`` on one batch (after ``set_batch``), as far as counting needs."""
        with contextlib.suppress(ForwardDone):
            model(**inputs)

    def set_batch(self, mask: torch.Tensor, categories: torch.Tensor) -> None:
        """``mask``: ``[B, L]`` bool, the tokens to count; ``categories``: ``[B]`` long, each row's category."""
        self._mask, self._categories = mask, categories
        self._on_device = {}
        self.rows = {}
        self._calls = 0

    def finish_batch(self) -> dict[str, torch.Tensor]:
        """Add this batch's rows into the category totals; returns them (``[B, *shape]`` per site,
        on the site's device, valid until the next ``set_batch``)."""
        for name, rows in self.rows.items():
            totals = self.totals[name]
            totals.index_add_(0, self._batch(rows.device).categories, rows.to(totals.dtype))
        return self.rows

    def __enter__(self) -> Recorder:
        experts_sites: dict[int, dict[str, str]] = {}
        for site, module in self.sites:
            if site.kind == "ffn":
                handle = module.register_forward_pre_hook(self._ffn_hook(site.name))
                self._detach.append(handle.remove)
            else:
                experts_sites.setdefault(id(module), {})[site.kind] = site.name
        for module in {id(m): m for s, m in self.sites if s.kind != "ffn"}.values():
            if getattr(module, "_is_expert_parallel", False):
                raise ValueError(
                    f"{type(module).__name__} is sharded expert-parallel; record it in one process "
                    "(or under DeepSpeed), where every rank holds every expert"
                )
            forward = self._experts_forward(module, experts_sites[id(module)])
            self._detach.append(_replace_forward(module, forward))
        return self

    def __exit__(self, *exc) -> None:
        for detach in self._detach:
            detach()
        self._detach.clear()

    # ------------------------------------------------------------------------------- hooks

    def _batch(self, device: torch.device) -> _Batch:
        """The batch's mask and rows on ``device``, moved there once per batch (sites of a model
        dispatched over several devices each read their own copy)."""
        batch = self._on_device.get(device)
        if batch is None:
            rows, length = self._mask.shape
            token_row = torch.where(self._mask, torch.arange(rows)[:, None], rows).reshape(-1)
            batch = self._on_device[device] = _Batch(
                mask=self._mask.to(device, torch.float32, non_blocking=True)[:, None, :],
                token_row=token_row.to(device, non_blocking=True),
                categories=self._categories.to(device, non_blocking=True),
            )
        return batch

    def _keep(self, name: str, rows: torch.Tensor) -> None:
        """This batch's rows of a site; its category totals are allocated beside them on first use."""
        self.rows[name] = rows
        if name not in self.totals:
            shape = (self.num_categories, *rows.shape[1:])
            self.totals[name] = torch.zeros(shape, dtype=self.total_dtype, device=rows.device)

    def _checksum(self, name: str, gate: torch.Tensor) -> None:
        checksum = self.checksums.get(name)
        if checksum is None:
            checksum = self.checksums[name] = torch.zeros((), dtype=torch.float64, device=gate.device)
        # Summed in the gate's own dtype (a float32 sum of bfloat16 costs several times more on CPU):
        # NaN and inf survive any sum, and finite activations cannot add up past bfloat16's range,
        # though they can past float16's.
        checksum.add_(gate.sum(dtype=torch.float32 if gate.dtype == torch.float16 else None))

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """A reusable buffer for a hook's large temporaries: sized by the largest batch so far, and
        shared by the sites of one device (hooks run one after another). Fresh allocations of this
        size cost page faults on CPU on every call."""
        size = math.prod(shape)
        if torch.device(device).type != "cpu":  # caching allocators already reuse memory
            return torch.empty(shape, dtype=dtype, device=device)
        key = (name, dtype, device)
        buffer = self._scratch_buffers.get(key)
        if buffer is None or buffer.numel() < size:
            buffer = self._scratch_buffers[key] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:size].view(shape)

    def _ffn_hook(self, name: str):
        def hook(module, args):
            gate = args[0]  # [B, L, d_ff] or [B*L, d_ff]
            batch = self._batch(gate.device)
            self._checksum(name, gate)
            # 0/1 as float32, then one batched matmul [B, 1, L] @ [B, L, d_ff] sums each row's counted
            # tokens (faster than mask-and-sum; exact for any L below 2**24).
            fired = torch.gt(gate, 0, out=self._scratch("fired", gate.shape, torch.float32, gate.device))
            fired = fired.view(batch.mask.shape[0], batch.mask.shape[2], -1)
            self._keep(name, torch.bmm(batch.mask, fired).squeeze(1))
            self._counted()

        return hook

    def _counted(self) -> None:
        """One more site has counted this forward; after the last one, stop it (when safe)."""
        self._calls += 1
        if self.stops_early and self._calls == self.calls_per_forward:
            raise ForwardDone

    def _experts_forward(self, module: nn.Module, names: dict[str, str]):
        """The fused experts' forward while recording: transformers' ``grouped_mm`` computation, op
        for op, which also counts every token-expert pair from the gate half of the projection it
        computes anyway. Counting costs a comparison and a scatter, not a second gate projection."""

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
            # hidden_states: [T, H] with T = B*L; top_k_index, top_k_weights: [T, k], the router's choice.
            gate_up, down = module.gate_up_proj, module.down_proj
            if not getattr(module, "is_transposed", False):
                gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)  # [E, H, 2d], [E, d, H]
            num_experts, width = gate_up.shape[0], gate_up.shape[2] // 2
            tokens, top_k = top_k_index.shape
            expert_ids, order = torch.sort(top_k_index.reshape(-1))  # token-expert pairs by expert
            token = order // top_k  # [S]
            ends = torch.searchsorted(
                expert_ids, torch.arange(num_experts, device=expert_ids.device), right=True, out_int32=True
            )  # [E]: where each expert's pairs end
            projected = grouped_mm(hidden_states.index_select(0, token), gate_up, ends)  # [S, 2d]
            gate = projected[:, :width] if getattr(module, "is_concatenated", True) else projected[:, 0::2]
            self._count_pairs(names, gate, token, expert_ids, num_experts)
            self._counted()
            out = grouped_mm(module._apply_gate(projected), down, ends)  # [S, H]
            if getattr(module, "has_post_expert_norm", False):
                out = module.post_expert_norm(out)
            out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
            unsorted = torch.empty_like(order)
            unsorted[order] = torch.arange(order.shape[0], device=order.device)
            return out[unsorted].view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

        return forward

    def _count_pairs(self, names, gate: torch.Tensor, token, expert_ids, num_experts: int) -> None:
        """``gate``: ``[S, d]`` pre-activations of token-expert pairs; ``token``, ``expert_ids``: ``[S]``."""
        batch = self._batch(gate.device)
        rows = batch.mask.shape[0]
        self._checksum(names["experts"], gate)
        # Each pair's cell in a [B+1, E] grid: pairs of uncounted tokens land in row B, which is
        # dropped, so no pair needs masking.
        cell = torch.add(expert_ids, batch.token_row[token], alpha=num_experts)
        grid = (rows + 1) * num_experts
        # float32 sums of 0/1 are exact below 2**24 in any order, and index_add is vectorised for
        # floats (several times faster on CPU than for int32).
        fired = torch.gt(gate, 0, out=self._scratch("fired", gate.shape, torch.float32, gate.device))
        neurons = torch.zeros((grid, gate.shape[1]), dtype=torch.float32, device=gate.device)
        neurons.index_add_(0, cell, fired)
        # (bincount would read its input's maximum back to the host on CUDA)
        selected = torch.zeros(grid, dtype=torch.float32, device=gate.device)
        selected.index_add_(0, cell, torch.ones(cell.shape, dtype=torch.float32, device=gate.device))
        self._keep(names["experts"], neurons.view(rows + 1, num_experts, -1)[:rows])
        self._keep(names["router"], selected.view(rows + 1, num_experts)[:rows])


class NeuronTap:
    """The activations ``act(gate(x))`` of a few chosen neurons at every token, batch by batch.

    ``chosen``: site -> ``[K]`` long, flat indices into the site's neurons (``i`` of ``[d_ff]``, or
    ``e * d_expert + i`` of ``[num_experts, d_expert]``). Use as a context manager; per batch:
    ``set_batch(rows, length)``, the model's forward, then read ``activations``: site ->
    ``[B, L, K]`` float32 on the site's device, valid until the next ``set_batch``. A routed-expert
    neuron reads ``-inf`` on tokens the router did not send to its expert: it does not fire there,
    and the counts leave those tokens out too.

    Dense FFNs are read from the output of their activation module (the value the model computes);
    routed experts from the inputs of the fused experts module (the router's actual selection),
    projecting the chosen neurons' gate rows only.
    """

    def __init__(self, model: nn.Module, chosen: dict[str, torch.Tensor]):
        found = {site.name: (site, module) for site, module in find_sites(model)}
        unknown = sorted(set(chosen) - {n for n, (s, _) in found.items() if s.kind != "router"})
        if unknown:
            raise ValueError(f"no neuron site {unknown[0]!r} in this model")
        self.sites = {name: found[name] for name in chosen}
        self.chosen = chosen
        self.activations: dict[str, torch.Tensor] = {}
        self._shape: tuple[int, int] = (0, 0)
        self._detach: list[Callable[[], None]] = []

    def set_batch(self, rows: int, length: int) -> None:
        self._shape = (rows, length)
        self.activations = {}

    def __enter__(self) -> NeuronTap:
        for name, (site, module) in self.sites.items():
            if site.kind == "ffn":
                self._detach.append(module.register_forward_hook(self._ffn_hook(name)).remove)
            else:
                self._detach.append(_replace_forward(module, self._experts_forward(module, name, site)))
        return self

    def __exit__(self, *exc) -> None:
        for detach in self._detach:
            detach()
        self._detach.clear()

    def _ffn_hook(self, name: str):
        def hook(module, args, output):
            columns = self.chosen[name].to(output.device)
            self.activations[name] = output.index_select(-1, columns).reshape(*self._shape, -1).float()

        return hook

    def _experts_forward(self, module: nn.Module, name: str, site: Site):
        """The experts' own forward, after reading the chosen neurons. It runs where the weights are
        in place (inside accelerate's offload wrapper, as the recorder's does)."""
        original = module._old_forward if hasattr(module, "_hf_hook") else module.forward

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
            # hidden_states: [T, H] with T = B*L; top_k_index: [T, k], the router's choice.
            flat = self.chosen[name].to(hidden_states.device)
            experts, neurons = flat // site.shape[1], flat % site.shape[1]
            rows = gate_weight(module)[experts, neurons]  # [K, H]
            activation = module.act_fn(hidden_states.to(rows.dtype) @ rows.T)  # [T, K]
            routed = (top_k_index[:, :, None] == experts[None, None, :]).any(1)  # [T, K]
            activation = activation.float().masked_fill(~routed, float("-inf"))
            self.activations[name] = activation.reshape(*self._shape, -1)
            return original(hidden_states, top_k_index, top_k_weights)

        return forward


def stops_early_safely(model: nn.Module) -> bool:
    """Whether a forward of ``model`` may end by an exception once counting is done: not when
    DeepSpeed ZeRO-3 partitions its parameters or accelerate's hooks dispatch its modules (both
    gather or offload weights around each module's forward and expect every module to finish)."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return False
    return not any(hasattr(m, "_hf_hook") for m in model.modules())


def _replace_forward(module: nn.Module, forward) -> Callable[[], None]:
    """Make ``forward`` the module's forward for a while; returns the function that restores it.

    Module hooks (DeepSpeed ZeRO-3 gathers parameters in one) still run around it. An
    accelerate-dispatched module keeps its offload wrapper as ``forward``, which loads the weights
    and then calls ``_old_forward``: that is the one replaced there."""
    name = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
    own = vars(module)
    had, original = name in own, own.get(name)
    setattr(module, name, forward)
    return lambda: setattr(module, name, original) if had else delattr(module, name)


def grouped_mm(inputs: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``inputs[s] @ weight[e]`` for rows grouped by ``e``.

    Args:
        inputs: ``[S, K]``, rows sorted by group. weight: ``[E, K, N]``.
        ends: ``[E]`` int32, where each group's rows end (rows beyond the last are left out).
    Returns:
        ``[S, N]``; rows beyond ``ends[-1]`` are unspecified.
    """
    inputs = inputs.to(weight.dtype)
    with contextlib.suppress(RuntimeError, AttributeError):
        # grouped_mm takes device-side offsets: no host synchronisation.
        return torch.nn.functional.grouped_mm(inputs, weight, offs=ends)
    # Other dtypes (float64), unaligned weights, old GPUs: one matmul per group, one sync for the sizes.
    out = inputs.new_zeros(inputs.shape[0], weight.shape[2])
    start = 0
    for group, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = inputs[start:end] @ weight[group]
        start = end
    return out


def exact_float(largest: int) -> torch.dtype:
    """The float dtype that sums counts up to ``largest`` exactly: float32 below 2**24 (every integer
    there is representable, so the order of additions does not matter), else float64. Counts are
    kept in floats on the device because index_add and matmul are vectorised for floats."""
    return torch.float32 if largest < 2**24 else torch.float64


@dataclass(frozen=True)
class CountMemory:
    """Bytes of count buffers: ``device`` (one batch's rows, the category totals, checksums and, on
    CUDA, the staging buffers of the copies to host) and ``host`` (every instruction's rows)."""

    device: int
    host: int


def count_memory(
    sites: list[Site],
    batch_size: int,
    num_categories: int,
    num_instructions: int,
    instruction_dtype: torch.dtype | None = torch.int16,
    total_dtype: torch.dtype = torch.float32,
    staging: bool = False,
) -> CountMemory:
    """What ``record`` holds for counts, from the site shapes alone. On the device: one batch's
    float32 rows (an experts or router site's with one more, discarded, row),
    the category totals, and a float64 checksum per gate (ffn and experts sites). On the host:
    ``num_instructions`` rows of ``instruction_dtype`` (None: no per-instruction counts).
    ``staging``: CUDA, where rows pass through two narrow device buffers on their way to the host."""
    rows = totals = narrow = 0
    for site in sites:
        units = math.prod(site.shape)
        totals += num_categories * units * total_dtype.itemsize + (8 if site.kind != "router" else 0)
        rows += (batch_size if site.kind == "ffn" else batch_size + 1) * units * 4
        narrow += units * (instruction_dtype.itemsize if instruction_dtype else 0)
    device = rows + totals + (2 * batch_size * narrow if staging else 0)
    return CountMemory(device=device, host=num_instructions * narrow)


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
