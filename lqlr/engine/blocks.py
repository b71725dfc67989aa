"""Compress a causal LM block by block: capture H of each target linear, decompose, swap in QLRLinear.

Only the current block's calibration activations are kept (one hidden-state tensor per batch).
Two ways to get each block's inputs:

* ``sequential`` (GPTQ style): block i sees the outputs of the already-compressed blocks < i, so
  later blocks learn to absorb earlier errors;
* ``independent`` (CALDERA style): every H comes from the original model, so every matrix could
  be decomposed in parallel.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lqlr.budget.plan import Plan
from lqlr.calibrate.capture import block_inputs, capture_hessians, hessian_hooks, run_block
from lqlr.config import CompressConfig, QLRConfig
from lqlr.core.arch import find_blocks, is_conv1d, set_module, target_linears, weight_of
from lqlr.engine.checkpoints import BlockCheckpoints
from lqlr.engine.runners import LocalRunner, MatrixJob, ModuleReport, RayRunner
from lqlr.nn.layer import dense_cache
from lqlr.util.devices import resolve_device
from lqlr.util.memory import peak_rss_mb, rss_mb


@dataclass
class BlockStats:
    """Where one decoder block's time went, and the memory high-water marks when it finished."""

    block: int
    wall_s: float = 0.0  # from the start of the block to its checkpoint
    load_s: float = 0.0  # reading its weights (lazy loading)
    forward_s: float = 0.0  # calibration forward passes through the block, Hessian accumulation excluded
    hessian_s: float = 0.0  # accumulating Σ xᵀx of the block's inputs
    decompose_s: float = 0.0  # the decompositions of its matrices
    pack_s: float = 0.0  # building the packed QLRLinear modules
    checkpoint_s: float = 0.0  # writing the block's checkpoint
    peak_rss_mb: float = 0.0  # process peak RSS so far (it only grows)
    rss_mb: float = 0.0  # RSS when the block finished
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated so far, when CUDA is in use
    resumed: bool = False  # reloaded from an earlier run's checkpoint

    def to_dict(self) -> dict:
        return asdict(self)


def _memory(stat: BlockStats) -> None:
    stat.peak_rss_mb, stat.rss_mb = peak_rss_mb(), rss_mb()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stat.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20


