"""The cost of many configurations of one matrix at once: the allocator's cost table (docs/design.md §4).

cost(option) = Σ_r s_r (E H Eᵀ)_rr, E = Q + L R − W of the option's decomposition, s_r the
sensitivity of output r. For one-pass options (``iters = 1``, LR step first) the work is shared:

* one :func:`~lqlr.core.decompose.prepare` (rotation, rotated H, its LDLQ and Cholesky factors)
  per rotation/damping setting;
* one LR step per (rank, factor bits, group size): it runs on W alone (Q = 0 before the first LR
  step), so every BQ reuses it;
* one LDLQ pass per Q grid (BQ, group size): rows are rounded independently, so the targets
  W − L R of every rank are stacked into one tall matrix and rounded together.

``rows``: the Q step (the part that grows with the number of rows) may be run on a seeded random
subset of rows of the rotated W; the cost is then (out / |S|) Σ_{r ∈ S} w_r (E H Eᵀ)_rr with
w = diag(U diag(s) Uᵀ) (= s without rotation), an estimate. With all rows it is exact: the same
number as decomposing each option on its own. Options that are not one-pass are decomposed in
full (still sharing the preparation).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from lqlr.config import QLRConfig
from lqlr.core.decompose import (
    Prepared,
    decompose,
    fit_factors,
    prepare,
    prepare_key,
    round_q,
)
from lqlr.core.incoherence import Rotation
from lqlr.core.lowrank import Factors, exact_svd, weighted_svd

FACTOR_FIELDS = ("rank", "bl", "br", "group_size", "factor_grid", "lr_iters", "damp", "block_size", "clip_search",
                 "svd", "seed")
ROUND_FIELDS = ("grid", "bq", "group_size", "block_size", "clip_search", "q2n", "q2n_rho", "trellis_state_bits")


def sensitivity_weighted_error(E: torch.Tensor, H: torch.Tensor | None, s: torch.Tensor) -> float:
    """Σ_r s_r (E H Eᵀ)_rr for an error E (rows, in): the first-order loss change. E H in float32 (as
    :func:`~lqlr.core.hessian.h_weighted_error`), the sums in float64."""
    E = E.to(torch.float32)
    EH = E if H is None else E @ H.to(torch.float32)
    return float((EH.double() * E.double()).sum(1) @ s.to(torch.float64))


def rotated_row_weights(U: Rotation, s: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """w = diag(U diag(s) Uᵀ): the weight of each output row in the rotated basis (U's columns in chunks)."""
    n = U.n
    w = torch.zeros(n, dtype=torch.float64, device=s.device)
    for j in range(0, n, chunk):
        J = min(j + chunk, n)
        cols = U.apply(torch.eye(n, device=s.device, dtype=torch.float32)[j:J])  # (J − j, n) = U[:, j:J]ᵀ
        w += cols.double().pow(2).T @ s[j:J].double()
    return w


def one_pass(cfg: QLRConfig) -> bool:
    """Whether the option's decomposition is one Q step after (at most) one LR step on W."""
    return cfg.rank == 0 or (cfg.iters == 1 and cfg.order == "lr_first")


def _key(cfg: QLRConfig, fields: tuple[str, ...]) -> tuple:
    return tuple(getattr(cfg, f) for f in fields)


def option_costs(W: torch.Tensor, H: torch.Tensor | None, options: list[QLRConfig], s: torch.Tensor,
                 decompose_under: torch.Tensor | None | str = "same", rows: int | None = None,
                 seed: int = 0) -> list[float]:
    """Σ_r s_r (E H Eᵀ)_rr of each option's decomposition of W (out, in), in ``options`` order.

    H (in, in) measures the cost (None: H = I); ``decompose_under`` is the Hessian the options are
    decomposed under ("same": H; None: H = I, the cost still measured under H). s (out,) are the
    output sensitivities. ``rows``: run the Q step on that many random rows (seeded by ``seed``)
    and scale up; None or ≥ out: all rows, exact.
    """
    Hdec = H if isinstance(decompose_under, str) else decompose_under
    if isinstance(decompose_under, str) and decompose_under != "same":
        raise ValueError(f"decompose_under={decompose_under!r}: pass 'same', None or a Hessian")
    s = s.to(device=W.device, dtype=torch.float32)
    costs: list[float | None] = [None] * len(options)
    by_prep: dict[tuple, list[int]] = defaultdict(list)
    for i, cfg in enumerate(options):
        by_prep[prepare_key(cfg)].append(i)
    for idx in by_prep.values():
        prep = prepare(W, Hdec, options[idx[0]])
        full = [i for i in idx if not one_pass(options[i])]
        for i in full:  # not one-pass: the decomposition itself, sharing the preparation
            d = decompose(W, Hdec, options[i], prepared=prep)
            costs[i] = sensitivity_weighted_error(d.weight() - prep.W, prep_h(H, W), s)
        fast = [i for i in idx if one_pass(options[i])]
        if fast:
            for i, c in zip(fast, _one_pass_costs(prep, H, Hdec is H, [options[i] for i in fast], s, rows, seed)):
                costs[i] = c
    return [float(c) for c in costs]  # type: ignore[arg-type]


def prep_h(H: torch.Tensor | None, W: torch.Tensor) -> torch.Tensor | None:
    """H as float32 on W's device."""
    return None if H is None else H.to(device=W.device, dtype=torch.float32)


def _one_pass_costs(prep: Prepared, H: torch.Tensor | None, decomposed_under_h: bool, options: list[QLRConfig],
                    s: torch.Tensor, rows: int | None, seed: int) -> list[float]:
    out_f = prep.W.shape[0]
    device = prep.W.device
    if rows is None or rows >= out_f:
        S = None
    else:  # the same rows for every option of this matrix, so their costs are compared on the same sample
        gen = torch.Generator(device="cpu").manual_seed(seed)
        S = torch.randperm(out_f, generator=gen, device="cpu")[:rows].sort().values.to(device)
    Wr_S = prep.Wr if S is None else prep.Wr[S]
    factors: dict[tuple, Factors] = {}
    # one exact SVD of W C serves every rank and factor grid whose start is exact (its top-k triplets)
    ranked = [c for c in options if c.rank and exact_svd(c.svd, *prep.Wr.shape)]
    start = weighted_svd(prep.Wr, prep.C, max(c.rank for c in ranked), "exact") if ranked else None
    for cfg in options:  # one LR step per factor setting, on W itself (Q = 0 before the first LR step)
        key = _key(cfg, FACTOR_FIELDS)
        if cfg.rank and key not in factors:
            shared = start if exact_svd(cfg.svd, *prep.Wr.shape) else None
            factors[key] = fit_factors(prep, prep.Wr, cfg, 0, start=shared)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for j, cfg in enumerate(options):
        groups[_key(cfg, ROUND_FIELDS)].append(j)
    if S is not None:
        w = rotated_row_weights(prep.rot.U, s) if prep.rot else s.double()
        w_S = w[S]
        # the cost's H in the rotated basis: prepare() already made it when the options were decomposed under H
        H_raw = prep_h(H, prep.W)
        H_cost = prep.Hr if decomposed_under_h else (prep.rot.rotate_hessian(H_raw) if prep.rot and H_raw is not None
                                                      else H_raw)
    costs = [0.0] * len(options)
    for members in groups.values():
        LR_S = [None if not options[j].rank else _rows(factors[_key(options[j], FACTOR_FIELDS)], S) for j in members]
        # Q ← argmin tr((W − L R − Q) H (W − L R − Q)ᵀ) for every member at once: their targets stacked by rows
        T = torch.cat([Wr_S if lr is None else Wr_S - lr for lr in LR_S])  # (members · rows, in)
        r, _ = round_q(prep, T, options[members[0]])
        Qs = r.Q.split(Wr_S.shape[0])
        for j, Q, lr in zip(members, Qs, LR_S):
            E = Q - Wr_S if lr is None else Q + lr - Wr_S  # (rows, in) error in the rotated basis
            if S is None:  # exact: the error in the original basis, weighted by s
                E = prep.rot.unrotate_weight(E) if prep.rot else E
                costs[j] = sensitivity_weighted_error(E, prep_h(H, prep.W), s)
            else:
                costs[j] = out_f / len(S) * sensitivity_weighted_error(E, H_cost, w_S)
    return costs


def _rows(f: Factors, S: torch.Tensor | None) -> torch.Tensor:
    """(L R)[S]: the low-rank term on the sampled rows (all rows when S is None)."""
    return f.L @ f.R if S is None else f.L[S] @ f.R

