"""``record``: run a model over instructions and return a Snapshot of its firing counts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from sparcom.data import CATEGORIES, Record
from sparcom.models.placement import input_device, rank_and_world
from sparcom.models.sites import unwrap
from sparcom.recording.conversation import TOKEN_SCOPES, Encoded, continued, encode
from sparcom.recording.generation import greedy_continuations
from sparcom.recording.host_rows import HostRows, count_dtype
from sparcom.recording.recorder import Recorder, inference_mode
from sparcom.snapshot import Snapshot, dataset_hash
from sparcom.version import __version__


def length_bucketed(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of indices, longest first, so rows in a batch have similar length and padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class Recording:
    """How a recording counts (``Recording.of(cfg.sparcom)`` from a config).

    Attributes:
        token_scope: "prompt", "response" or "all": which tokens of each record's conversation are
            counted; "generated": the model's own greedy continuation of each prompt
            (``sparcom.recording.generation``), kept on the snapshot (``snapshot.generated``).
        batch_size: rows per forward; batches are length-bucketed, so padding is small and never counted.
        per_instruction: also keep counts per instruction (needed for overlap matrices and statistics).
        max_new_tokens: the longest continuation generated (token_scope "generated").
        max_length: conversations longer than this are cut (the response's end first); None: whole.
    """

    token_scope: str = "prompt"
    batch_size: int = 16
    per_instruction: bool = True
    max_new_tokens: int = 128
    max_length: int | None = None

    @classmethod
    def of(cls, sparcom, max_length: int | None = None) -> Recording:
        """From a config's ``sparcom`` section (``sparcom.config.SparcomConfig``)."""
        probe = sparcom.probe
        return cls(
            sparcom.token_scope, probe.batch_size, probe.per_instruction, sparcom.max_new_tokens, max_length
        )


def record(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    how: Recording | None = None,
    *,
    step: int | None = None,
    progress: bool = True,
) -> Snapshot:
    """Count how often every FFN neuron, expert neuron and expert fires on each category's tokens.

    Args:
        model: a supported HF causal LM (optionally wrapped by PEFT/DeepSpeed); left in its mode.
        tokenizer: its tokenizer, with a chat template.
        records: HexaInst-schema dicts.
        how: what is counted and how (``Recording``; default: prompt tokens, batches of 16,
            per-instruction counts kept).
        step: training step stored in the snapshot's metadata.
        progress: progress bars (on the main rank).

    Returns category counts as int64 and per-instruction counts in the narrowest integer dtype
    that holds them (int16 while no instruction counts more than 32,767 tokens, else int32), on
    the CPU. Memory: the model's devices hold one batch's counts per site plus the category totals
    (``sparcom.recording.recorder.count_memory``); each batch's per-instruction rows go to host memory as
    soon as it is done (asynchronously on CUDA). The model may be dispatched over several devices,
    offloaded layers included (``sparcom.models.loading.load_model(..., device_map=...)``).

    Under torch.distributed every rank must call this with the same records: each rank runs
    its share of batches (all ranks run the same number, as ZeRO-3 requires); category totals are
    summed across ranks, and each batch's per-instruction rows are sent from the rank that ran it
    to every other, one batch of one site at a time, so every rank returns the counts one process
    would give over everything.
    """
    how = how or Recording()
    token_scope, batch_size, max_new_tokens = how.token_scope, how.batch_size, how.max_new_tokens
    per_instruction, max_length = how.per_instruction, how.max_length
    if token_scope not in TOKEN_SCOPES:
        raise ValueError(f"unknown token_scope {token_scope!r}; expected one of {list(TOKEN_SCOPES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if token_scope == "generated" and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    if not records:
        raise ValueError("no records to record")
    unknown = sorted({r["category"] for r in records} - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; expected {list(CATEGORIES)}")
    categories = [c for c in CATEGORIES if any(r["category"] == c for r in records)]
    rank, world = rank_and_world()

    encoded = [
        encode(r, tokenizer, max_length).needed_for(token_scope)
        for r in tqdm(records, desc="tokenize", disable=not progress or rank)
    ]
    continuations = None
    if token_scope == "generated":
        with failing_together(rank, world), inference_mode(model):
            continuations = greedy_continuations(
                model, tokenizer, encoded, max_new_tokens, batch_size, progress
            )
        encoded = [continued(e, c) for e, c in zip(encoded, continuations, strict=True)]
    tokens = torch.tensor([int(e.scope_mask(token_scope).sum()) for e in encoded], dtype=torch.int64)
    category_of = torch.tensor([categories.index(r["category"]) for r in records])
    category_tokens = _sum_rows(tokens, category_of, len(categories))
    batches = length_bucketed([len(e.input_ids) for e in encoded], batch_size)

    hf_model = unwrap(model)
    recorder = Recorder(hf_model, len(categories), int(category_tokens.max()))
    sites = {site.name: site for site, _ in recorder.sites}
    host = None
    if per_instruction:
        pin = any(p.device.type == "cuda" for p in hf_model.parameters())
        shapes = {name: site.shape for name, site in sites.items()}
        host = HostRows(shapes, len(records), count_dtype(int(tokens.max())), batch_size, pin)
    with failing_together(rank, world), inference_mode(model), recorder:
        _run_batches(
            model, recorder, host, encoded, batches, category_of, token_scope, pad_id(tokenizer), progress
        )

    totals = _category_totals(recorder, len(categories), world)
    instruction_counts = None if host is None else _instruction_counts(host, batches, world)
    return Snapshot(
        categories=categories,
        category_tokens=category_tokens,
        category_counts=totals,
        site_kinds={name: site.kind for name, site in sites.items()},
        site_layers={name: site.layer for name, site in sites.items()},
        instruction_ids=[r["id"] for r in records] if per_instruction else [],
        instruction_categories=[r["category"] for r in records] if per_instruction else [],
        instruction_tokens=tokens if per_instruction else None,
        instruction_counts=instruction_counts,
        meta={
            "model": getattr(hf_model, "name_or_path", "") or getattr(hf_model.config, "name_or_path", ""),
            "model_type": hf_model.config.model_type,
            "config_hash": config_hash(hf_model.config),
            "dataset_hash": dataset_hash(records),
            "token_scope": token_scope,
            "step": step,
            "sparcom_version": __version__,
            "category_instructions": {c: sum(r["category"] == c for r in records) for c in categories},
            **({"max_new_tokens": max_new_tokens} if continuations is not None else {}),
        },
        generated={}
        if continuations is None
        else {r["id"]: c for r, c in zip(records, continuations, strict=True)},
        generated_text={}
        if continuations is None
        else {r["id"]: tokenizer.decode(c) for r, c in zip(records, continuations, strict=True)},
    )


@contextlib.contextmanager
def failing_together(rank: int, world: int) -> Iterator[None]:
    """Under torch.distributed, an error on one rank names the rank. The other ranks are blocked in a
    collective that this rank will never join: raising ends this process, and the launcher
    (torchrun, accelerate) then stops every rank of the job."""
    try:
        yield
    except Exception as err:
        if world == 1:
            raise
        raise RuntimeError(
            f"sparcom probe failed on rank {rank} of {world}: {type(err).__name__}: {err}"
        ) from err


def _run_batches(
    model: nn.Module,
    recorder: Recorder,
    host: HostRows | None,
    encoded: Sequence[Encoded],
    batches: list[list[int]],
    category_of: torch.Tensor,
    token_scope: str,
    pad_id: int,
    progress: bool = False,
) -> None:
    """The recording loop: this rank's share of ``batches`` through the model, counts to the
    recorder's category totals and, batch by batch, every row to ``host`` (in recording order:
    batch after batch). No host synchronisation: inputs go to the device without waiting, and
    nothing is read back until the loop is over."""
    rank, world = rank_and_world()
    starts = _starts(batches)
    device = input_device(unwrap(model))
    # ZeRO-3 makes every forward collective: all ranks run ceil(n / world) batches, empty ones included.
    rounds = math.ceil(len(batches) / world)
    for index in tqdm(
        range(rank, rounds * world, world),
        desc=f"record ({token_scope})",
        unit="batch",
        disable=not progress or rank,
    ):
        rows = batches[index] if index < len(batches) else []
        input_ids, attention, scope = pad_batch([encoded[i] for i in rows], token_scope, pad_id)
        recorder.set_batch(scope, category_of[rows] if rows else torch.zeros(1, dtype=torch.long))
        recorder.forward(
            model,
            input_ids=input_ids.to(device, non_blocking=True),
            attention_mask=attention.to(device, non_blocking=True),
            use_cache=False,
            logits_to_keep=1,  # counts need no logits: skip the vocabulary projection
        )
        counts = recorder.finish_batch()
        if host is not None:
            host.push(counts, starts[min(index, len(batches))], len(rows))


def _starts(batches: list[list[int]]) -> list[int]:
    """Where each batch's rows begin in recording order (and, last, the number of rows)."""
    starts = [0]
    for batch in batches:
        starts.append(starts[-1] + len(batch))
    return starts


def _category_totals(recorder: Recorder, num_categories: int, world: int) -> dict[str, torch.Tensor]:
    """Site -> ``[C, *shape]`` int64 counts on the CPU, summed over ranks; warns, naming the site,
    where a gate was NaN or infinite."""
    totals = {
        site.name: recorder.totals.get(site.name, torch.zeros((num_categories, *site.shape)))
        for site, _ in recorder.sites
    }
    if world > 1:
        for tensor in [*totals.values(), *recorder.checksums.values()]:
            _all_reduce(tensor)
    for site, checksum in recorder.checksums.items():
        if not torch.isfinite(checksum):
            warnings.warn(
                f"non-finite (NaN/inf) gate activations at {site}: NaN never counts as firing, +inf does; "
                "check the model's weights and dtype",
                stacklevel=3,
            )
    return {site: counts.to("cpu", torch.int64) for site, counts in totals.items()}


def _instruction_counts(host: HostRows, batches: list[list[int]], world: int) -> dict[str, torch.Tensor]:
    """Site -> ``[N, *shape]`` per-instruction counts in instruction order (every rank's rows)."""
    rows = host.wait()
    if world > 1:
        _share_rows(rows, batches)
    count = sum(len(batch) for batch in batches)
    position = torch.empty(count, dtype=torch.long)  # each instruction's row in recording order
    position[[i for batch in batches for i in batch]] = torch.arange(count)
    # One site at a time, so the reordering needs one site's rows more, not a second copy of all.
    return {site: rows.pop(site).index_select(0, position) for site in list(rows)}


def _collective_device() -> torch.device:
    """Where tensors must be for a collective of the default process group."""
    backend = str(torch.distributed.get_backend())
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def _all_reduce(tensor: torch.Tensor) -> None:
    staged = tensor.to(_collective_device())
    torch.distributed.all_reduce(staged)
    if staged is not tensor:
        tensor.copy_(staged)


def _share_rows(rows: dict[str, torch.Tensor], batches: list[list[int]]) -> None:
    """Give every rank every instruction's rows: the rank that ran a batch broadcasts its rows, one
    batch of one site at a time, so no more than that passes through the device at once. Rows are
    sent as bytes, since collectives do not all take narrow integers."""
    world = torch.distributed.get_world_size()
    device = _collective_device()
    starts = _starts(batches)
    for values in rows.values():
        for index, batch in enumerate(batches):
            chunk = values[starts[index] : starts[index] + len(batch)].view(torch.uint8)
            staged = chunk.to(device)
            torch.distributed.broadcast(staged, src=index % world)
            if staged is not chunk:
                chunk.copy_(staged)


def pad_id(tokenizer) -> int:
    """The id padded positions hold: the tokenizer's pad token, else 0 (masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_batch(
    rows: list[Encoded], token_scope: str, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, L]`` input ids, attention mask and counted-token mask (an empty batch: one pad)."""
    length = max((len(e.input_ids) for e in rows), default=1)
    batch = max(len(rows), 1)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    scope = torch.zeros((batch, length), dtype=torch.bool)
    for row, e in enumerate(rows):
        n = len(e.input_ids)
        input_ids[row, :n] = e.input_ids
        attention[row, :n] = 1
        scope[row, :n] = e.scope_mask(token_scope)
    if not rows:
        attention[0, 0] = 1
    return input_ids, attention, scope


def _sum_rows(values: torch.Tensor, rows_to: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros((size, *values.shape[1:]), dtype=values.dtype)
    return out.index_add_(0, rows_to, values)


def config_hash(config) -> str:
    """Hash of the architecture config, without fields that name files or versions."""
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


_VOLATILE = {"name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache"}
