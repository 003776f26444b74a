"""How many firing decisions a lower precision changes: the same weights, the same batches, run in
two dtypes (each on its own hidden states, as two recordings would be), decisions compared token by
token over the counted tokens:

- dense neurons (and shared experts): ``gate > 0`` per token and neuron;
- routers: the experts each token selects (a token whose top-k sets differ by one expert counts
  one of its k selections as differing);
- routed-expert neurons: ``gate > 0`` on the token-expert pairs both runs selected.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from sparcom.models.sites import find_sites, gate_weight
from sparcom.recording.conversation import encode
from sparcom.recording.probe import length_bucketed, pad_batch
from sparcom.recording.recorder import grouped_mm

KINDS = ("ffn", "router", "experts")


class Decisions:
    """Hooks that keep one forward's firing decisions per site (on the model's device)."""

    def __init__(self, model: nn.Module):
        self.decisions: dict[str, tuple] = {}
        self.handles = []
        for site, module in find_sites(model):
            if site.kind == "ffn":
                self.handles.append(module.register_forward_pre_hook(self._ffn(site.name)))
            elif site.kind == "experts":
                self.handles.append(
                    module.register_forward_pre_hook(self._experts(site.name), with_kwargs=True)
                )

    def _ffn(self, name):
        def hook(module, args):
            self.decisions[name] = (args[0].reshape(-1, args[0].shape[-1]) > 0,)  # [T, d]

        return hook

    def _experts(self, name):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # [T, H]
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]  # [T, k]
            weight = gate_weight(module)
            expert_ids, order = torch.sort(top_k_index.reshape(-1))
            ends = torch.searchsorted(
                expert_ids,
                torch.arange(weight.shape[0], device=expert_ids.device),
                right=True,
                out_int32=True,
            )
            gate = grouped_mm(hidden[order // top_k_index.shape[-1]], weight.transpose(1, 2), ends)  # [S, d]
            fired = torch.empty_like(gate, dtype=torch.bool)
            fired[order] = gate > 0  # back to pair order: [T*k, d]
            self.decisions[name] = (top_k_index, fired.view(*top_k_index.shape, -1))  # [T, k], [T, k, d]

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def compare(first: dict, second: dict, counted: torch.Tensor) -> Counter:
    """Differing and total decisions per kind, over the ``counted`` tokens (``[T]`` bool)."""
    tally = Counter()
    for name, decided in first.items():
        if len(decided) == 1:  # dense: [T, d]
            a, b = decided[0][counted], second[name][0][counted]
            tally["ffn differing"] += int((a != b).sum())
            tally["ffn total"] += a.numel()
            continue
        (index_a, fired_a), (index_b, fired_b) = decided, second[name]
        index_a, index_b, fired_a, fired_b = (
            index_a[counted],
            index_b[counted],
            fired_a[counted],
            fired_b[counted],
        )
        same = index_a[:, :, None] == index_b[:, None, :]  # [T, k, k]: slot i of a is slot j of b
        tally["router differing"] += int(index_a.numel() - same.sum())
        tally["router total"] += index_a.numel()
        token, i, j = same.nonzero(as_tuple=True)
        tally["experts differing"] += int((fired_a[token, i] != fired_b[token, j]).sum())
        tally["experts total"] += int(token.numel()) * fired_a.shape[-1]
    return tally


def decision_flips(first: nn.Module, second: nn.Module, tokenizer, records, batch_size: int = 8) -> dict:
    """Fraction of firing decisions that differ between two models over ``records``' prompts, per
    kind: ``{kind: {"differing", "total", "fraction"}}``. Typically the same weights in two dtypes."""
    encoded = [encode(r, tokenizer).needed_for("prompt") for r in records]
    tally = Counter()
    hooks = [Decisions(first), Decisions(second)]
    try:
        with torch.no_grad():
            for batch in length_bucketed([len(e.input_ids) for e in encoded], batch_size):
                input_ids, attention, scope = pad_batch(
                    [encoded[i] for i in batch], "prompt", tokenizer.pad_token_id
                )
                for model in (first, second):
                    device = next(model.parameters()).device
                    model(
                        input_ids=input_ids.to(device), attention_mask=attention.to(device), logits_to_keep=1
                    )
                counted = scope.reshape(-1).to(next(first.parameters()).device)
                tally += compare(hooks[0].decisions, hooks[1].decisions, counted)
    finally:
        for hook in hooks:
            hook.remove()
    return {
        kind: {
            "differing": tally[f"{kind} differing"],
            "total": tally[f"{kind} total"],
            "fraction": tally[f"{kind} differing"] / max(tally[f"{kind} total"], 1),
        }
        for kind in KINDS
        if tally[f"{kind} total"]
    }
