"""``lqlr.compress(model, CompressConfig)``: load, calibrate, plan, compress block by block, export.

In the style of torchao's ``quantize_(model, config)`` and peft's ``get_peft_model(model, config)``:
one config object (:class:`lqlr.config.CompressConfig`) says everything about the run; the keyword
arguments only say where things come from and go (tokenizer, precomputed calibration ids, output
and checkpoint folders, the runner).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lqlr.budget.allocator import default_cache_dir
from lqlr.budget.plan import Plan, make_plan
from lqlr.calibrate.text import calibration_from
from lqlr.config import CompressConfig, QLRConfig
from lqlr.core.arch import weight_of
from lqlr.engine.blocks import BlockStats, compress_model
from lqlr.engine.checkpoints import BlockCheckpoints
from lqlr.engine.lazy import folder_tokenizer, lazy_model, resolve_checkpoint
from lqlr.engine.models import load_model
from lqlr.engine.runners import LocalRunner, ModuleReport, RayRunner, local_runner
from lqlr.io.export import check_output_dir, save_compressed
from lqlr.util.devices import resolve_device
from lqlr.util.files import fingerprint
from lqlr.util.meta import release_parameters


@dataclass
class CompressResult:
    """The compressed model (QLRLinear modules swapped in), per-matrix reports, the plan and the export path."""

    model: nn.Module
    tokenizer: Any
    reports: list[ModuleReport]
    output_dir: Path | None
    plan: Plan | None = None  # each matrix's config and its source, when a budget or overrides were given
    calibration: torch.Tensor | None = None  # the (n_samples, seq_len) calibration ids used
    calibration_s: float = 0.0  # seconds spent making the calibration ids (0 when they were given)
    plan_s: float = 0.0  # seconds spent planning (the allocator's sensitivities, Hessians and cost table)
    block_stats: list[BlockStats] | None = None  # per decoder block: time per stage and memory

    @property
    def bits_per_param(self) -> float:
        """All-in bits per parameter over the compressed matrices."""
        n = sum(r.shape[0] * r.shape[1] for r in self.reports)
        return sum(r.bits_per_param * r.shape[0] * r.shape[1] for r in self.reports) / n


def compress(model: nn.Module | str, config: CompressConfig | QLRConfig | None = None, *, tokenizer=None,
             calibration: torch.Tensor | None = None, output_dir: str | Path | None = None,
             resume_dir: str | Path | None = None, runner: LocalRunner | RayRunner | None = None,
             progress: bool = True, cost_cache: str | Path | None = None,
             source: dict[str, Any] | None = None) -> CompressResult:
    """Compress every target linear of ``model`` as Q + L·R, as ``config`` says.

    ``model``: a transformers causal LM, or a name for :func:`lqlr.engine.models.load_model` (a
    known name such as ``"stories260k"``, a local folder or a hub id); with ``config.lazy`` a
    safetensors folder or hub id whose blocks are read one at a time. ``config``: a
    :class:`CompressConfig` (a bare :class:`QLRConfig` is ``CompressConfig(qlr=config)``).
    ``calibration``: precomputed (n_samples, seq_len) token ids instead of ``config.calibration``.
    ``output_dir`` exports the result there (lqlr.io); ``resume_dir`` keeps a checkpoint per
    finished block, so rerunning the same call after a crash resumes with identical output (the
    folder is removed once the export is written). ``runner``: where the matrix decompositions run
    (:func:`lqlr.engine.runners.make_runner`; default this process; Ray gives the same bytes).
    ``cost_cache``: the folder of the allocator's cost tables (default: ``$LQLR_CACHE`` or
    ``~/.cache/lqlr`` when ``config.budget.cache``). ``source``: extra fields for the manifest's
    ``source`` record.
    """
    cfg = config if isinstance(config, CompressConfig) else CompressConfig(qlr=config or QLRConfig())
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
    record = {"model": str(name), **(source or {}), "config": cfg.to_dict()}
    if output_dir is not None:
        check_output_dir(output_dir, record)  # before any slow step: never overwrite another run's export
    load_block = release_block = weights_key = None
    if isinstance(model, str) and cfg.lazy:
        folder = resolve_checkpoint(model)
        model, ckpt, load_block = lazy_model(folder)
        release_block, weights_key = release_parameters, ckpt.key()
        tokenizer = tokenizer or folder_tokenizer(folder)
    elif isinstance(model, str):
        model, tok = load_model(model)
        tokenizer = tokenizer or tok
    elif cfg.lazy:
        raise ValueError("lazy=True reads the checkpoint block by block: pass a folder or hub id, not a loaded model")
    t_calib = time.perf_counter()
    if calibration is None:
        if tokenizer is None:
            raise ValueError("calibration from config.calibration needs a tokenizer: pass tokenizer= or calibration ids")
        calibration = calibration_from(model=model, tokenizer=tokenizer, progress=progress, load_block=load_block,
                                       release_block=release_block, **cfg.calibration.__dict__)
    calibration_s = time.perf_counter() - t_calib
    if cost_cache is None and cfg.budget.mode == "auto" and cfg.budget.cache:
        cost_cache = default_cache_dir()
    t_plan = time.perf_counter()
    plan = make_plan(model, cfg.qlr, cfg.budget, cfg.targets, calibration, cfg.use_hessian, progress, cost_cache,
                     load_block, release_block, weights_key, resolve_device(cfg.device))
    plan_s = time.perf_counter() - t_plan
    if plan is not None and progress:
        shapes = {n: tuple(weight_of(model.get_submodule(n)).shape) for n in plan.configs}
        print(f"per-matrix plan ({cfg.budget.mode} budget {cfg.budget.bits}):\n" + plan.table_md(shapes), flush=True)
    checkpoints = None
    if resume_dir is not None:
        run_id = fingerprint(str(name), calibration, cfg.to_dict())
        checkpoints = BlockCheckpoints(resume_dir, run_id)
    if runner is None:
        runner = local_runner(device=cfg.device)
    block_stats: list[BlockStats] = []
    reports = compress_model(model, calibration, cfg, plan=plan, progress=progress, load_block=load_block,
                             checkpoints=checkpoints, runner=runner, stats=block_stats)
    out = None
    if output_dir is not None:
        out = save_compressed(model, output_dir, source=record, reports=reports, tokenizer=tokenizer,
                              dense_base=cfg.export.dense_base, untouched_dtype=cfg.export.untouched_dtype)
        if resume_dir is not None:
            shutil.rmtree(resume_dir, ignore_errors=True)  # the export is complete: checkpoints are no longer needed
    return CompressResult(model=model, tokenizer=tokenizer, reports=reports, output_dir=out, plan=plan,
                          calibration=calibration, calibration_s=calibration_s, plan_s=plan_s,
                          block_stats=block_stats)

