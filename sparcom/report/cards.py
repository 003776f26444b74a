"""Renderings of neuron cards (``sparcom.edit.explain``): a self-contained HTML page and terminal text."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from sparcom.edit.explain import NeuronCard
from sparcom.report.pages import PAGE, write_page

_STYLE = """<style>
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; margin: 0.8em 0; }
.card h3 { font-size: 1em; margin: 0 0 0.4em; font-family: ui-monospace, monospace; }
.card .gap { color: #555; font-weight: normal; }
.bars { display: flex; gap: 0.6em; flex-wrap: wrap; margin: 0.3em 0 0.6em; font-size: 0.8em; }
.bar { width: 10em; white-space: nowrap; } .bar .track { background: #eee; height: 0.7em; border-radius: 2px; }
.bar .fill { background: #7a9cc6; height: 100%; border-radius: 2px; } .bar.own .fill { background: #d9822b; }
.contexts { font-family: ui-monospace, monospace; font-size: 0.82em; border-collapse: collapse; width: 100%; }
.contexts td { border: none; border-top: 1px solid #f0f0f0; text-align: left; white-space: pre;
  padding: 0.2em 0.5em; vertical-align: top; }
.contexts td.value { text-align: right; white-space: nowrap; color: #555; width: 5em; }
.contexts td.where { white-space: nowrap; color: #888; width: 12em; }
mark { background: #ffd27f; border-radius: 2px; padding: 0 1px; } .newline { color: #aaa; }
</style>"""


def card_html(card: NeuronCard) -> str:
    """One card: the neuron, its frequency per category as bars, its top contexts with the token marked."""
    neuron = card.neuron
    bars = "".join(
        f'<div class="bar{" own" if category == neuron.category else ""}" title="p = {p:.4f}">'
        f"{html.escape(category)} {p:.3f}"
        f'<div class="track"><div class="fill" style="width:{100 * min(max(p, 0.0), 1.0):.1f}%"></div></div></div>'
        for category, p in neuron.frequency.items()
    )
    rows = "".join(
        f'<tr><td class="value">{c.activation:.3f}</td>'
        f'<td class="where">{html.escape(c.instruction_id)} @{c.position}</td>'
        f"<td>{_text(c.before)}<mark>{_text(c.token)}</mark>{_text(c.after)}</td></tr>"
        for c in card.top
    )
    contexts = f'<table class="contexts">{rows}</table>' if rows else '<p class="note">No counted token.</p>'
    return (
        f'<div class="card"><h3>{html.escape(neuron.label)} <span class="gap">{html.escape(neuron.category)}, '
        f'gap {neuron.gap:.3f}</span></h3><div class="bars">{bars}</div>{contexts}</div>'
    )


def _text(text: str) -> str:
    """Escaped, on one line: a newline shows as a grey return sign."""
    return html.escape(text).replace("\n", '<span class="newline">↵</span>')


def write_explain_page(cards: Sequence[NeuronCard], out: Path, *, model: str, setting: str) -> Path:
    """``report.html`` in ``out``: the cards grouped by the category they are specific to."""
    out.mkdir(parents=True, exist_ok=True)
    by_category: dict[str, list[NeuronCard]] = {}
    for card in cards:
        by_category.setdefault(card.neuron.category, []).append(card)
    sections = [(category, [card_html(c) for c in group]) for category, group in by_category.items()]
    if not sections:
        sections = [
            (
                "No neuron",
                ['<p class="note">No neuron fires more often in one category than in every other.</p>'],
            )
        ]
    header = (
        f"{_STYLE}<p>Model {html.escape(model)}; {html.escape(setting)}. Each card: the neuron "
        "(<code>site:index</code>, <code>site:expert,index</code> for a routed expert), its firing "
        "frequency per category (its own in orange), and the counted tokens where its activation "
        "act(gate(x)) is largest, the token marked in its context.</p>"
    )
    description = f"neuron cards: {len(cards)} neurons of {len(by_category)} categories, their top contexts"
    return write_page(
        out / PAGE,
        f"SPARCOM neurons: {model}",
        sections,
        header=header,
        description=description,
        contents=True,
    )


def card_text(card: NeuronCard, width: int = 100) -> str:
    """One card as terminal text: frequencies in a row, then one line per context."""
    neuron = card.neuron
    lines = [
        f"{neuron.label}  (most frequent in {neuron.category}; gap to the next category {neuron.gap:.3f})",
        "  frequency: " + "  ".join(f"{c} {p:.3f}" for c, p in neuron.frequency.items()),
        f"  top {len(card.top)} contexts (activation, instruction @ position):",
    ]
    for c in card.top:
        text = c.text.replace("\n", "\\n")
        lines.append(f"  {c.activation:8.3f}  {c.instruction_id} @{c.position}  {text[:width]}")
    return "\n".join(lines)
