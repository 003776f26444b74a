"""The neuron explorer: each category's most specific neurons and the probe contexts that
activate them most, as neuron viewers show them.

A neuron's specificity for category ``c`` is its frequency gap ``p_c - max_{c' != c} p_c'``, read
from a snapshot's category counts one site at a time. Its top contexts come from one streaming
pass over the probe set: per batch, the chosen neurons' activations ``act(gate(x))`` at every
counted token (``sparcom.recording.recorder.NeuronTap``) are merged into a running top-k per neuron on the
model's device, and nothing else of the batch is kept. Routed-expert neurons count only on tokens
routed to their expert, as in the counts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sparcom.data import Record
from sparcom.models.placement import input_device
from sparcom.models.sites import find_sites, unwrap
from sparcom.recording.conversation import Encoded, continued, encode
from sparcom.recording.probe import length_bucketed, pad_batch, pad_id
from sparcom.recording.recorder import NeuronTap, inference_mode
from sparcom.snapshot import Snapshot
from sparcom.stats.select import NEURON_KINDS

MARK = ("⟦", "⟧")  # around the token in a context's text
WINDOW = (12, 6)  # tokens shown before and after it


@dataclass(frozen=True)
class Neuron:
    """One neuron: ``index`` is ``(i,)`` in a dense FFN, ``(expert, i)`` in routed experts."""

    site: str
    index: tuple[int, ...]
    category: str  # the category it is specific to
    gap: float  # p_category - the largest p of any other category
    frequency: dict[str, float]  # p per category

    @property
    def label(self) -> str:
        return f"{self.site}:{','.join(map(str, self.index))}"

    def column(self, shape: tuple[int, ...]) -> int:
        """Its place among the site's neurons flattened (``[d_ff]``, or ``[num_experts * d_expert]``)."""
        return _column(self.index, shape)


@dataclass(frozen=True)
class Context:
    """A counted token where a neuron fired strongly, with the text around it."""

    instruction_id: str
    position: int  # index into the token ids the recorder counts for that instruction
    token: str
    activation: float  # act(gate(x)) there
    before: str
    after: str

    @property
    def text(self) -> str:
        return f"{self.before}{MARK[0]}{self.token}{MARK[1]}{self.after}"


@dataclass(frozen=True)
class NeuronCard:
    neuron: Neuron
    top: list[Context]  # largest activation first

    def to_json(self) -> dict:
        index = self.neuron.index
        return {
            "site": self.neuron.site,
            "index": index[0] if len(index) == 1 else list(index),
            "category": self.neuron.category,
            "gap": self.neuron.gap,
            "frequency": self.neuron.frequency,
            "top": [
                {
                    "instruction_id": c.instruction_id,
                    "position": c.position,
                    "token": c.token,
                    "activation": c.activation,
                    "context": c.text,
                }
                for c in self.top
            ],
        }


# ------------------------------------------------------------------------------- selection


def specificity(frequency: torch.Tensor) -> torch.Tensor:
    """``[C, W]`` -> ``[C, W]``: ``p_c - max_{c' != c} p_c'`` (``p_c`` itself with one category)."""
    if frequency.shape[0] == 1:
        return frequency.clone()
    top2 = frequency.topk(2, dim=0).values  # [2, W]
    is_largest = frequency == top2[0]
    # The largest other is the runner-up for the (first) largest and the largest for every other.
    others = torch.where(is_largest, top2[1], top2[0])
    return frequency - others


def most_specific(snapshot: Snapshot, per_category: int) -> list[Neuron]:
    """Each category's ``per_category`` neurons with the largest positive frequency gap, category by
    category, largest gap first (ties: site order, then index). Reads one site's counts at a time."""
    if per_category < 1:
        raise ValueError(f"per_category must be a positive integer, got {per_category}")
    categories = snapshot.categories
    best: dict[str, list[Neuron]] = {c: [] for c in categories}
    for site in _neuron_sites(snapshot):
        frequency = _frequency(snapshot, site)
        gaps = specificity(frequency)
        for row, category in enumerate(categories):
            values, columns = torch.sort(gaps[row], descending=True, stable=True)
            found = [
                Neuron(
                    site,
                    _index(snapshot, site, column),
                    category,
                    gap,
                    _per_category(frequency, column, categories),
                )
                for gap, column in zip(
                    values[:per_category].tolist(), columns[:per_category].tolist(), strict=True
                )
                if gap > 0
            ]
            # Sorting is stable: at equal gaps, earlier sites and lower indices stay first.
            best[category] = sorted(best[category] + found, key=lambda n: -n.gap)[:per_category]
    return [neuron for category in categories for neuron in best[category]]


