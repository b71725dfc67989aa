"""Uniform bit budgets: fit one method to an all-in budget, matrix by matrix.

A user's "3 bits" is an all-in budget (docs/design.md §3). For a Q-only method the largest BQ whose
all-in bits fit is taken; for a Q + L·R method BQ and the factor bits stay as the method says and
the rank k of each matrix is the largest that fits (a wide matrix gets a larger k than a narrow
one at the same budget). (The global allocator over a menu is lqlr.budget.allocator.)
"""
from __future__ import annotations

from dataclasses import replace

from lqlr.config import QLRConfig
from lqlr.core.bits import bits_per_param

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


