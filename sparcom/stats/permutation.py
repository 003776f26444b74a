"""Permutation tests on a pairwise instruction similarity matrix: do a category's instructions share
more ISNs with each other than with the rest (generality and uniqueness as tests), and does that
survive a control for shared vocabulary?

Pure math on ``[N, N]`` matrices (computed once, e.g. by ``sparcom.stats.analysis.instruction_similarity``)
and the instructions' category labels. Pairs of instructions are not independent (an instruction is in
``N - 1`` pairs), so p-values come from permuting instructions, never pairs. A p-value is
``(1 + #{null >= observed}) / (1 + permutations)``, valid at every sample size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparcom.stats.results import DiagonalDominance, Test, TokenControl

# Null statistics within this relative distance of the observed one count as ties (>=): the same
# block sums added in another order differ by round-off only.
_TIE = 1e-12
_BATCH = 200


def holm(p_values: torch.Tensor) -> torch.Tensor:
    """``[m]`` p-values -> Holm step-down adjusted p-values (family-wise error control)."""
    m = p_values.numel()
    order = torch.argsort(p_values)
    adjusted = ((m - torch.arange(m)) * p_values[order].double()).cummax(0).values.clamp(max=1.0)
    return torch.empty_like(adjusted).scatter_(0, order, adjusted)


def permutation_p_value(observed: torch.Tensor, null: torch.Tensor, tie: float = _TIE) -> torch.Tensor:
    """``[...]`` observed statistics, ``[P, ...]`` null ones -> ``[...]`` one-sided (greater) p-values.
    Null values within ``tie`` (relative) below the observed one count as reaching it."""
    tolerance = tie * observed.abs().clamp(min=1)
    return (1 + (null >= observed - tolerance).sum(0)).double() / (1 + null.shape[0])


def _labels(labels: Sequence[str], categories: Sequence[str], size: int) -> torch.Tensor:
    if len(labels) != size:
        raise ValueError(f"{len(labels)} labels for a {size} x {size} similarity matrix")
    unknown = sorted(set(labels) - set(categories))
    if unknown:
        raise ValueError(f"labels {unknown[:3]} are not among the categories {list(categories)}")
    return torch.tensor([list(categories).index(c) for c in labels])


def _check_inputs(similarity: torch.Tensor, permutations: int) -> None:
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square [N, N] matrix, got shape {tuple(similarity.shape)}")
    if not (isinstance(permutations, int) and permutations >= 1):
        raise ValueError(f"permutations must be a positive integer, got {permutations!r}")


def _permuted(labels: torch.Tensor, permutations: int, generator: torch.Generator):
    """Batches of ``[B, N]`` label vectors, each a random permutation of ``labels``."""
    for start in range(0, permutations, _BATCH):
        count = min(_BATCH, permutations - start)
        yield labels[torch.argsort(torch.rand(count, labels.numel(), generator=generator), dim=1)]


# ----------------------------------------------------------------------- diagonal dominance


def _dominance(similarity: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, N]`` similarity, ``[B, N]`` labelings -> ``[B, 1 + C]``: the overall statistic, then
    each category's. Block sums are ``L^T S L`` for one-hot labelings ``L``: one matrix product for
    the whole batch."""
    batch, count = labels.shape
    one_hot = torch.nn.functional.one_hot(labels, size).double()  # [B, N, C]
    row_sums = (similarity @ one_hot.transpose(0, 1).reshape(count, batch * size)).reshape(count, batch, size)
    sums = torch.einsum("bnc,nbd->bcd", one_hot, row_sums)  # [B, C, C]
    sums -= torch.diag_embed(one_hot.transpose(1, 2) @ similarity.diagonal())  # self-pairs do not count
    members = one_hot.sum(1)  # [B, C]
    pairs = members[:, :, None] * members[:, None, :] - torch.diag_embed(members)
    means = sums / pairs
    within = means.diagonal(dim1=1, dim2=2)
    off_diagonal = ~torch.eye(size, dtype=torch.bool)
    overall = within.mean(1) - means[:, off_diagonal].mean(1)
    between = (sums.sum(2) - sums.diagonal(dim1=1, dim2=2)) / (members * (count - members))
    return torch.cat([overall[:, None], within - between], 1)