def parse_neuron(spec: str, shapes: dict[str, tuple[int, ...]]) -> tuple[str, tuple[int, ...]]:
    """``(site, index)`` of ``<site>:<i>`` (dense FFN) or ``<site>:<expert>,<i>`` (routed experts),
    given the neuron sites' shapes; a site or index that does not exist raises one line naming it."""
    sites = list(shapes)
    site, _, index = spec.strip().rpartition(":")
    if site not in shapes:
        shown = ", ".join(sites[:4]) + (", ..." if len(sites) > 4 else "")
        raise ValueError(
            f"neuron {spec!r}: no neuron site {site or spec!r}; expected <site>:<index> with one of the "
            f"{len(sites)} neuron sites ({shown})"
        )
    shape = shapes[site]
    names = ("i",) if len(shape) == 1 else ("expert", "i")
    try:
        parts = tuple(int(part) for part in index.replace(" ", "").split(","))
    except ValueError:
        parts = ()
    if len(parts) != len(shape) or any(not 0 <= p < n for p, n in zip(parts, shape, strict=True)):
        bounds = " and ".join(f"0 <= {n} < {size}" for n, size in zip(names, shape, strict=True))
        raise ValueError(
            f"neuron {spec!r}: index {index!r} does not exist in {site}; "
            f"expected {','.join(names)} with {bounds}"
        )
    return site, parts


def neuron_named(snapshot: Snapshot, spec: str) -> Neuron:
    """The neuron ``spec`` names (as ``parse_neuron`` reads it), with the category it is most frequent in."""
    site, index = parse_neuron(spec, {s: snapshot.site_shape(s) for s in _neuron_sites(snapshot)})
    shape = snapshot.site_shape(site)
    column = _column(index, shape)
    frequency = _frequency(snapshot, site)
    row = int(frequency[:, column].argmax())
    gap = float(specificity(frequency[:, column : column + 1])[row, 0])
    return Neuron(
        site, index, snapshot.categories[row], gap, _per_category(frequency, column, snapshot.categories)
    )


def _neuron_sites(snapshot: Snapshot) -> list[str]:
    return [s for s, kind in snapshot.site_kinds.items() if kind in NEURON_KINDS]


def _frequency(snapshot: Snapshot, site: str) -> torch.Tensor:
    """``[C, W]`` float64 frequencies of one site's neurons, flattened."""
    counts = snapshot.category_counts[site].double()
    return counts.reshape(counts.shape[0], -1) / snapshot.category_tokens.double().clamp(min=1)[:, None]


def _per_category(frequency: torch.Tensor, column: int, categories: list[str]) -> dict[str, float]:
    return dict(zip(categories, frequency[:, column].tolist(), strict=True))


def _index(snapshot: Snapshot, site: str, column: int) -> tuple[int, ...]:
    shape = snapshot.site_shape(site)
    return (column,) if len(shape) == 1 else divmod(column, shape[1])


