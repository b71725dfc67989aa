"""``lqlr-compress``: the Hydra command line of :func:`lqlr.compress` (cli/ is the only place that imports Hydra).

    lqlr-compress                                   # embedded default: SmolLM2-135M, self-generated calibration, the allocator at 3.5 bits
    lqlr-compress model=stories260k data=wikitext2 method=caldera budget.bits=3 output_dir=out/s3
    lqlr-compress -m method=gptq,caldera budget.bits=2.5,3   # a multirun sweep, one result JSON per run

Config groups ship inside the package (``lqlr/cli/configs``): model/, data/, method/, budget/,
experiment/, hydra/launcher/. The schema is the library's own config dataclasses (lqlr.config):
``data`` is a CalibrationConfig, ``budget`` a BudgetConfig (with its Menu), ``eval`` an
EvalConfig, ``export`` an ExportConfig; only the model choice, the method preset (a QLRConfig plus
how the pipeline uses it) and the runner are CLI-only. Hydra rejects unknown keys and wrong types;
the dataclasses' ``__post_init__`` rejects bad values, with the same message as in Python.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch

from lqlr.budget.fit import InfeasibleBudgetError
from lqlr.config import (
    BUDGET_MODES,
    BudgetConfig,
    CalibrationConfig,
    CompressConfig,
    EvalConfig,
    ExportConfig,
    QLRConfig,
)
from lqlr.core.arch import target_linears
from lqlr.engine.blocks import summary_table
from lqlr.engine.models import load_model
from lqlr.engine.pipeline import compress
from lqlr.engine.runners import check_runner, make_runner
from lqlr.eval.metrics import evaluate_model, size_on_disk
from lqlr.eval.peers import PEERS, quantize_with_peer
from lqlr.io.card import write_model_card
from lqlr.util.memory import peak_rss_mb, reset_peak_rss

log = logging.getLogger("lqlr")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: present in a wheel install too
BACKENDS = ("lqlr", *PEERS)


@dataclass
class ModelConf:
    name: str = "smollm2-135m"  # a known name (stories260k, smollm2-135m), a local HF folder, or a hub id
    targets: Any = None  # PEFT-style target_modules (regex string, or list of names/suffixes/globs); null = all block linears
    lazy: bool = False  # read each block from the safetensors shards only when it is compressed (models > RAM)
    lm_head: bool = False  # also compress the output projection (unties it from tied input embeddings)


@dataclass
class MethodConf(QLRConfig):
    """A method preset: a QLRConfig (validated the same way) plus how the pipeline uses it."""

    name: str = "caldera"
    backend: str = "lqlr"  # lqlr | hqq | bnb (peers run through their own packages; bq/group_size pick their setting)
    use_hessian: bool = True  # false: decompose under H = I (RTN, LoftQ)
    hessian_mode: str = "sequential"  # sequential (GPTQ) | independent (CALDERA)
    seed: Optional[int] = None  # null: the run's seed
    # the budget mode under lqlr-compress's default budget (budget=default): uniform for the peers and
    # baselines (a method is compared at one setting for every matrix), auto (the allocator) for method=lqlr
    default_budget_mode: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"method.backend={self.backend!r}: choose one of {BACKENDS}")
        if self.default_budget_mode not in BUDGET_MODES:
            raise ValueError(f"method.default_budget_mode={self.default_budget_mode!r}: choose one of {BUDGET_MODES}")


@dataclass
class RayConf:
    """runner=ray: where the Ray tasks run and what each one reserves (see lqlr.engine.runners.RayRunner)."""

    address: Optional[str] = None  # null: start a local Ray instance | auto: join this machine's cluster | ray://head:10001
    num_cpus: Optional[int] = None  # CPUs of a local instance (null: all)
    num_cpus_per_task: Optional[float] = None  # null: = threads (1 for a GPU task)
    num_gpus_per_task: Optional[float] = None  # null: 1 when the cluster has GPUs, else 0
    max_retries: int = 3  # retries of a task whose worker died
    pipeline_blocks: Optional[int] = None  # independent Hessians: blocks in flight (null: enough to fill the cluster)


@dataclass
class MainConf:
    model: ModelConf = field(default_factory=ModelConf)
    data: CalibrationConfig = field(default_factory=CalibrationConfig)
    method: MethodConf = field(default_factory=MethodConf)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    output_dir: Optional[str] = None  # null: <hydra run dir>/model
    resume: bool = True  # checkpoint each finished block next to output_dir; a rerun after a crash resumes, a finished run is skipped
    runner: str = "local"  # local (this process) | ray (one Ray task per matrix; same bytes as local)
    threads: Optional[int] = None  # intra-op threads per matrix decomposition, both runners (null: torch's default)
    device: str = "auto"  # where the decompositions run: auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps
    ray: RayConf = field(default_factory=RayConf)
    seed: int = 0  # the decomposition's seed (method.seed overrides it); the calibration sample has data.seed
    progress: bool = True


def register_configs() -> None:
    """Register the schema (the library's dataclasses) with Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema", node=MainConf)
    for group, node in (("model", ModelConf), ("data", CalibrationConfig), ("method", MethodConf), ("budget", BudgetConfig)):
        cs.store(group=group, name=f"{group}_schema", node=node)


def qlr_config(method: MethodConf, seed: int) -> QLRConfig:
    """The QLRConfig a method preset describes, with ``method.seed`` or else the run's ``seed``."""
    keys = {f.name for f in fields(QLRConfig)} - {"seed"}
    return QLRConfig(**{k: v for k, v in asdict(method).items() if k in keys},
                     seed=method.seed if method.seed is not None else seed)


def compress_config(cfg: MainConf) -> CompressConfig:
    """The library config a command line describes."""
    return CompressConfig(qlr=qlr_config(cfg.method, cfg.seed), targets=cfg.model.targets,
                          hessian_mode=cfg.method.hessian_mode, use_hessian=cfg.method.use_hessian,
                          lm_head=cfg.model.lm_head, lazy=cfg.model.lazy, device=cfg.device, calibration=cfg.data,
                          budget=cfg.budget,
                          export=cfg.export)


def finished_result(cfg: MainConf, run_dir: Path) -> Optional[dict]:
    """With ``resume=true``: the stored result of a finished run of exactly this config in ``run_dir``
    (so rerunning an interrupted multirun only runs the missing points), else None."""
    path = run_dir / "result.json"
    if not cfg.resume or not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a torn or foreign file: run again and overwrite it
    if not isinstance(old, dict) or old.get("config") != json.loads(json.dumps(asdict(cfg))):
        return None
    log.warning("%s already holds the result of this config: skipped (resume=false or delete it to recompute)", path)
    return old


def run(cfg: MainConf, run_dir: Path) -> dict:
    """The whole job: load, calibrate, compress, export, evaluate; returns the result record."""
    done = finished_result(cfg, run_dir)
    if done is not None:  # a rerun sweep skips the points it already has
        return done
    t_start = time.perf_counter()
    reset_peak_rss()  # each run of an in-process multirun reports its own peak
    torch.manual_seed(cfg.seed)
    ccfg = compress_config(cfg)  # every value validated before any slow step
    check_runner(cfg.runner, cfg.threads)
    if cfg.method.backend != "lqlr":
        return run_peer(cfg, run_dir, t_start)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else run_dir / "model"
    resume_dir = out_dir.with_name(out_dir.name + ".checkpoints") if cfg.resume else None
    source = {"model": cfg.model.name, "method": cfg.method.name}  # the name the user gave, never a resolved local path
    runner = make_runner(cfg.runner, cfg.threads, cfg.device, **(asdict(cfg.ray) if cfg.runner == "ray" else {}))
    if cfg.model.lazy:  # the dense model is never whole in memory: no KL reference
        model, tokenizer, reference = cfg.model.name, None, None
    else:
        model, tokenizer = load_model(cfg.model.name)
        reference = copy.deepcopy(model) if cfg.eval.enabled else None
    t0 = time.perf_counter()
    try:
        res = compress(model, ccfg, tokenizer=tokenizer, output_dir=out_dir, resume_dir=resume_dir, runner=runner,
                       progress=cfg.progress, source=source)
    finally:
        runner.close()
    compress_s = time.perf_counter() - t0 - res.calibration_s  # as before: calibration is not compression
    reports = res.reports
    n = sum(r.shape[0] * r.shape[1] for r in reports)
    result: dict[str, Any] = {
        "model": cfg.model.name, "method": cfg.method.name, "budget_bits": cfg.budget.bits,
        "bits_per_param": res.bits_per_param,
        "q_bits_per_param": sum(r.q_bits_per_param * r.shape[0] * r.shape[1] for r in reports) / n,
        "bits_counted": "all-in over the compressed block linears: Q codes + scales/zeros, L and R codes + scales, rotation seeds",
        "compressed_params": n, "n_matrices": len(reports),
        "mean_h_error": sum(r.error for r in reports) / len(reports),
        "size_on_disk_bytes": size_on_disk(out_dir), "compress_s": compress_s, "calibration_s": res.calibration_s,
        "plan_s": res.plan_s,
        "output_dir": str(out_dir),
        "calibration": cfg.data.source, "hessian_mode": cfg.method.hessian_mode, "budget_mode": cfg.budget.mode,
        "budget_prior": cfg.budget.prior,
    }
    print(summary_table(reports) if len(reports) <= 40 else summary_table(reports).splitlines()[-1])
    result = finish_result(result, cfg, res.model, reference, res.tokenizer, run_dir, t_start)
    if cfg.eval.enabled:
        write_model_card(out_dir, quality=result)  # the card says what was measured (README.md is not checksummed)
    return result


def finish_result(result: dict, cfg: MainConf, model, reference, tokenizer, run_dir: Path, t_start: float) -> dict:
    """Evaluate (when enabled), add wall time, peak RSS and the config, write result.json, print it."""
    if cfg.eval.enabled:
        result.update(evaluate_model(model, reference, tokenizer, cfg.eval, cfg.progress))
    result["wall_s"] = time.perf_counter() - t_start
    result["peak_rss_mb"] = peak_rss_mb()
    result["config"] = asdict(cfg)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    print(format_result(result))
    return result


def run_peer(cfg: MainConf, run_dir: Path, t_start: float) -> dict:
    """A baseline through its own package (method.backend=hqq|bnb): quantize the target linears in
    place with the peer, evaluate, write result.json. No lqlr export: the size is the peer's stored
    bits plus the untouched tensors in 16 bits."""
    if cfg.method.backend not in PEERS:
        raise ValueError(f"method.backend={cfg.method.backend!r}: choose lqlr or one of {PEERS}")
    if cfg.model.lazy:
        raise ValueError(f"method.backend={cfg.method.backend} quantizes a model in memory: set model.lazy=false")
    model, tokenizer = load_model(cfg.model.name)
    reference = copy.deepcopy(model) if cfg.eval.enabled else None
    default = ({"bits": cfg.method.bq, "group_size": cfg.method.group_size} if cfg.method.backend == "hqq"
               else {"double_quant": True})
    t0 = time.perf_counter()
    records = quantize_with_peer(model, cfg.method.backend, cfg.model.targets, cfg.budget.bits, default,
                                 cfg.budget.fit, cfg.progress)
    compress_s = time.perf_counter() - t0
    n = sum(r["shape"][0] * r["shape"][1] for r in records)
    stored = sum(r["stored_bits"] for r in records)
    compressed = {id(m.weight) for m in target_linears(model, cfg.model.targets).values()}
    untouched = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in compressed)
    result: dict[str, Any] = {
        "model": cfg.model.name, "method": cfg.method.name, "backend": cfg.method.backend,
        "budget_bits": cfg.budget.bits, "bits_per_param": stored / n, "q_bits_per_param": stored / n,
        "bits_counted": f"all-in as {cfg.method.backend} stores them (codes + per-group/block metadata)",
        "compressed_params": n, "n_matrices": len(records),
        "settings": sorted({json.dumps(r["options"], sort_keys=True) for r in records}),
        "mean_rel_frobenius_error": sum(r["rel_error"] for r in records) / len(records),
        "size_on_disk_bytes": (stored + 16 * untouched) // 8, "size_is": "computed: peer bits + untouched in 16 bits",
        "compress_s": compress_s, "output_dir": None, "calibration": None,
    }
    return finish_result(result, cfg, model, reference, tokenizer, run_dir, t_start)