def compress_model(model: nn.Module, calib_ids: torch.Tensor, cfg: CompressConfig,
                   plan: Plan | None = None, progress: bool = True,
                   load_block: Callable[[nn.Module, str], None] | None = None,
                   checkpoints: BlockCheckpoints | None = None,
                   runner: LocalRunner | RayRunner | None = None,
                   stats: list[BlockStats] | None = None) -> list[ModuleReport]:
    """Replace every target linear of ``model`` (in place) by a QLRLinear; returns one report per matrix.

    ``plan``: each matrix's QLRConfig (:class:`lqlr.budget.plan.Plan`; None: ``cfg.qlr`` for all).
    ``load_block(block, prefix)`` is called before a block is used (lazy, shard-by-shard loading).
    ``checkpoints`` saves each finished block and reloads blocks a killed run already finished.
    ``runner`` decomposes the matrices (default: :class:`lqlr.runners.LocalRunner`, in this process).
    ``stats``: a list that receives one :class:`BlockStats` per block (time per stage, memory).
    Hessians are captured here, block by block; a block's matrices go to the runner together. In
    ``independent`` mode the next blocks' Hessians are captured while earlier blocks are still being
    decomposed (up to ``runner.depth`` blocks in flight); blocks are applied and checkpointed in order.
    """
    if calib_ids.ndim != 2 or calib_ids.shape[1] < 2:
        raise ValueError(f"calibration ids must be (n_samples, seq_len >= 2), got shape {tuple(calib_ids.shape)}")
    runner = runner if runner is not None else LocalRunner()
    model.eval()
    path, blocks = find_blocks(model)
    targets = target_linears(model, cfg.targets)
    inputs = block_inputs(model, blocks[0], calib_ids, cfg.batch_size)
    # each block runs on the compute device (its weights and the hidden states moved there), then goes home
    home = inputs[0][0].device
    compute = resolve_device(cfg.device)
    if compute != home:
        inputs = [_moved(entry, compute) for entry in inputs]
    block_reports: dict[int, list[ModuleReport]] = {}
    pending: deque = deque()  # (block index, prefix, names, runner handle), oldest first
    bar = tqdm(range(len(blocks)), desc="blocks", disable=not progress)
    block_stats: dict[int, BlockStats] = {}
    started: dict[int, float] = {}
    current = -1  # the block the loop is on

    def finish(i: int, prefix: str, names: list[str], handle) -> None:
        results = runner.gather(handle)
        for n, res in zip(names, results):
            set_module(model, n, res.module)  # the dense weight goes with the last reference to it
            bar.set_postfix(matrix=n[len(prefix):], err=f"{res.report.error:.4f}", bits=f"{res.report.bits_per_param:.2f}")
        block_reports[i] = [res.report for res in results]
        stat = block_stats[i]
        stat.decompose_s = sum(r.report.time_s for r in results)
        stat.pack_s = sum(r.report.pack_s for r in results)
        if checkpoints is not None:
            t0 = time.perf_counter()
            checkpoints.save(i, {n: res.module for n, res in zip(names, results)}, [r.report.to_dict() for r in results])
            stat.checkpoint_s = time.perf_counter() - t0
        if compute != home and i != current:
            blocks[i].to(home)  # (the block in use goes home at the end of its iteration)
        stat.wall_s = time.perf_counter() - started[i]
        _memory(stat)

    def forward(i: int, block: nn.Module) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        outputs = run_block(block, inputs)
        block_stats[i].forward_s += time.perf_counter() - t0
        return outputs

    try:
        for i in bar:
            block = blocks[i]
            prefix = f"{path}.{i}."
            current = i
            started[i] = time.perf_counter()
            block_stats[i] = stat = BlockStats(block=i)
            if load_block is not None:
                load_block(block, prefix)
                stat.load_s = time.perf_counter() - started[i]
            if compute != home:
                block.to(compute)
            names = [n for n in targets if n.startswith(prefix)]
            saved = checkpoints.load(i) if checkpoints is not None else None
            if saved is not None:  # finished by an earlier, interrupted run: reuse it bit for bit
                modules, saved_reports = saved
                outputs = forward(i, block) if cfg.hessian_mode == "independent" else None
                for n, m in modules.items():
                    set_module(model, n, m.to(compute))
                    targets.pop(n, None)
                block_reports[i] = [ModuleReport(**{**r, "shape": tuple(r["shape"])}) for r in saved_reports]
                if outputs is None:
                    with dense_cache(block):  # as the uninterrupted run's pass below, for the same bits
                        outputs = forward(i, block)
                for entry, out in zip(inputs, outputs):
                    entry[0] = out
                if compute != home:
                    block.to(home)
                stat.resumed, stat.wall_s = True, time.perf_counter() - started[i]
                _memory(stat)
                continue
            # H of each target's input: a running mean over every calibration token
            if names:
                with hessian_hooks({n: targets[n] for n in names}) as hooks:
                    outputs = forward(i, block)
                hessians = hooks.hessians()
                stat.hessian_s = hooks.seconds
                stat.forward_s -= hooks.seconds
                del hooks
            else:
                outputs, hessians = forward(i, block), {}
            jobs = []
            for n in names:
                module = targets.pop(n)
                jobs.append(_job(n, module, hessians.pop(n), _config(plan, n, weight_of(module).shape, cfg), cfg.use_hessian))
            pending.append((i, prefix, names, runner.submit(jobs)))
            del jobs
            depth = runner.depth(len(names)) if cfg.hessian_mode == "independent" else 0
            while len(pending) > depth:
                finish(*pending.popleft())
            if names and cfg.hessian_mode == "sequential":
                with dense_cache(block):  # Q, L, R dense for this pass: no dequantization or rotation per call
                    outputs = forward(i, block)  # the next block sees this block's compressed outputs
            for entry, out in zip(inputs, outputs):
                entry[0] = out
            if i in block_reports:  # finished in this iteration (always, in sequential mode)
                if compute != home:
                    block.to(home)  # one block on the compute device at a time
                stat.wall_s = time.perf_counter() - started[i]
                _memory(stat)
        current = -1  # the blocks still in flight are not in use any more: they go home when finished
        while pending:
            finish(*pending.popleft())
    except Exception:
        if checkpoints is not None:  # keep every block in flight whose matrices all finished
            while pending:
                try:
                    finish(*pending.popleft())
                except Exception:
                    pass
        raise
    reports = [r for i in sorted(block_reports) for r in block_reports[i]]
    if stats is not None:
        stats.extend(block_stats[i] for i in sorted(block_stats))
    if cfg.lm_head:
        reports.append(_compress_lm_head(model, calib_ids, cfg, plan, runner))
    return reports


