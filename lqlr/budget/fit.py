"""Uniform bit budgets: fit one method to an all-in budget, matrix by matrix.

A user's "3 bits" is an all-in budget (docs/design.md §3). For a Q-only method the largest BQ whose
all-in bits fit is taken; for a Q + L·R method BQ and the factor bits stay as the method says and
the rank k of each matrix is the largest that fits (a wide matrix gets a larger k than a narrow
one at the same budget). (The global allocator over a menu is lqlr.budget.allocator.)
"""
from __future__ import annotations

from dataclasses import replace

from lqlr.config import CODEBOOK_BITS, CODEBOOK_DIM, GGUF_GRIDS, QLRConfig
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
    cfg = cfg.for_matrix(out_features, in_features)
    allowed = cfg.q_bits_allowed()  # highest first; one value for a GGUF type or a codebook
    fixed_group = cfg.grid in GGUF_GRIDS  # the format fixes the group too
    if cfg.rank == 0 and mode == "nearest":
        groups = (cfg.group_size,) if fixed_group else Q_ONLY_GROUPS
        cands = [replace(cfg, bq=bq, group_size=g) for bq in allowed for g in groups
                 if cfg.grid not in CODEBOOK_BITS or g % CODEBOOK_DIM[cfg.grid] == 0]
        return min(cands, key=lambda c: (abs(bits_per_param(out_features, in_features, c) - bits),
                                         bits_per_param(out_features, in_features, c)))
    if cfg.rank == 0:
        for bq in allowed:
            cand = replace(cfg, bq=bq)
            if bits_per_param(out_features, in_features, cand) <= bits:
                return cand
        cheapest = replace(cfg, bq=allowed[-1])
        raise InfeasibleBudgetError(
            f"budget {bits} bits/param is below {bits_per_param(out_features, in_features, cheapest):.3f}, "
            f"the cheapest Q-only setting ({allowed[-1]} bits on grid {cfg.grid}, group {cfg.group_size}): raise "
            "budget.bits or the group size")
    tries = [bq for bq in allowed if bq <= cfg.bq] or [cfg.bq]
    for bq in tries:  # Q + L·R: keep the method's BQ unless Q alone cannot fit
        try:
            return _fit_rank(replace(cfg, bq=bq), out_features, in_features, bits)
        except InfeasibleBudgetError:
            if bq == tries[-1]:
                raise
    raise AssertionError("unreachable")


def _fit_rank(cfg: QLRConfig, out_features: int, in_features: int, bits: float) -> QLRConfig:
    """Largest rank k (and the smallest group size ≥ the method's that lets Q fit) with bits ≤ ``bits``."""
    base = replace(cfg, rank=0)
    fallbacks = () if cfg.grid in GGUF_GRIDS else [x for x in GROUP_FALLBACKS if x > cfg.group_size]  # a GGUF type fixes it
    for g in sorted({cfg.group_size, *fallbacks}):
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


