"""Causal check: zero a category's ISNs and measure the response loss on every category,
against a control that zeroes as many random neurons drawn from the same sites."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from sparcom.conversation import encode
from sparcom.data import Record
from sparcom.models import check_resident
from sparcom.probe import length_bucketed, pad_batch
from sparcom.recorder import inference_mode
from sparcom.select import NeuronSet, category_isn
from sparcom.sites import unwrap
from sparcom.snapshot import Snapshot


def response_loss(model: nn.Module, tokenizer, records: Sequence[Record], categories: list[str],
                  batch_size: int = 8, max_length: int | None = None) -> torch.Tensor:  # fmt: skip
    """``[C]`` mean next-token cross-entropy on each category's response tokens."""
    encoded = [encode(r, tokenizer, max_length) for r in records]
    category_of = torch.tensor([categories.index(r["category"]) for r in records])
    total = torch.zeros(len(categories), dtype=torch.float64)
    tokens = torch.zeros(len(categories), dtype=torch.float64)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with inference_mode(model):
        for batch in length_bucketed([len(e.input_ids) for e in encoded], batch_size):
            ids, attention, scope = pad_batch([encoded[i] for i in batch], "response", pad_id)
            logits = model(
                input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False
            ).logits
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
            nll = -log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, L-1]: token t from t-1
            mask = scope[:, 1:]
            total.index_add_(0, category_of[batch], (nll * mask).sum(1).double())
            tokens.index_add_(0, category_of[batch], mask.sum(1).double())
    return total / tokens.clamp(min=1)


@contextlib.contextmanager
def zeroed(model: nn.Module, neurons: NeuronSet, site_kinds: dict[str, str]) -> Iterator[None]:
    """Silence neurons for the duration: zero their columns of the FFN's down projection (for a
    routed expert, its own slice), which removes exactly their contribution under every experts
    implementation. The weights are restored on exit."""
    check_resident(unwrap(model), "ablation")
    modules = dict(unwrap(model).named_modules())
    saved: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []
    with torch.no_grad():
        for site, chosen in neurons.items():
            if not bool(chosen.any()):
                continue
            module = modules[site]
            if site_kinds[site] == "ffn":
                index = (slice(None), chosen.nonzero().flatten())
                weight = module.down_proj.weight  # [H, d_ff]
            else:
                experts, units = chosen.nonzero(as_tuple=True)
                weight = module.down_proj  # [E, H, d], or [E, d, H] when transposed
                transposed = getattr(module, "is_transposed", False)
                index = (experts, units, slice(None)) if transposed else (experts, slice(None), units)
            saved.append((weight, index, weight[index].clone()))
            weight[index] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, index, original in saved:
                weight[index] = original


def random_like(neurons: NeuronSet, generator: torch.Generator) -> NeuronSet:
    """As many neurons as ``neurons`` has in each site, drawn uniformly from the same site."""
    control = {}
    for site, chosen in neurons.items():
        picked = torch.zeros(chosen.numel(), dtype=torch.bool)
        picked[torch.randperm(chosen.numel(), generator=generator)[: int(chosen.sum())]] = True
        control[site] = picked.reshape(chosen.shape)
    return control


def ablation_matrices(model: nn.Module, tokenizer, records: Sequence[Record], snapshot: Snapshot, epsilon: float,
                      mode: str = "threshold", seed: int = 0, batch_size: int = 8) -> dict:  # fmt: skip
    """Loss changes: ``delta[a, b]`` = response loss on category ``b`` with category ``a``'s ISNs
    zeroed, minus the intact loss; ``control[a, b]`` the same with random neurons of equal count
    per site. Returns both ``[C, C]`` matrices, the intact losses and the neuron counts."""
    check_resident(unwrap(model), "ablation")  # before the long intact pass
    categories = snapshot.categories
    generator = torch.Generator().manual_seed(seed)
    intact = response_loss(model, tokenizer, records, categories, batch_size)
    delta = torch.zeros(len(categories), len(categories), dtype=torch.float64)
    control = torch.zeros_like(delta)
    counts = []
    for row, category in enumerate(categories):
        neurons = category_isn(snapshot, category, epsilon, mode)
        counts.append(int(sum(int(s.sum()) for s in neurons.values())))
        with zeroed(model, neurons, snapshot.site_kinds):
            delta[row] = response_loss(model, tokenizer, records, categories, batch_size) - intact
        with zeroed(model, random_like(neurons, generator), snapshot.site_kinds):
            control[row] = response_loss(model, tokenizer, records, categories, batch_size) - intact
    return {"delta": delta, "control": control, "intact": intact, "neurons": counts}


def diagonal_dominance(matrix: torch.Tensor) -> dict:
    """How strongly each row's own category is hit: rows whose diagonal is the row maximum, and the
    mean diagonal against the mean off-diagonal entry."""
    size = matrix.shape[0]
    off = matrix[~torch.eye(size, dtype=torch.bool)]
    return {
        "rows_with_diagonal_max": int(sum(int(matrix[i].argmax() == i) for i in range(size))),
        "rows": size,
        "mean_diagonal": float(matrix.diagonal().mean()),
        "mean_off_diagonal": float(off.mean()),
    }