def diagonal_dominance(
    similarity: torch.Tensor,
    labels: Sequence[str],
    categories: Sequence[str],
    permutations: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> DiagonalDominance:
    """Generality and uniqueness as tests, on the ``[N, N]`` pairwise similarity of instructions.

    Statistics (see ``DiagonalDominance``) are compared with their distribution over
    ``permutations`` random relabelings (category labels shuffled among instructions, so category
    sizes are kept); p-values are one-sided (greater), per-category ones Holm-adjusted across
    categories; a test is ``significant`` when its (adjusted) p-value lies below ``alpha``. The same
    ``seed`` gives the same result.
    """
    _check_inputs(similarity, permutations)
    codes = _labels(labels, categories, similarity.shape[0])
    size = len(categories)
    small = [c for c in categories if int((codes == list(categories).index(c)).sum()) < 2]
    if small or size < 2:
        raise ValueError(
            f"every category needs at least 2 instructions and there must be 2 categories; too few: {small}"
        )
    similarity = similarity.double()
    observed = _dominance(similarity, codes[None], size)[0]
    generator = torch.Generator().manual_seed(seed)
    null = torch.cat(
        [_dominance(similarity, batch, size) for batch in _permuted(codes, permutations, generator)]
    )
    p_values = permutation_p_value(observed, null)
    adjusted = holm(p_values[1:])
    per_category = {
        c: Test(
            float(observed[1 + i]), float(p_values[1 + i]), float(adjusted[i]), float(adjusted[i]) < alpha
        )
        for i, c in enumerate(categories)
    }
    overall = Test(float(observed[0]), float(p_values[0]), float(p_values[0]), float(p_values[0]) < alpha)
    return DiagonalDominance(overall, per_category)


# ---------------------------------------------------------------------- token-overlap control

_DEGREE = 3  # token similarity enters as a cubic, so a curved ISN-token relation is not mistaken for category
_PERMUTED_VALUES = 1 << 23  # permuted matrix entries held at once (32 MB of float32)
_FLOAT32_TIE = 1e-5  # a null t computed in float32 this close to the observed one is a tie


def _token_basis(token: torch.Tensor) -> torch.Tensor:
    """``[n]`` token similarities -> ``[n, k]`` orthonormal basis of polynomials in them (intercept
    included, degree at most 3, fewer where there are fewer distinct values)."""
    degree = min(_DEGREE, torch.unique(token).numel() - 1)
    scaled = (token - token.mean()) / token.std().clamp(min=1e-12)
    return torch.linalg.qr(torch.stack([scaled**d for d in range(degree + 1)], 1)).Q


def _t_statistic(along_response: torch.Tensor, norm: torch.Tensor, response_norm: torch.Tensor, dof: int):
    """OLS t of a regressor orthogonal to the token basis, from its inner product with the
    (likewise residualised) response, its squared norm and the response's squared norm."""
    slope = along_response / norm
    residual = (response_norm - slope * slope * norm).clamp(min=1e-300)
    return slope / torch.sqrt(residual / dof / norm)


def token_control(
    isn_similarity: torch.Tensor,
    token_similarity: torch.Tensor,
    labels: Sequence[str],
    permutations: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> TokenControl:
    """Is category specificity more than shared vocabulary?

    Over the pairs of distinct instructions, ISN similarity is regressed on a cubic in token
    similarity (``[N, N]``, the same pairwise statistic on the instructions' token sets) plus a
    same-category indicator; ``category_effect`` is the indicator's coefficient.

    Permutation scheme: double semi-partialling (Dekker, Krackhardt and Snijders, 2007). The
    indicator is first residualised on the token terms; that residual matrix is permuted by
    relabelling instructions (rows and columns together, i.e. the category labels shuffled among
    instructions after removing what token similarity explains) and the indicator's t statistic is
    recomputed. Permuting instructions rather than pairs keeps the dependence between the ``N - 1``
    pairs of each instruction; permuting the residual rather than the raw labels keeps the
    indicator's collinearity with token similarity (same-category pairs share more tokens), which
    plain label shuffling destroys: with instruction-level effects (some instructions overlap with
    every other) plain shuffling rejects a true null far above the nominal rate, this scheme does
    not. The p-value is one-sided (the category effect is positive).

    The control is only as good as the token similarity: ISN overlap driven by what token-set
    Jaccard does not see (shared frequent tokens, token counts) can still show as a category effect.
    """
    _check_inputs(isn_similarity, permutations)
    if isn_similarity.shape != token_similarity.shape:
        raise ValueError(
            f"ISN and token similarity differ in shape: {tuple(isn_similarity.shape)} vs {tuple(token_similarity.shape)}"
        )
    size = isn_similarity.shape[0]
    codes = _labels(labels, sorted(set(labels)), size)
    upper = torch.triu_indices(size, size, 1)
    same = (codes[upper[0]] == codes[upper[1]]).double()
    if same.min() == same.max():
        raise ValueError("the token control needs both same-category and cross-category pairs")
    basis = _token_basis(token_similarity.double()[upper[0], upper[1]])
    dof = same.numel() - basis.shape[1] - 1
    if dof < 1:
        raise ValueError(f"the token control needs more instructions than {size}")

    def residual(values: torch.Tensor) -> torch.Tensor:
        return values - (values @ basis) @ basis.T

    response = residual(isn_similarity.double()[upper[0], upper[1]])
    indicator = residual(same)
    norm, response_norm = indicator @ indicator, response @ response
    effect = float((indicator @ response) / norm)
    observed = _t_statistic(indicator @ response, norm, response_norm, dof)

    def square(values: torch.Tensor) -> torch.Tensor:  # pair values -> symmetric [N, N], zero diagonal
        matrix = torch.zeros(size, size, dtype=torch.float64)
        matrix[upper[0], upper[1]] = values
        return matrix + matrix.T

    # A permutation moves the residual indicator between pairs, so its squared norm stays; the t
    # statistic needs only its inner products with the response and with the token basis (what it
    # regains there is no longer orthogonal to it): one matrix product per batch of permutations,
    # in float32, which halves the memory traffic that bounds it.
    indicator_matrix = square(indicator).float()
    targets = torch.stack([square(response), *(square(column) for column in basis.T)]).reshape(
        len(basis.T) + 1, -1
    )
    targets = (targets.T / 2).float()  # [N * N, 1 + k]: each pair appears twice in a full matrix
    generator = torch.Generator().manual_seed(seed)
    null = []
    batch = max(1, min(permutations, _PERMUTED_VALUES // (size * size)))
    # Buffers reused by every batch: allocating these megabytes afresh each time fragments the heap,
    # and resident memory then grows with the number of permutations.
    rows, permuted = torch.empty(size, size), torch.empty(batch, size, size)
    for start in range(0, permutations, batch):
        count = min(batch, permutations - start)
        shuffled = torch.argsort(torch.rand(count, size, generator=generator), dim=1)
        for slot, order in enumerate(shuffled):
            torch.index_select(indicator_matrix, 0, order, out=rows)
            torch.index_select(rows, 1, order, out=permuted[slot])
        products = (permuted[:count].reshape(count, -1) @ targets).double()
        along_basis = (products[:, 1:] ** 2).sum(1)
        null.append(_t_statistic(products[:, 0], norm - along_basis, response_norm, dof))
    p_value = float(permutation_p_value(observed, torch.cat(null), tie=_FLOAT32_TIE))
    return TokenControl(category_effect=effect, p_value=p_value, survives=p_value < alpha, alpha=alpha)