def format_result(r: dict) -> str:
    keys = [("bits_per_param", "all-in bits/param", "{:.3f}"), ("mean_h_error", "mean rel. H-error", "{:.5f}"),
            ("ppl", "WikiText-2 ppl", "{:.3f}"), ("ppl_reference", "reference ppl", "{:.3f}"), ("kl", "KL (nats/token)", "{:.5f}"),
            ("size_on_disk_bytes", "size on disk (bytes)", "{:,}"), ("compress_s", "compress time (s)", "{:.1f}"),
            ("wall_s", "wall time (s)", "{:.1f}"), ("peak_rss_mb", "peak RSS (MB)", "{:.0f}")]
    lines = [f"lqlr: {r['model']} · {r['method']} → {r['output_dir']}"]
    lines += [f"  {label:<22} {fmt.format(r[k])}" for k, label, fmt in keys if r.get(k) is not None]
    return "\n".join(lines)




def main() -> None:
    """Entry point of ``lqlr-compress``."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
    def _app(dcfg) -> None:
        from hydra.types import RunMode

        cfg: MainConf = OmegaConf.to_object(dcfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            run(cfg, run_dir)
        except InfeasibleBudgetError as err:
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                raise
            # one point of a sweep that no setting of the method can reach: record it, go on with the others
            log.error("%s", err)
            (run_dir / "result.json").write_text(json.dumps(
                {"model": cfg.model.name, "method": cfg.method.name, "budget_bits": cfg.budget.bits,
                 "infeasible": str(err), "config": asdict(cfg)}, indent=1))

    _app()


if __name__ == "__main__":
    main()
