"""The response loss: mean next-token cross-entropy on each category's response tokens, over fixed
records tokenised and batched once. What ablation and steering measure under edited neurons, and
what training reports on held-out instructions beside the drift."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sparcom.data import Record
from sparcom.models.placement import input_device
from sparcom.models.sites import unwrap
from sparcom.recording.conversation import encode
from sparcom.recording.probe import length_bucketed, pad_batch, pad_id
from sparcom.recording.recorder import inference_mode


class ResponseLoss:
    """Mean next-token cross-entropy on each category's response tokens over fixed records:
    tokenised and batched once, evaluated as often as the model is changed."""

    def __init__(
        self,
        tokenizer,
        records: Sequence[Record],
        categories: Sequence[str],
        batch_size: int = 8,
        max_length: int | None = None,
    ):
        if not records:
            raise ValueError("no records to measure the response loss on")
        unknown = sorted({r["category"] for r in records} - set(categories))
        if unknown:
            raise ValueError(f"records of categories {unknown}; expected only {list(categories)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.categories = list(categories)
        encoded = [encode(r, tokenizer, max_length) for r in records]
        category_of = torch.tensor([self.categories.index(r["category"]) for r in records])
        padding = pad_id(tokenizer)
        scored = {r["category"] for r, e in zip(records, encoded, strict=True) if e.response_mask[1:].any()}
        silent = [c for c in self.categories if c not in scored]
        if silent:
            raise ValueError(
                f"no response tokens to score for categories {silent} (no records of them, or "
                f"max_length={max_length} cuts the responses off)"
            )
        self.batches = []
        for batch in length_bucketed([len(e.input_ids) for e in encoded], batch_size):
            ids, attention, scope = pad_batch([encoded[i] for i in batch], "response", padding)
            # Logits are needed from the position before the earliest response token on: the model
            # projects only those onto the vocabulary (logits_to_keep), not every prompt token.
            first = int(scope.float().argmax(1).min()) - 1
            self.batches.append((ids, attention, scope[:, 1:], category_of[batch], max(first, 0)))

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """``[C]`` float64 loss per category (0 for a category without response tokens)."""
        total = torch.zeros(len(self.categories), dtype=torch.float64)
        tokens = torch.zeros(len(self.categories), dtype=torch.float64)
        device = input_device(unwrap(model))
        with inference_mode(model):
            for ids, attention, mask, rows, first in self.batches:
                length = ids.shape[1]
                logits = model(
                    input_ids=ids.to(device),
                    attention_mask=attention.to(device),
                    use_cache=False,
                    logits_to_keep=length - first,
                ).logits[:, :-1]  # [B, L - 1 - first, V]: predictions of tokens first + 1 ... L - 1
                # Only the scored positions go through the softmax: [N, V] rather than [B, L, V].
                scored = mask[:, first:].to(logits.device)
                nll = torch.zeros(mask.shape, dtype=torch.float64, device=logits.device)  # [B, L-1]
                nll[:, first:][scored] = torch.nn.functional.cross_entropy(
                    logits[scored].float(), ids[:, first + 1 :].to(logits.device)[scored], reduction="none"
                ).double()  # token t predicted from t-1
                total.index_add_(0, rows, nll.sum(1).cpu())
                tokens.index_add_(0, rows, mask.sum(1).double())
        return total / tokens.clamp(min=1)