def _moved(obj, device: torch.device):
    """``obj`` with every tensor inside (lists, tuples, dicts) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        moved = [_moved(x, device) for x in obj]
        return moved if isinstance(obj, list) else type(obj)(moved)
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    return obj


def _config(plan: Plan | None, name: str, shape, cfg: CompressConfig) -> QLRConfig:
    return plan.resolve(name, tuple(shape)) if plan is not None else cfg.qlr.for_matrix(*shape)


def _job(name: str, module: nn.Module, hessian: tuple[torch.Tensor, int], qcfg: QLRConfig, use_hessian: bool) -> MatrixJob:
    """Everything the decomposition of one linear needs (see :func:`lqlr.engine.runners.run_job`)."""
    bias = getattr(module, "bias", None)
    H, n_tokens = hessian
    return MatrixJob(name=name, W=weight_of(module), H=H, qcfg=qcfg, use_hessian=use_hessian,
                     bias=bias.detach() if bias is not None else None,
                     kind="conv1d" if is_conv1d(module) else "linear", n_tokens=n_tokens)


def _compress_lm_head(model: nn.Module, calib_ids: torch.Tensor, cfg: CompressConfig, plan: Plan | None,
                      runner: LocalRunner | RayRunner) -> ModuleReport:
    """Compress the output projection under the H of the (already compressed) model's final hidden states."""
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    if getattr(model.config, "tie_word_embeddings", False):
        head.weight = nn.Parameter(head.weight.detach().clone())  # untie: the input embeddings stay as they are
        model.config.tie_word_embeddings = False
    (hessian,) = capture_hessians(model, calib_ids, {name: head}, cfg.batch_size, progress=False).values()
    job = _job(name, head, hessian, _config(plan, name, weight_of(head).shape, cfg), cfg.use_hessian)
    (res,) = runner.gather(runner.submit([job]))
    set_module(model, name, res.module)  # the dense weight goes with the last reference to ``head``
    return res.report


def summary_table(reports: list[ModuleReport]) -> str:
    """Markdown table of per-matrix results and the parameter-weighted total."""
    lines = ["| module | shape | rank | all-in bits | rel. H-error | time (s) |", "|---|---|---:|---:|---:|---:|"]
    for r in reports:
        lines.append(f"| {r.name} | {r.shape[0]}×{r.shape[1]} | {r.rank} | {r.bits_per_param:.3f} | {r.error:.5f} | {r.time_s:.1f} |")
    n = sum(r.shape[0] * r.shape[1] for r in reports)
    bits = sum(r.bits_per_param * r.shape[0] * r.shape[1] for r in reports) / max(n, 1)
    err = sum(r.error for r in reports) / max(len(reports), 1)
    lines.append(f"| **all {len(reports)} matrices** | {n:,} params | | **{bits:.3f}** | {err:.5f} (mean) | {sum(r.time_s for r in reports):.1f} |")
    return "\n".join(lines)
