"""Fit a method's configuration to an all-in bit budget, matrix by matrix (uniform budget).

A user's "3 bits" is an all-in budget (DESIGN §3). For a Q-only method the largest BQ whose
all-in bits fit is taken; for a Q + L·R method BQ and the factor bits stay as the method says and
the rank k of each matrix is the largest that fits (a wide matrix gets a larger k than a narrow
one at the same budget). The global allocator over a menu of options is a separate issue.
"""
from __future__ import annotations

from dataclasses import replace

from .bits import bits_per_param
from .config import QLRConfig

GROUP_FALLBACKS = (64, 128, 256)


class InfeasibleBudgetError(ValueError):
    """No configuration of the method fits the requested bits."""


def fit_to_budget(cfg: QLRConfig, out_features: int, in_features: int, bits: float) -> QLRConfig:
    """The configuration of ``cfg``'s method with all-in bits ≤ ``bits`` for an (out × in) matrix."""
    if cfg.rank == 0:
        for bq in range(8, 1, -1):
            cand = replace(cfg, bq=bq)
            if bq <= 4 or cfg.grid != "nf":
                if bits_per_param(out_features, in_features, cand) <= bits:
                    return cand
        raise InfeasibleBudgetError(
            f"budget {bits} bits/param is below {bits_per_param(out_features, in_features, replace(cfg, bq=2)):.3f}, "
            f"the cheapest Q-only setting (2 bits, group {cfg.group_size}): raise budget.bits or the group size")
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
