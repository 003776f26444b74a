"""The report's Findings: each of the paper's claims as one sentence, with the number, how far it
can be trusted (interval or p-value, chance level) and the paper's own figure beside it."""

from __future__ import annotations

from sparcom.edit.effects import Dominance
from sparcom.stats.comparison import SIDES, Comparison
from sparcom.stats.results import Estimate, TokenControl

PAPER_ISN_JACCARD = "0.38-0.62"
PAPER_ISE_PEARSON = "0.91-0.94"
PAPER_UNIQUE = ("classification", "code", "math")


# Below this many instructions per category the bootstrap intervals under-cover (measured: 0.85
# for a nominal 0.95 at 20 per category; 0.92-0.98 at 200): the findings say so.
FEW_INSTRUCTIONS = 50


def findings(c: Comparison) -> list[str]:
    """One sentence per claim the comparison can speak to."""
    sentences = [_isn_alteration(c)]
    smallest = min(c.settings.instructions.values(), default=0)
    if c.settings.statistics and smallest < FEW_INSTRUCTIONS:
        sentences.insert(
            0,
            f"Caution: with {smallest} instructions per category the 95% intervals are indicative only; they "
            "cover the truth less often than 95% of the time (about 85% at 20 per category) and tests have "
            "little power. Record 100-200 per category (sparcom.probe.per_category) for findings.",
        )
    if c.ise_pearson is not None:
        sentences.append(_ise_alteration(c))
    if c.overlap is not None:
        sentences.append(_uniqueness(c))
    if c.token_control is not None:
        sentences.append(_token_control(c))
    sentences.append(_three_phases(c))
    return sentences


def _interval(e: Estimate) -> str:
    return f" (95% CI {e.ci95[0]:.2f}-{e.ci95[1]:.2f})" if e.ci95 else " (no interval: statistics off)"


def _isn_alteration(c: Comparison) -> str:
    epsilon = c.headline_epsilon
    mean = c.isn_jaccard["mean"][epsilon]
    values = [c.isn_jaccard[k][epsilon].value for k in c.categories]
    defined = [v for v in values if v == v]
    text = (
        f"ISN alteration: the mean Jaccard of base and tuned ISN sets at eps={epsilon:g} is {mean.value:.2f}"
        f"{_interval(mean)}, ranging {min(defined, default=float('nan')):.2f}-{max(defined, default=float('nan')):.2f} "
        f"over categories; random sets of the same per-site sizes would give {mean.chance:.2f}"
    )
    if mean.stability_base is not None and mean.value_half is not None:
        moved = [
            k
            for k in c.categories
            if c.isn_jaccard[k][epsilon].value_half < c.isn_jaccard[k][epsilon].stability_base
        ]
        text += (
            f". At a matched sample size (both sides selected on the same half of the instructions) the "
            f"Jaccard is {mean.value_half:.2f}, against {mean.stability_base:.2f} between the two halves in the base "
            f"model: fine-tuning moved the ISNs {'more' if mean.value_half < mean.stability_base else 'less'} than "
            f"swapping the instructions does ({len(moved)} of {len(c.categories)} categories moved more"
            + (f": {', '.join(moved)})" if moved else ")")
        )
    return text + f" (paper: {PAPER_ISN_JACCARD})."


def _ise_alteration(c: Comparison) -> str:
    mean = c.ise_pearson["mean"]
    values = [c.ise_pearson[k].value for k in c.categories]
    return (
        f"ISE alteration: expert frequencies of base and tuned correlate at a mean Pearson r of {mean.value:.2f}"
        f"{_interval(mean)}, ranging {min(values):.2f}-{max(values):.2f} over categories "
        f"(paper: {PAPER_ISE_PEARSON})."
    )


