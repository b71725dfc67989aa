"""Hessian-aware rounding (LDLQ / GPTQ) of a matrix onto a grid.

min_Q tr((T − Q) H (T − Q)ᵀ) over Q on the grid, greedily column by column: each input column
is rounded, and its rounding error is pushed onto the columns not yet rounded through the
upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U). Lazy block updates keep the work in matmuls.
With H = None it is plain round-to-nearest.

A vector grid (``grid.dim`` = d > 1, e.g. E8P's 8-column codewords) is rounded by block LDLQ, as
QuIP# does: d consecutive columns at once onto their nearest codewords, the block's error E fed to
the later columns as E U_bb⁻¹ U_b,rest (U_bb the d × d diagonal block of U). With H = I that is
nearest-codeword rounding, and with d = 1 it is the scalar loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lqlr.core.grids import (
    Grid,
    QuantizedTensor,
    encode_groups,
    group_slices,
    UniformGrid,
    quantize_rtn,
)
from lqlr.core.hessian import DampedHessian, inverse_cholesky_upper


@dataclass
class LDLQPlan:
    """What LDLQ needs from H, computed once and reused for every matrix rounded under H."""

    U: torch.Tensor  # (in, in) upper Cholesky factor of the (permuted) damped H⁻¹
    perm: torch.Tensor | None  # visiting order of the input columns (act-order), None = natural
    damped: DampedHessian


def ldlq_plan(Hd: DampedHessian, act_order: bool = False) -> LDLQPlan:
    """Factorise the damped H once (optionally in act-order: decreasing diag H)."""
    perm = None
    H = Hd.H
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        H = H[perm][:, perm]
    return LDLQPlan(U=inverse_cholesky_upper(H), perm=perm, damped=Hd)


def aligned_block(block_size: int, group_size: int, dim: int = 1) -> int:
    """Block size that keeps every group inside one block, or every block inside one group, and is a
    whole number of ``dim``-column codewords (``group_size`` is a multiple of ``dim``)."""
    if block_size >= group_size:
        return -(-block_size // group_size) * group_size
    block = max(block_size - block_size % dim, dim)
    while group_size % block:
        block -= dim
    return block


@dataclass
class Rounded:
    """A matrix rounded onto a grid."""

    qt: QuantizedTensor  # codes and group parameters
    Q: torch.Tensor  # (rows, cols) dequantized float32
    damped_error: float | None  # tr((T − Q) H_d (T − Q)ᵀ) from the LDL identity (None for RTN)


def ldlq_round(T: torch.Tensor, plan: LDLQPlan | None, grid: Grid, block_size: int = 128,
               compiled: bool = True) -> Rounded:
    """Round T (rows, in) onto ``grid``: min tr((T − Q) H (T − Q)ᵀ) by LDLQ with lazy block updates.

    ``plan`` = None means H = I: plain round-to-nearest. Group parameters are fitted on the
    error-updated columns when LDLQ reaches a group's first column; with act-order they are
    fitted once up front on T (static groups), as the visiting order crosses groups. Grids whose
    fit takes weights (``grid.weighted_fit``: the GGUF blocks) fit each group under its columns'
    LDL pivots 1/U_ii², their errors' weights in tr(E H Eᵀ). On a CPU the
    scalar uniform grid's column loop runs compiled (``ldlq_cpu.cpp``) when it is available and
    ``compiled``; the torch loop below is its reference and runs everywhere else.
    """
    d = grid.dim
    if d > 1 and plan is not None and plan.perm is not None:
        raise ValueError(f"act_order with a vector grid ({grid.kind}, {d} columns per codeword) is not supported: "
                         "set act_order=false")
    T = T.to(torch.float32)
    if plan is None:
        qt = quantize_rtn(T, grid)
        return Rounded(qt=qt, Q=qt.dequantize(), damped_error=None)

    rows, cols = T.shape
    g = grid.group_size
    W = T.clone()
    W[:, plan.damped.dead] = 0.0  # inputs that are never active: their weights do not matter
    perm = plan.perm
    static = None
    # importance of each input column for the group fits (grids that take weights: the GGUF blocks): the LDL pivot
    # 1/U_ii², the exact weight of column i's rounding error in tr(E H Eᵀ) = Σ_i ‖(w_i − q_i)/U_ii‖² once the
    # earlier columns' errors are fed forward (diag H, llama.cpp's imatrix, is its weight without the feedback)
    weighted = getattr(grid, "weighted_fit", False)
    pivots = None
    if weighted:
        pivots = torch.diagonal(plan.U).pow(-2)  # (in,) in visiting order
        if perm is not None:
            pivots = pivots[torch.argsort(perm)]  # static groups are fitted in the natural order
        pivots[plan.damped.dead] = 0.0

    def fit(x: torch.Tensor, sl: slice):  # x (rows, ≤ g): the columns sl of one group
        return grid.fit(x, weights=pivots[sl]) if weighted else grid.fit(x)

    if perm is not None:
        static = [fit(W[:, sl], sl) for sl in group_slices(cols, g)]
        group_of = (perm // g).tolist()  # group of each visited column
        W = W[:, perm]
    U = plan.U
    if g % d:
        raise ValueError(f"grid {grid.kind} rounds {d} columns at once: its group size {g} must be a multiple of {d}")
    block = aligned_block(block_size, g, d)

    inv_d = (1.0 / torch.diagonal(U)).tolist()  # 1 / U_ii, as Python floats for the hot loop
    # the compiled column loop (uniform grid, CPU, dynamic groups): one call per group segment of a block
    ext = _extension() if (d == 1 and static is None and type(grid) is UniformGrid and T.device.type == "cpu"
                           and compiled) else None
    inv_dt = (1.0 / torch.diagonal(U)).contiguous() if ext is not None else None
    Wt = W.T.contiguous()  # (in, rows): column i of W is the contiguous row Wt[i]
    Qt = torch.empty(cols, rows, dtype=torch.float32, device=T.device)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=T.device) if d > 1 else None  # vector grids: kept
    fitted: list = []  # GroupParams of each group, in column order
    total = torch.zeros((), dtype=torch.float64, device=T.device)
    p = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = Wt[i1:i2].clone()  # (b, rows) columns of this block, updated in place
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        if ext is not None:
            U1c, inv_b = U1.contiguous(), inv_dt[i1:i2].contiguous()
            for i in range(0, i2 - i1, g if block >= g else i2 - i1):  # groups inside the block, or the block in one
                col = i1 + i
                if col % g == 0:  # up to date: this block's earlier columns were fed forward in place
                    src = W1[i : i + g] if col + g <= i2 else Wt[col : col + g]
                    p = fit(src.T, slice(col, col + src.shape[0]))
                    fitted.append(p)
                n = min(g - col % g, i2 - col)
                ext.ldlq_columns(W1, U1c, Qt, Err1, i, n, col, p.scale.reshape(-1).contiguous(),
                                 p.zero.reshape(-1).contiguous(), float(grid.maxq), inv_b)
            total += Err1.double().pow(2).sum()
            Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)
            continue
        for i in range(0, i2 - i1, d):
            col = i1 + i
            if static is not None:
                p = static[group_of[col]]
            elif col % g == 0:
                # the group's columns are up to date: inside this block, or the block starts the group
                src = W1[i : i + g] if col + g <= i2 else Wt[col : col + g]
                p = fit(src.T, slice(col, col + src.shape[0]))
                fitted.append(p)
            if d == 1:
                q = grid.round(W1[i][:, None], p)[:, 0]  # (rows,)
                Qt[col] = q
                err = W1[i].sub(q).mul_(inv_d[col])  # (rows,) rounding error scaled by 1 / U_ii
                W1[i:].addr_(U1[i, i:], err, alpha=-1.0)  # feed the error forward in-block
                Err1[i] = err
            else:  # block LDLQ: d columns on one codeword per row, their error fed back through U_bb⁻¹
                # (rows, d) codes of the nearest codewords; a super-block grid is told where in its group they are
                at = {"start": col % g} if grid.column_offsets else {}
                c = grid.encode(W1[i : i + d].T, p, **at)
                codes[:, col : col + d] = c
                q = grid.decode(c, p, **at).T  # (d, rows)
                Qt[col : col + d] = q
                Ubb = U1[i : i + d, i : i + d]
                # Z = U_bb⁻ᵀ (W_b − Q_b)ᵀ: the block's error in the coordinates where it is independent
                err = torch.linalg.solve_triangular(Ubb.T, W1[i : i + d] - q, upper=False)  # (d, rows)
                W1[i + d :].addmm_(U1[i : i + d, i + d :].T, err, alpha=-1.0)  # feed it forward in-block
                Err1[i : i + d] = err
        total += Err1.double().pow(2).sum()
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)  # lazy update of the columns after the block

    Q = Qt.T
    if static is not None:
        Q = Q[:, torch.argsort(perm)]
        fitted = static
    Q = Q.contiguous()
    scale = torch.cat([f.scale for f in fitted], dim=1)  # (rows, n_groups)
    zero = torch.cat([f.zero for f in fitted], dim=1) if fitted[0].zero is not None else None
    if codes is None:  # scalar grids: the codes of the rounded values
        codes = encode_groups(Q, grid, fitted)
    qt = QuantizedTensor(codes=codes, scale=scale, zero=zero, grid=grid)
    return Rounded(qt=qt, Q=Q, damped_error=float(total))


def _extension():
    from lqlr.util.cpp import compiled

    return compiled(Path(__file__).with_name("ldlq_cpu.cpp"), "lqlr_ldlq")
