"""Greedy continuations of prompts: what the ``"generated"`` token scope counts.

Every prompt is continued by the model itself, greedily (argmax at every step, nothing else: the
model's own sampling settings, repetition penalties and the like are set aside, so two models are
compared on what each of them finds most likely), for at most ``max_new_tokens`` tokens, stopping
at an end-of-sequence token, which is not kept. Prompts are batched longest first and padded on
the left, as generation needs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from sparcom.models.placement import input_device, rank_and_world
from sparcom.models.sites import unwrap
from sparcom.recording.conversation import Encoded


def stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """The end-of-sequence ids generation stops at: the model's generation config's and the
    tokenizer's (a base model borrowing a chat template may know only one of them)."""
    found: set[int] = set()
    config = getattr(unwrap(model), "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            found.update([value] if isinstance(value, int) else value)
    if not found:
        raise ValueError(
            "the model's generation config and the tokenizer name no end-of-sequence token; "
            "set tokenizer.eos_token (generation must know where a continuation ends)"
        )
    return sorted(found)


def greedy_continuations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Encoded],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[int]]:
    """Each prompt's greedy continuation, without its end-of-sequence token.

    Args:
        model: a HF causal LM (optionally wrapped); call it in eval mode without grad.
        prompts: conversations whose ``prompt_mask`` marks the prompt (the rest is ignored).
        max_new_tokens: the most tokens generated per prompt.

    Returns one list of token ids per prompt, in the order given. Under torch.distributed each
    rank generates its share of the batches and the continuations are shared, so every rank
    returns all of them; all ranks run the same number of ``generate`` calls and keep stepping
    until every rank is done (``synced_gpus``), as DeepSpeed ZeRO-3 needs for every forward.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    hf_model = unwrap(model)
    stops = stop_ids(hf_model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    ids = [e.needed_for("prompt").input_ids for e in prompts]
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    rank, world = rank_and_world()
    device = input_device(hf_model)
    # MoE models set up for training (TRL turns output_router_logits on) add the router's
    # load-balancing loss over the attention mask, which a cached step's router logits do not match.
    routers = (
        {"output_router_logits": False} if getattr(hf_model.config, "output_router_logits", False) else {}
    )
    mine: dict[int, list[int]] = {}
    rounds = math.ceil(len(batches) / world)
    with _greedy_only(hf_model):
        for index in tqdm(
            range(rank, rounds * world, world), desc="generate", disable=not progress or rank > 0
        ):
            # A rank without a batch this round still steps with the others on a stand-in prompt.
            rows = batches[index] if index < len(batches) else []
            input_ids, attention = _left_padded([ids[i] for i in rows or batches[0][:1]], pad_id)
            out = hf_model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=pad_id,
                use_cache=True,
                synced_gpus=world > 1,
                **routers,
            )
            for row, new in zip(rows, out[:, input_ids.shape[1] :].tolist(), strict=False):
                mine[row] = _until_stop(new, stops)
    if world > 1:
        shared: list[dict[int, list[int]]] = [{} for _ in range(world)]
        torch.distributed.all_gather_object(shared, mine)
        mine = {row: continuation for part in shared for row, continuation in part.items()}
    return [mine[i] for i in range(len(prompts))]


def _until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[:position]
    return tokens


def _left_padded(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` ids and attention mask, each row's tokens at the right end."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for row, tokens in enumerate(rows):
        input_ids[row, length - len(tokens) :] = tokens
        attention[row, length - len(tokens) :] = 1
    return input_ids, attention


@contextlib.contextmanager
def _greedy_only(model: nn.Module) -> Iterator[None]:
    """generate() fills every setting not passed to it from the model's generation config; a
    clean config for the while makes the decoding plain argmax whatever the checkpoint ships."""
    from transformers import GenerationConfig

    original = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = original
