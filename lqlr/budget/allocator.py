"""Global bit allocation: one (BQ, rank, group, factor bits) per matrix under one all-in budget.

docs/design.md §4. Three steps:

1. ``output_sensitivity``: s_r = mean over calibration tokens of (∂loss/∂y_r)², the diagonal
   Fisher of each target linear's output y. A weight error E changes y by E x, so the loss moves
   by about Σ_r s_r (E H Eᵀ)_rr (gradient and input treated as independent) — comparable across
   matrices, unlike the relative H-error.
2. ``cost_table``: for every matrix and every option of the menu, decompose W under its H (from
   the uncompressed model, ``iters`` outer iterations: a cheap estimate) and record
   cost = Σ_r s_r (E H Eᵀ)_rr and the exact all-in bits.
3. ``lqlr.budget.milp.choose_options``: the multiple-choice knapsack (scipy MILP) picks one option per
   matrix minimising Σ cost with Σ params·bits ≤ budget·Σ params, so the exported model's all-in
   bits are within the budget by construction.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lqlr.budget.milp import choose_options
from lqlr.calibrate.capture import blockwise_hessians
from lqlr.calibrate.diagnostics import rank_ceilings
from lqlr.calibrate.sensitivity import blockwise_sensitivity, output_sensitivity
from lqlr.config import Menu, QLRConfig
from lqlr.core.arch import target_linears, weight_of
from lqlr.core.bits import bits_per_param
from lqlr.core.estimate import option_costs, sensitivity_weighted_error
from lqlr.util.files import atomic_write, fingerprint

PRIORS = ("none", "intrinsic_dimension")


def weighted_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, s: torch.Tensor) -> float:
    """Σ_r s_r (E H Eᵀ)_rr with E = W − Ŵ: the first-order loss change of a weight error."""
    return sensitivity_weighted_error(W - W_hat, H, s)


@dataclass
class CostTable:
    """Per matrix: its options, their estimated costs and all-in bits."""

    names: list[str]
    params: list[int]
    options: list[list[QLRConfig]]
    costs: list[list[float]]
    bits: list[list[float]]

    def to_dict(self) -> dict:
        return dict(names=self.names, params=self.params, options=[[o.to_dict() for o in opts] for opts in self.options],
                    costs=self.costs, bits=self.bits)

    @classmethod
    def from_dict(cls, d: dict) -> "CostTable":
        return cls(names=d["names"], params=d["params"], options=[[QLRConfig(**o) for o in opts] for opts in d["options"]],
                   costs=d["costs"], bits=d["bits"])

    def restricted(self, ceilings: dict[str, int]) -> "CostTable":
        """The table with only ranks ≤ each matrix's ceiling offered (rank 0 always is)."""
        t = CostTable(names=list(self.names), params=list(self.params), options=[], costs=[], bits=[])
        for n, opts, costs, bits in zip(self.names, self.options, self.costs, self.bits):
            keep = [j for j, o in enumerate(opts) if o.rank == 0 or o.rank <= ceilings.get(n, o.rank)] or list(range(len(opts)))
            t.options.append([opts[j] for j in keep])
            t.costs.append([costs[j] for j in keep])
            t.bits.append([bits[j] for j in keep])
        return t


def option_key(cfg: QLRConfig) -> str:
    """A stable name of one menu option (every field of its configuration), for the cost cache."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


def matrix_options(model: nn.Module, names: list[str], menu: Menu, base: QLRConfig,
                   fixed: dict[str, QLRConfig] | None = None) -> dict[str, list[QLRConfig]]:
    """The options offered to each named matrix: its ``fixed`` one, else the menu's for its shape."""
    fixed = fixed or {}
    return {n: [fixed[n]] if n in fixed else menu.options(base, *weight_of(model.get_submodule(n)).shape)
            for n in names}


def missing_options(opts: dict[str, list[QLRConfig]], known: dict[str, dict[str, float]]) -> dict[str, list[QLRConfig]]:
    """The options of each matrix whose cost is not in ``known`` yet."""
    return {n: [c for c in cs if option_key(c) not in known.get(n, {})] for n, cs in opts.items()}


def cost_table(model: nn.Module, hessians: dict[str, tuple[torch.Tensor, int]] | None,
               sensitivity: dict[str, torch.Tensor] | None, menu: Menu, base: QLRConfig,
               fixed: dict[str, QLRConfig] | None = None, progress: bool = True, use_hessian: bool = True,
               known: dict[str, dict[str, float]] | None = None, names: list[str] | None = None,
               device: str | torch.device | None = None) -> CostTable:
    """Cost and all-in bits of every menu option of every matrix (``fixed``: matrices with one given option).

    The options of a matrix are costed together by :func:`lqlr.core.estimate.option_costs` (one
    rotation and factorisation of H, one LR step per rank, one stacked LDLQ pass per Q grid; the Q
    step on ``menu.cost_rows`` sampled rows). ``use_hessian=False`` decomposes under H = I (the
    cost is still measured under the real H). ``known``: costs already measured, {matrix:
    {option_key: cost}}; only the missing ones are computed (``hessians``/``sensitivity`` may then
    be None if nothing is missing), and ``known`` is filled in place. ``device``: where the
    decompositions run (None: where each weight is)."""

    known = {} if known is None else known
    names = list(names if names is not None else hessians)
    shapes = {n: tuple(weight_of(model.get_submodule(n)).shape) for n in names}
    opts = matrix_options(model, names, menu, base, fixed)
    todo = missing_options(opts, known)
    work = sum(len(v) for v in todo.values())
    if work and (hessians is None or sensitivity is None):
        raise ValueError("cost_table: Hessians and sensitivities are needed for the options not in `known`")
    bar = tqdm(total=work, desc="cost table", disable=not progress or not work)
    for n in names:
        if not todo[n]:
            continue
        W = weight_of(model.get_submodule(n)).detach().to(device=device, dtype=torch.float32)  # (out, in)
        H = hessians[n][0].to(device=W.device, dtype=torch.float32)
        # cost of each option: the sensitivity-weighted output error of its decomposition of W
        costs = option_costs(W, H, todo[n], sensitivity[n], decompose_under="same" if use_hessian else None,
                             rows=menu.cost_rows, seed=base.seed)
        for cfg, c in zip(todo[n], costs):
            known.setdefault(n, {})[option_key(cfg)] = c
        bar.update(len(todo[n]))
    bar.close()
    return CostTable(names=names, params=[shapes[n][0] * shapes[n][1] for n in names],
                     options=[opts[n] for n in names],
                     costs=[[known[n][option_key(c)] for c in opts[n]] for n in names],
                     bits=[[bits_per_param(*shapes[n], c) for c in opts[n]] for n in names])