def _column(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """The inverse of ``_index``: ``(i,)`` or ``(expert, i)`` -> the column among the site's neurons flattened."""
    return index[0] if len(index) == 1 else index[0] * shape[1] + index[1]


# --------------------------------------------------------------------------- the streaming pass


class RunningTop:
    """The ``top`` largest values seen per neuron, with where they were (pure tensor work).

    ``values``: ``[K, top]`` (``-inf`` where fewer were seen); ``rows``, ``positions``: ``[K, top]``.
    """

    def __init__(self, neurons: int, top: int, device: torch.device | str = "cpu"):
        self.values = torch.full((neurons, top), float("-inf"), device=device)
        self.rows = torch.full((neurons, top), -1, dtype=torch.long, device=device)
        self.positions = torch.full((neurons, top), -1, dtype=torch.long, device=device)

    def update(self, activations: torch.Tensor, rows: torch.Tensor) -> None:
        """``activations``: ``[B, L, K]`` (``-inf`` where not counted); ``rows``: ``[B]`` ids of the batch's rows."""
        batch, length, neurons = activations.shape
        flat = activations.reshape(batch * length, neurons).T.to(self.values.device)  # [K, B*L]
        take = min(self.values.shape[1], flat.shape[1])
        values, where = flat.topk(take, dim=1)
        values = torch.cat([self.values, values], dim=1)
        rows_seen = torch.cat([self.rows, rows.to(where.device)[where // length]], dim=1)
        positions = torch.cat([self.positions, where % length], dim=1)
        self.values, keep = values.topk(self.values.shape[1], dim=1)
        self.rows, self.positions = rows_seen.gather(1, keep), positions.gather(1, keep)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, rows, positions)``, each ``[K, top]``, largest value first."""
        return self.values, self.rows, self.positions


def top_activations(
    model: nn.Module,
    encoded: Sequence[Encoded],
    neurons: Sequence[Neuron],
    top: int,
    token_scope: str,
    batch_size: int = 16,
    progress: bool = False,
    *,
    padding: int = 0,
) -> list[list[tuple[int, int, float]]]:
    """One pass over the conversations: each neuron's ``top`` largest activations at counted tokens.

    ``encoded[n]``: instruction ``n``'s conversation as the recorder counts it; ``padding``: the
    tokenizer's pad id. Returns, per neuron,
    up to ``top`` ``(n, position, activation)``, largest first. Device memory: one batch's
    ``[B, L, K]`` activations of the ``K`` chosen neurons of a site, and ``[K, top]`` per site.
    """
    shapes = {site.name: site.shape for site, _ in find_sites(model)}
    by_site: dict[str, list[int]] = {}
    for number, neuron in enumerate(neurons):
        by_site.setdefault(neuron.site, []).append(number)
    columns = {
        site: torch.tensor([neurons[n].column(shapes[site]) for n in numbers])
        for site, numbers in by_site.items()
    }
    running: dict[str, RunningTop] = {}
    device = input_device(unwrap(model))
    with inference_mode(model), NeuronTap(model, columns) as tap:
        for rows in tqdm(
            length_bucketed([len(e.input_ids) for e in encoded], batch_size),
            desc="explain",
            unit="batch",
            disable=not progress,
        ):
            input_ids, attention, counted = pad_batch([encoded[i] for i in rows], token_scope, padding)
            tap.set_batch(*input_ids.shape)
            model(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                use_cache=False,
                logits_to_keep=1,  # activations need no logits
            )
            for site, activations in tap.activations.items():
                where = activations.device
                masked = activations.masked_fill(~counted.to(where)[:, :, None], float("-inf"))
                top_k = running.setdefault(site, RunningTop(len(by_site[site]), top, where))
                top_k.update(masked, torch.tensor(rows, device=where))
    found: list[list[tuple[int, int, float]]] = [[] for _ in neurons]
    for site, numbers in by_site.items():
        values, rows, positions = (t.cpu().tolist() for t in running[site].result())
        for k, number in enumerate(numbers):
            found[number] = [
                (row, position, value)
                for value, row, position in zip(values[k], rows[k], positions[k], strict=True)
                if value != float("-inf")
            ]
    return found


def explain(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    snapshot: Snapshot,
    neurons: Sequence[Neuron],
    top: int = 10,
    batch_size: int = 16,
    progress: bool = False,
) -> list[NeuronCard]:
    """Cards of ``neurons``: their frequencies and the ``top`` contexts of ``records`` (the probe
    set of ``snapshot``) that activate them most, counted in the snapshot's token scope."""
    if top < 1:
        raise ValueError(f"top must be a positive integer, got {top}")
    scope = snapshot.meta["token_scope"]
    encoded = [encode(r, tokenizer).needed_for(scope) for r in records]
    if scope == "generated":
        missing = [r["id"] for r in records if r["id"] not in snapshot.generated]
        if missing:
            raise ValueError(f"the snapshot holds no continuation of instruction {missing[0]!r}")
        encoded = [continued(e, snapshot.generated[r["id"]]) for e, r in zip(encoded, records, strict=True)]
    found = top_activations(
        model, encoded, neurons, top, scope, batch_size, progress, padding=pad_id(tokenizer)
    )
    return [
        NeuronCard(
            neuron,
            [
                _context(tokenizer, records[row]["id"], encoded[row].input_ids, position, value)
                for row, position, value in places
            ],
        )
        for neuron, places in zip(neurons, found, strict=True)
    ]


def _context(tokenizer, instruction_id: str, ids: torch.Tensor, position: int, activation: float) -> Context:
    before, after = WINDOW
    return Context(
        instruction_id=instruction_id,
        position=position,
        token=tokenizer.decode(ids[position : position + 1]),
        activation=activation,
        before=tokenizer.decode(ids[max(0, position - before) : position]),
        after=tokenizer.decode(ids[position + 1 : position + 1 + after]),
    )


def write_neurons(cards: Sequence[NeuronCard], path: str | Path) -> Path:
    """``neurons.jsonl``: one line per neuron card."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(card.to_json(), ensure_ascii=False) + "\n" for card in cards))
    return path
