"""An independent recomputation of SPARCOM counts, written for clarity rather than speed.

It captures the inputs of every dense MLP and MoE block during a model's own forward passes,
identifies each row's instruction from its token ids, and recounts firing neuron by neuron
from the module weights: no code is shared with sparcom.recording.recorder.
"""

from __future__ import annotations

import torch

from sparcom.recording.conversation import encode


def _gate_rows(mlp) -> torch.Tensor:
    if hasattr(mlp, "gate_proj"):
        return mlp.gate_proj.weight
    return mlp.gate_up_proj.weight[: mlp.gate_up_proj.out_features // 2]  # Phi-3


class Reference:
    """Attach to a model, run forwards (e.g. through sparcom.record), then call ``counts``."""

    def __init__(self, model, tokenizer, records, token_scope, dense_class, moe_class, sequences=None):
        """``sequences``: ``(ids [L], counted [L] bool)`` per record, instead of its encoded conversation."""
        self.model = model
        self.records = records
        if sequences is None:
            encoded = [encode(r, tokenizer) for r in records]
            sequences = [(e.input_ids, e.scope_mask(token_scope)) for e in encoded]
        self.index_of = {tuple(ids.tolist()): i for i, (ids, _) in enumerate(sequences)}
        self.scope = [counted for _, counted in sequences]
        self.captured = []  # (module name, input [B, L, H], ids [B, L], attention [B, L])
        self.handles = []
        self._batch = None
        self.handles.append(model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        for name, module in model.named_modules():
            if type(module).__name__ in (dense_class, moe_class):
                self.handles.append(module.register_forward_pre_hook(self._on_block(name)))
        self.modules = dict(model.named_modules())
        self.moe_class = moe_class

    def _on_model(self, module, args, kwargs):
        self._batch = (kwargs["input_ids"].clone(), kwargs["attention_mask"].clone())

    def _on_block(self, name):
        def hook(module, args):
            ids, attention = self._batch
            self.captured.append((name, args[0].detach().reshape(*ids.shape, -1).clone(), ids, attention))

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def counts(self) -> dict[str, torch.Tensor]:
        """site -> ``[N, *shape]`` int64 counts per instruction."""
        out: dict[str, torch.Tensor] = {}
        for name, inputs, ids, attention in self.captured:
            module = self.modules[name]
            for row in range(ids.shape[0]):
                length = int(attention[row].sum())
                key = tuple(ids[row, :length].tolist())
                if key not in self.index_of:
                    continue  # an empty padding batch
                i = self.index_of[key]
                x = inputs[row, :length][self.scope[i]]  # [T, H] counted tokens
                if type(module).__name__ == self.moe_class:
                    self._count_moe(out, name, module, i, x)
                else:
                    fired = (x @ _gate_rows(module).T) > 0  # [T, d_ff]
                    out.setdefault(name, torch.zeros(len(self.records), fired.shape[1], dtype=torch.long))
                    out[name][i] += fired.sum(0)
        return out

    def _count_moe(self, out, name, block, i, x):
        experts = block.experts
        num_experts = experts.gate_up_proj.shape[0]
        d_expert = experts.gate_up_proj.shape[1] // 2
        selected = block.gate(x)[2]  # [T, k]: the router's own choice for these tokens
        neurons = out.setdefault(
            f"{name}.experts", torch.zeros(len(self.records), num_experts, d_expert, dtype=torch.long)
        )
        router = out.setdefault(f"{name}.gate", torch.zeros(len(self.records), num_experts, dtype=torch.long))
        for t in range(x.shape[0]):
            for e in selected[t].tolist():
                router[i, e] += 1
                gate = x[t] @ experts.gate_up_proj[e, :d_expert].T  # [d_expert]
                neurons[i, e] += (gate > 0).long()
        # Shared experts are dense MLPs and were captured on their own.