def default_cache_dir() -> Path:
    """Where cost tables are kept between runs: $LQLR_CACHE/cost_tables, or ~/.cache/lqlr/cost_tables."""
    return Path(os.environ.get("LQLR_CACHE") or Path.home() / ".cache" / "lqlr") / "cost_tables"


def _save_costs(path: Path, known: dict[str, dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(known)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def allocate_plan(table: CostTable, budget: float, iters: int) -> dict[str, QLRConfig]:
    """One option per matrix from the MILP, with the method's outer iterations restored for the final run."""

    choice = choose_options(table.costs, table.bits, table.params, budget)
    return {n: replace(opts[j], iters=iters if opts[j].rank else 1)
            for n, opts, j in zip(table.names, table.options, choice)}


def auto_plan(model: nn.Module, ids: torch.Tensor, base: QLRConfig, budget: float, menu: Menu | None = None,
              targets=None, fixed: dict[str, QLRConfig] | None = None, progress: bool = True,
              use_hessian: bool = True, prior: str = "none", cache_dir: str | Path | None = None,
              load_block: Callable[[nn.Module, str], None] | None = None,
              release_block: Callable[[nn.Module], None] | None = None,
              weights_key: str | None = None,
              device: str | torch.device | None = None) -> tuple[dict[str, QLRConfig], CostTable]:
    """The allocator end to end on an uncompressed model: Hessians, sensitivities, cost table, MILP.

    ``prior="intrinsic_dimension"`` offers each matrix only ranks ≤ 2 × its block's TwoNN dimension.
    ``cache_dir``: costs do not depend on the budget or the prior, so every measured (matrix,
    option) cost is stored there (one file per weights + calibration ids + targets, keyed inside by
    the option's full configuration) and reused by later runs: other budgets cost nothing, and a
    wider menu computes only its new options.
    ``load_block`` / ``release_block`` (lazy loading: the decoder blocks' weights are on meta): every
    pass (sensitivities, Hessians, costs) holds one block's weights at a time; ``weights_key`` then
    names the weights for the cache (the checkpoint's files), as they cannot be hashed unread.
    ``device``: where the cost table's decompositions run (None: where the weights are).
    """
    if prior not in PRIORS:
        raise ValueError(f"budget.prior={prior!r}: choose one of {PRIORS}")
    lazy = load_block is not None
    if lazy and prior != "none":
        raise ValueError(f"budget.prior={prior!r} runs the whole model at once, which a lazily loaded model cannot: "
                         "use budget.prior=none with model.lazy=true")
    menu = menu or Menu()
    names = list(target_linears(model, targets))
    known: dict[str, dict[str, float]] = {}
    path = None
    if cache_dir is not None:
        weights = [weights_key] if lazy else [weight_of(model.get_submodule(n)).detach() for n in names]
        # sensitivity_samples joins the key only when set, so the caches written before it existed stay valid
        key = fingerprint(*weights, ids, names, use_hessian, menu.cost_rows,
                          *(() if menu.sensitivity_samples is None else (menu.sensitivity_samples,)))
        path = Path(cache_dir) / f"{key[:32]}.costs.json"
        if path.is_file():
            known = json.loads(path.read_text())
    todo = missing_options(matrix_options(model, names, menu, base, fixed), known)
    if any(todo.values()):  # (every option already measured: no Hessians, sensitivities or decompositions at all)
        sens_ids = ids if menu.sensitivity_samples is None else ids[: menu.sensitivity_samples]
        if lazy:
            sens = blockwise_sensitivity(model, sens_ids, names, load_block, release_block, progress=progress)
        else:
            sens = output_sensitivity(model, sens_ids, names, progress=progress)
        wanted = [n for n in names if todo[n]]
        # one block's Hessians at a time: captured, turned into that block's costs, then freed
        for _, hessians in blockwise_hessians(model, ids, wanted, progress=progress, load_block=load_block,
                                              release_block=release_block):
            cost_table(model, hessians, sens, menu, base, fixed, False, use_hessian, known, list(hessians), device)
            del hessians
            if path is not None:  # an interrupted run keeps every finished block's costs
                _save_costs(path, known)
        del sens
    table = cost_table(model, None, None, menu, base, fixed, False, use_hessian, known, names)
    if prior == "intrinsic_dimension":
        table = table.restricted(rank_ceilings(model, ids, names))
    return allocate_plan(table, budget, base.iters), table
