"""The allocation solver: one option per matrix, minimum total cost under one all-in bit budget (a MILP)."""
from __future__ import annotations

from lqlr.budget.fit import InfeasibleBudgetError


def choose_options(errors: "list[list[float]]", bits: "list[list[float]]", params: "list[int]", budget: float):
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
