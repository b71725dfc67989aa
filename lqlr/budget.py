"""Bit budgets: fit one method to a budget matrix by matrix, or allocate a menu of options globally.

A user's "3 bits" is an all-in budget (DESIGN §3). For a Q-only method the largest BQ whose
all-in bits fit is taken; for a Q + L·R method BQ and the factor bits stay as the method says and
the rank k of each matrix is the largest that fits (a wide matrix gets a larger k than a narrow
one at the same budget). ``allocate`` chooses one option per matrix from a menu under one global budget.
"""
from __future__ import annotations

from dataclasses import replace

from .bits import bits_per_param
from .config import QLRConfig

GROUP_FALLBACKS = (64, 128, 256)


class InfeasibleBudgetError(ValueError):
    """No configuration of the method fits the requested bits."""


FIT_MODES = ("below", "nearest")
Q_ONLY_GROUPS = (32, 64, 128, 256)


def fit_to_budget(cfg: QLRConfig, out_features: int, in_features: int, bits: float, mode: str = "below") -> QLRConfig:
    """The configuration of ``cfg``'s method for an (out × in) matrix under an all-in budget.

    ``mode="below"``: all-in bits ≤ ``bits``. Q only: the largest BQ at the method's group size.
    Q + L·R: the method's BQ (lowered when Q alone would not fit even at group 256), then the
    largest rank k. ``mode="nearest"`` (Q-only methods, which cannot hit arbitrary budgets): the
    (BQ, group size ∈ {32, 64, 128, 256}) whose all-in bits are nearest to ``bits``, ties to the cheaper.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"budget fit mode {mode!r}: choose one of {FIT_MODES}")
    max_bq = 4 if cfg.grid == "nf" else 8
    if cfg.rank == 0 and mode == "nearest":
        cands = [replace(cfg, bq=bq, group_size=g) for bq in range(2, max_bq + 1) for g in Q_ONLY_GROUPS]
        return min(cands, key=lambda c: (abs(bits_per_param(out_features, in_features, c) - bits),
                                         bits_per_param(out_features, in_features, c)))
    if cfg.rank == 0:
        for bq in range(max_bq, 1, -1):
            cand = replace(cfg, bq=bq)
            if bits_per_param(out_features, in_features, cand) <= bits:
                return cand
        raise InfeasibleBudgetError(
            f"budget {bits} bits/param is below {bits_per_param(out_features, in_features, replace(cfg, bq=2)):.3f}, "
            f"the cheapest Q-only setting (2 bits, group {cfg.group_size}): raise budget.bits or the group size")
    for bq in range(cfg.bq, 1, -1):  # Q + L·R: keep the method's BQ unless Q alone cannot fit
        try:
            return _fit_rank(replace(cfg, bq=bq), out_features, in_features, bits)
        except InfeasibleBudgetError:
            if bq == 2:
                raise
    raise AssertionError("unreachable")


def _fit_rank(cfg: QLRConfig, out_features: int, in_features: int, bits: float) -> QLRConfig:
    """Largest rank k (and the smallest group size ≥ the method's that lets Q fit) with bits ≤ ``bits``."""
    base = replace(cfg, rank=0)
    for g in sorted({cfg.group_size, *[x for x in GROUP_FALLBACKS if x > cfg.group_size]}):
        if bits_per_param(out_features, in_features, replace(base, group_size=g)) <= bits:
            base = replace(base, group_size=g)
            break
    else:
        raise InfeasibleBudgetError(
            f"budget {bits} bits/param cannot hold even Q at {cfg.bq} bits ({out_features}×{in_features}): "
            f"raise budget.bits or lower method.bq")
    lo, hi = 0, min(out_features, in_features)  # largest k with bits(k) ≤ budget (bits grow with k)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bits_per_param(out_features, in_features, replace(base, rank=mid)) <= bits:
            lo = mid
        else:
            hi = mid - 1
    return replace(base, rank=lo)


def allocate(errors: "list[list[float]]", bits: "list[list[float]]", params: "list[int]", budget: float):
    """One option per matrix minimising Σ errors[i][j] subject to Σ params[i]·bits[i][j] ≤ budget·Σ params[i].

    A multiple-choice knapsack solved exactly as a MILP with ``scipy.optimize.milp``: binary x_ij,
    Σ_j x_ij = 1 per matrix, one budget row. ``errors`` should already be weighted by each matrix's
    effect on the model output. Returns the chosen option index per matrix.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not (len(errors) == len(bits) == len(params)) or any(len(e) != len(b) for e, b in zip(errors, bits)):
        raise ValueError("errors, bits and params must describe the same matrices and options")
    sizes = [len(e) for e in errors]
    if min(sizes, default=0) == 0:
        raise ValueError("every matrix needs at least one option")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    c = np.concatenate([np.asarray(e, dtype=float) for e in errors])
    weight = np.concatenate([np.asarray(b, dtype=float) * p for b, p in zip(bits, params)])
    one_each = np.zeros((len(sizes), n))
    for i in range(len(sizes)):
        one_each[i, offsets[i]:offsets[i + 1]] = 1.0
    cheapest = sum(min(b) * p for b, p in zip(bits, params)) / sum(params)
    if cheapest > budget + 1e-12:
        raise InfeasibleBudgetError(f"budget {budget} bits/param is below {cheapest:.4f}, the cheapest option of every "
                                    "matrix: raise the budget or add cheaper options")
    res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(weight[None, :], -np.inf, budget * sum(params))])
    if not res.success:
        raise InfeasibleBudgetError(f"the allocation MILP failed: {res.message}")
    x = np.round(res.x).astype(int)
    return [int(np.argmax(x[offsets[i]:offsets[i + 1]])) for i in range(len(sizes))]
