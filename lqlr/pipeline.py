"""`lqlr.compress`: model name (or model) → calibrated, compressed, optionally exported model."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compress import CompressConfig, ModuleReport, compress_model
from .config import QLRConfig


@dataclass
class CompressResult:
    """The compressed model (QLRLinear modules swapped in), per-matrix reports and the export path."""

    model: nn.Module
    tokenizer: Any
    reports: list[ModuleReport]
    output_dir: Path | None
    plan: Any = None  # the per-matrix plan (``plan.configs``, ``plan.source``) when a budget or overrides were given

    @property
    def bits_per_param(self) -> float:
        """All-in bits per parameter over the compressed matrices."""
        n = sum(r.shape[0] * r.shape[1] for r in self.reports)
        return sum(r.bits_per_param * r.shape[0] * r.shape[1] for r in self.reports) / n


def budget_plan(model: nn.Module, base: QLRConfig, bits: float | None, targets=None, mode: str = "below",
                overrides: list | None = None):
    """``plan(name)``: each matrix's config. The first matching override rule (lqlr.plan) fixes a
    matrix's config; the others take ``base``'s method fitted to the all-in budget ``bits`` (see
    lqlr.budget; ``None``: ``base`` as is). Every target is resolved up front, so a bad rule or an
    infeasible budget fails before any work. ``plan.source[name]`` says where each config came from."""
    from .arch import target_linears, weight_of
    from .budget import fit_to_budget
    from .plan import resolve_overrides

    names = list(target_linears(model, targets))
    fixed = resolve_overrides(names, overrides, base)
    cache: dict[str, QLRConfig] = {n: cfg for n, (_, cfg) in fixed.items()}
    source = {n: f"rule {i}" for n, (i, _) in fixed.items()}

    def plan(name: str) -> QLRConfig:
        if name not in cache:
            cache[name] = (fit_to_budget(base, *weight_of(model.get_submodule(name)).shape, bits, mode)
                           if bits is not None else base)
            source[name] = "budget" if bits is not None else "method"
        return cache[name]

    for name in names:
        plan(name)
    plan.source = source  # type: ignore[attr-defined]
    plan.configs = cache  # type: ignore[attr-defined]
    return plan


def auto_budget_plan(model: nn.Module, ids: torch.Tensor, base: QLRConfig, bits: float, targets=None,
                     overrides: list | None = None, menu=None, use_hessian: bool = True, progress: bool = True,
                     prior: str = "none", cost_cache: str | Path | None = None):
    """``plan(name)`` from the global allocator (lqlr.allocate): one menu option per matrix chosen by
    a MILP so that the all-in bits of all target matrices together stay within ``bits``. Override
    rules fix their matrices (one option each) and count against the same budget."""
    from .allocate import auto_plan
    from .arch import target_linears
    from .plan import resolve_overrides

    if bits is None:
        raise ValueError("budget mode auto needs budget.bits: the all-in bits/param the allocator must stay within")
    fixed = resolve_overrides(list(target_linears(model, targets)), overrides, base)
    configs, table = auto_plan(model, ids, base, bits, menu, targets, {n: c for n, (_, c) in fixed.items()},
                               progress, use_hessian, prior, cost_cache)
    source = {n: (f"rule {fixed[n][0]}" if n in fixed else "auto") for n in configs}

    def plan(name: str) -> QLRConfig:
        return configs[name] if name in configs else base

    plan.source = source  # type: ignore[attr-defined]
    plan.configs = configs  # type: ignore[attr-defined]
    plan.table = table  # type: ignore[attr-defined]
    return plan


def compress(model: nn.Module | str, calibration: torch.Tensor | str = "self", config: QLRConfig | CompressConfig | None = None,
             tokenizer=None, budget_bits: float | None = None, output_dir: str | Path | None = None,
             n_samples: int = 32, seq_len: int = 256, seed: int = 0, dense_base: bool = False,
             progress: bool = True, lazy: bool = False, resume_dir: str | Path | None = None,
             budget_fit: str = "below", runner=None, budget_mode: str = "uniform", overrides: list | None = None,
             menu=None, prior: str = "none", cost_cache: str | Path | None = None) -> CompressResult:
    """Compress every linear in the decoder blocks of ``model`` as Q + L·R.

    ``model``: a transformers causal LM or a name for :func:`lqlr.models.load_model`.
    ``calibration``: token ids (n, seq_len), or ``"self"`` (sampled from the model), ``"wikitext2"``
    (validation split), or a path to a text file/folder. ``budget_bits`` fits each matrix's rank
    (Q + L·R) or BQ (Q only) to that all-in budget (``budget_fit="nearest"``: Q-only methods take the
    bits and group size nearest to it, see :func:`lqlr.budget.fit_to_budget`). ``output_dir`` exports the result there.
    ``lazy=True`` (``model`` a safetensors folder or hub id) reads each decoder block from the
    checkpoint only when it is compressed, so the dense model never has to fit in memory.
    ``budget_mode="auto"`` lets the global allocator (lqlr.allocate) choose each matrix's BQ, rank,
    group and factor bits from ``menu`` (a :class:`lqlr.allocate.Menu`) so that the all-in bits of
    all matrices together stay within ``budget_bits`` (``prior="intrinsic_dimension"``: ranks capped at
    2 × each block's TwoNN dimension, lqlr.diagnostics; ``cost_cache``: a folder where the budget-independent
    cost table is kept and reused by later runs). ``overrides``: ordered rules
    ``{"match": glob or "re:regex", **QLRConfig fields}`` fixing matching matrices (lqlr.plan).
    ``resume_dir`` keeps a checkpoint per finished block there; rerunning the same call after a crash
    resumes and gives identical output (the folder is removed once the export is written).
    ``runner``: where the matrix decompositions run (:func:`lqlr.runners.make_runner`; default: in
    this process); a Ray runner gives the same bytes as the local one.
    """
    from .data import calibration_from
    from .export import check_output_dir, save_compressed
    from .models import load_model

    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
    load_block = None
    if isinstance(model, str) and lazy:
        from transformers import AutoTokenizer

        from .lazy import lazy_model, resolve_checkpoint

        folder = resolve_checkpoint(model)
        model, _, load_block = lazy_model(folder)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder)
    elif isinstance(model, str):
        model, tok = load_model(model)
        tokenizer = tokenizer or tok
    ccfg = config if isinstance(config, CompressConfig) else CompressConfig(qlr=config or QLRConfig())
    if ccfg.qlr.seed != seed and config is None:
        ccfg = replace(ccfg, qlr=replace(ccfg.qlr, seed=seed))
    if isinstance(calibration, str):
        if tokenizer is None:
            raise ValueError(f"calibration={calibration!r} needs a tokenizer: pass tokenizer= or token ids")
        source = calibration if calibration in ("self", "wikitext2") else "text"
        ids = calibration_from(source, model, tokenizer, n_samples, seq_len, seed, path=calibration, progress=progress)
    else:
        ids = calibration
    source = {"model": str(name), "qlr": ccfg.qlr.to_dict(), "budget_bits": budget_bits, "budget_fit": budget_fit,
              "budget_mode": budget_mode, "overrides": overrides, "prior": prior, "menu": asdict(menu) if menu is not None else None,
              "hessian_mode": ccfg.hessian_mode, "targets": ccfg.targets}
    if output_dir is not None:
        check_output_dir(output_dir, source)  # before any slow step
    if budget_mode not in ("uniform", "auto"):
        raise ValueError(f"budget mode {budget_mode!r}: choose uniform or auto")
    if budget_mode == "auto" and load_block is not None:
        raise ValueError("budget mode auto measures every matrix on the whole model: it does not run with lazy=True")
    if budget_mode == "auto":
        plan = auto_budget_plan(model, ids, ccfg.qlr, budget_bits, ccfg.targets, overrides, menu, ccfg.use_hessian,
                                progress, prior, cost_cache)
    elif budget_bits is not None or overrides:
        plan = budget_plan(model, ccfg.qlr, budget_bits, ccfg.targets, budget_fit, overrides)
    else:
        plan = None
    if plan is not None and progress:
        from .arch import weight_of
        from .plan import plan_table

        shapes = {n: tuple(weight_of(model.get_submodule(n)).shape) for n in plan.configs}
        print(f"per-matrix plan ({budget_mode} budget {budget_bits}):\n" + plan_table(plan.configs, shapes, plan.source),
              flush=True)
    checkpoints = None
    if resume_dir is not None:
        from .checkpoint import BlockCheckpoints, fingerprint

        run_id = fingerprint(str(name), ids, ccfg.qlr.to_dict(), ccfg.targets, ccfg.hessian_mode, ccfg.use_hessian,
                             ccfg.lm_head, budget_bits, budget_fit, budget_mode, overrides,
                             asdict(menu) if menu is not None else None, prior)
        checkpoints = BlockCheckpoints(resume_dir, run_id)
    reports = compress_model(model, ids, ccfg, plan=plan, progress=progress, load_block=load_block,
                             checkpoints=checkpoints, runner=runner)
    out = None
    if output_dir is not None:
        out = save_compressed(model, output_dir, source=source, reports=reports, tokenizer=tokenizer, dense_base=dense_base)
    if resume_dir is not None and output_dir is not None:
        import shutil

        shutil.rmtree(resume_dir, ignore_errors=True)
    return CompressResult(model=model, tokenizer=tokenizer, reports=reports, output_dir=out, plan=plan)
