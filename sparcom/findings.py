"""The report's Findings: each of the paper's claims as one sentence, with the number, how far it
can be trusted (interval or p-value, chance level) and the paper's own figure beside it."""

from __future__ import annotations

from sparcom.comparison import SIDES, Comparison, Estimate

PAPER_ISN_JACCARD = "0.38-0.62"
PAPER_ISE_PEARSON = "0.91-0.94"
PAPER_UNIQUE = ("classification", "code", "math")
ALPHA = 0.05


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
    epsilon = 0.5 if 0.5 in c.settings.epsilons else c.settings.epsilons[len(c.settings.epsilons) // 2]
    mean = c.isn_jaccard["mean"][epsilon]
    values = [c.isn_jaccard[k][epsilon].value for k in c.categories]
    text = (
        f"ISN alteration: the mean Jaccard of base and tuned ISN sets at eps={epsilon:g} is {mean.value:.2f}"
        f"{_interval(mean)}, ranging {min(values):.2f}-{max(values):.2f} over categories; random sets of the "
        f"same per-site sizes would give {mean.chance:.2f}"
    )
    if mean.stability_base is not None:
        moved = "more" if mean.value < mean.stability_base else "less"
        text += (
            f", and two halves of the instructions give {mean.stability_base:.2f} in the base model, so fine-tuning "
            f"moved the ISNs {moved} than swapping half the instructions does"
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
    contrast = {
        k: matrix[i][i] - sum(matrix[i][j] for j in range(size) if j != i) / (size - 1)
        for i, k in enumerate(c.categories)
    }
    strongest = sorted(contrast, key=contrast.get, reverse=True)[:3]
    text = f"Uniqueness: in the base model, within-category ISN overlap exceeds between-category overlap most for {', '.join(strongest)}"
    if base.diagonal_dominance is not None:
        significant = [k for k, t in base.per_category.items() if t.p_holm < ALPHA]
        text += (
            f"; over the whole matrix the diagonal exceeds the off-diagonal by {base.diagonal_dominance.statistic:.3f} "
            f"(permutation p = {base.diagonal_dominance.p_value:.3g}), and "
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


def _token_control(c: Comparison) -> str:
    control = c.token_control["base"]
    if control.category_effect is None:
        return (
            f"Vocabulary control: ISN overlap and vocabulary overlap between categories correlate at r = "
            f"{control.correlation:.2f} in the base model (no regression test: statistics off)."
        )
    return control.verdict or ""


def _three_phases(c: Comparison) -> str:
    parts = []
    for side in SIDES:
        profiles = c.layer_profile[side]
        found = [k for k, p in profiles.items() if p.three_phase]
        sure = [k for k, p in profiles.items() if p.ci95 is not None and p.ci95[0] > 0]
        part = f"{len(found)} of {len(profiles)} categories in the {side} model"
        if any(p.ci95 is not None for p in profiles.values()):
            part += f" ({len(sure)} with an interval above 0)"
        parts.append(part)
    return (
        "Three phases (fewer ISNs in the middle third of the layers than in the first and last): "
        + "; ".join(parts)
        + " (paper: three phases, many early, fewer in the middle, a sharp rise in the final layers)."
    )
