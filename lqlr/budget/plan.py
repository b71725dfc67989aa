"""The Plan: the QLRConfig each target matrix gets, and where it came from.

Three sources, in order: an override rule that matches the matrix (``budget.overrides``, first
match wins), the budget (``uniform``: the method fitted to the all-in bits matrix by matrix;
``auto``: one menu option per matrix from the global allocator), or the method itself (no budget).
Every target is resolved before any decomposition, so a bad rule or an infeasible budget fails
before the slow work.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lqlr.budget.allocator import CostTable, auto_plan
from lqlr.budget.fit import fit_to_budget
from lqlr.budget.rules import plan_table, resolve_overrides
from lqlr.config import BudgetConfig, QLRConfig
from lqlr.core.arch import target_linears, weight_of


@dataclass
class Plan:
    """``configs[name]``: each matrix's QLRConfig; ``source[name]``: "rule i", "budget", "auto" or
    "method"; ``table``: the allocator's cost table (``budget.mode="auto"`` only)."""

    configs: dict[str, QLRConfig]
    source: dict[str, str]
    base: QLRConfig
    budget: BudgetConfig
    table: CostTable | None = None

    def resolve(self, name: str, shape: tuple[int, int]) -> QLRConfig:
        """The config of matrix ``name`` (out × in = ``shape``); a matrix outside the targets (the LM
        head) takes the method fitted to a uniform budget, or the method as is."""
        if name not in self.configs:
            uniform = self.budget.bits is not None and self.budget.mode == "uniform"
            self.configs[name] = (fit_to_budget(self.base, *shape, self.budget.bits, self.budget.fit) if uniform
                                  else self.base.for_matrix(*shape))
            self.source[name] = "budget" if uniform else "method"
        return self.configs[name]

    def table_md(self, shapes: dict[str, tuple[int, int]]) -> str:
        """Markdown summary of the distinct settings (see :func:`lqlr.budget.rules.plan_table`)."""
        return plan_table(self.configs, shapes, self.source)


def make_plan(model: nn.Module, base: QLRConfig, budget: BudgetConfig, targets=None, ids: torch.Tensor | None = None,
              use_hessian: bool = True, progress: bool = True, cost_cache: str | Path | None = None,
              load_block: Callable[[nn.Module, str], None] | None = None,
              release_block: Callable[[nn.Module], None] | None = None, weights_key: str | None = None,
              device: str | torch.device | None = None) -> Plan | None:
    """The plan of every target linear of ``model`` under ``budget`` (None when there is neither a
    budget nor an override: every matrix takes ``base``). ``budget.mode="auto"`` needs the
    calibration ``ids`` (Hessians and output sensitivities of the uncompressed model, lqlr.budget.allocator);
    ``load_block``/``release_block``/``weights_key``: a lazily loaded model, and ``device`` where the
    cost table's decompositions run, see :func:`auto_plan`."""
    if budget.bits is None and not budget.overrides:
        return None
    names = list(target_linears(model, targets))
    fixed = resolve_overrides(names, budget.overrides or None, base)
    if budget.mode == "auto":
        if ids is None:
            raise ValueError("budget mode auto needs calibration ids: pass calibration= to lqlr.compress")
        configs, table = auto_plan(model, ids, base, budget.bits, budget.menu, targets,
                                   {n: c for n, (_, c) in fixed.items()}, progress, use_hessian, budget.prior, cost_cache,
                                   load_block, release_block, weights_key, device)
        source = {n: (f"rule {fixed[n][0]}" if n in fixed else "auto") for n in configs}
        return Plan(configs, source, base, budget, table)
    plan = Plan({n: cfg for n, (_, cfg) in fixed.items()}, {n: f"rule {i}" for n, (i, _) in fixed.items()}, base, budget)
    for name in names:
        plan.resolve(name, tuple(weight_of(model.get_submodule(name)).shape))
    return plan