def _uniqueness(c: Comparison) -> str:
    base = c.overlap["base"]
    matrix = base.matrix
    size = len(matrix)
    within = [matrix[i][i] for i in range(size)]
    between = [matrix[i][j] for i in range(size) for j in range(size) if i != j]
    contrast = {
        k: matrix[i][i] - sum(matrix[i][j] for j in range(size) if j != i) / (size - 1)
        for i, k in enumerate(c.categories)
    }
    strongest = sorted(contrast, key=contrast.get, reverse=True)[:3]
    general = c.general["base"]
    isns = [c.isn_counts["base"][k][0] for k in c.categories]
    text = (
        f"Uniqueness: in the base model, within-category ISN overlap exceeds between-category overlap most for "
        f"{', '.join(strongest)} (by {min(contrast[k] for k in strongest):+.3f} to {max(contrast.values()):+.3f} "
        f"Jaccard on a background of {min(between):.2f}-{max(between):.2f} between categories and "
        f"{min(within):.2f}-{max(within):.2f} within them); {general} ISNs are general (in every category's set), "
        f"{_share(general, max(isns))}-{_share(general, min(isns))} of each category's ISNs"
    )
    if base.diagonal_dominance is not None:
        significant = [k for k, t in base.per_category.items() if t.significant]
        text += (
            f"; over the whole matrix the diagonal exceeds the off-diagonal by {base.diagonal_dominance.statistic:.3f} "
            f"(permutation {_p(base.diagonal_dominance.p_value, c)}), and "
            + (
                f"{len(significant)} of {len(c.categories)} categories are specific after Holm correction "
                f"({', '.join(significant)})"
                if significant
                else "no category is specific after Holm correction"
            )
        )
    else:
        text += " (no test: statistics off)"
    return text + f" (paper: strongest for {', '.join(PAPER_UNIQUE)})."


def _p(value: float, c: Comparison) -> str:
    return p_text(value, (c.settings.statistics or {}).get("permutations"))


def p_text(value: float, permutations: int | None) -> str:
    """A permutation p-value; at its floor ``1 / (1 + permutations)`` it says that is a floor."""
    if permutations and value <= 1 / (1 + permutations) + 1e-12:
        return f"p = {value:.2g}, the smallest {permutations:,} permutations can give"
    return f"p = {value:.3g}"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "–"


def _token_control(c: Comparison) -> str:
    control = c.token_control["base"]
    if control.category_effect is None:
        return (
            f"Vocabulary control: ISN overlap and vocabulary overlap between categories correlate at r = "
            f"{control.correlation:.2f} in the base model (no regression test: statistics off)."
        )
    return token_control_sentence(control, (c.settings.statistics or {}).get("permutations"))


def token_control_sentence(control: TokenControl, permutations: int | None = None) -> str:
    """The token-overlap control's verdict as one sentence."""
    word, side = ("survives", "below") if control.survives else ("does not survive", "not below")
    return (
        f"Category specificity {word} the token-overlap control: same-category pairs share "
        f"{control.category_effect:+.3f} ISN Jaccard beyond pairs of equal token overlap "
        f"({p_text(control.p_value, permutations)}, {side} {control.alpha:g})."
    )


def _three_phases(c: Comparison) -> str:
    parts = []
    for side in SIDES:
        profiles = c.layer_profile[side]
        found = [k for k, p in profiles.items() if p.three_phase]
        part = f"{len(found)} of {len(profiles)} categories in the {side} model"
        shown = next((profiles[k] for k in found), None) or next(iter(profiles.values()))
        if shown.boundaries is not None and shown.means is not None:
            a, b = shown.boundaries
            last = len(shown.counts) - 1
            early, middle, late = shown.means
            name = next(k for k, p in profiles.items() if p is shown)
            part += (
                f" (e.g. {name}: {early:.0f} ISNs per layer in layers 0-{a - 1}, {middle:.0f} in {a}-{b - 1}, "
                f"{late:.0f} in {b}-{last}"
                + (
                    f"; margin {shown.margin:+.0f}, 95% CI {shown.ci95[0]:+.0f} to {shown.ci95[1]:+.0f}"
                    if shown.ci95
                    else ""
                )
                + ")"
            )
        parts.append(part)
    return (
        "Three phases (the layer profile fitted by three segments placed where the data puts them; three-phase "
        "when the middle lies below both others beyond sampling noise): "
        + "; ".join(parts)
        + " (paper: three phases, many early, fewer in the middle, a sharp rise in the final layers)."
    )


def dominance_sentence(d: Dominance) -> str:
    """The causal check's verdict (ablation, or steering at one scale) as one sentence."""
    count, size = sum(d.rows), len(d.rows)
    where, side = ("further than", "from") if d.two_sided else ("more than", "above")
    rule = f"{'two' if d.two_sided else 'one'}-sided {d.alpha:g}"
    return (
        f"The diagonal {'dominates' if d.dominant else 'does not dominate'}: in {count} of {size} rows the "
        f"loss change on the row's own category lies {where} {d.bound:.2f} control SDs {side} the mean of "
        f"{d.draws} random-neuron draws (z, {rule} bound) and {'further out than' if d.two_sided else 'above'} "
        f"every other z of its row, and the rule asks for {d.majority} of {size} (false-positive rate at "
        f"most {d.false_positive_rate:.1g})."
    )
