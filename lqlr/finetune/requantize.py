"""Put a trained adapter's B, A back on the export's L, R grids: an lqlr export again, at the same all-in bits."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from lqlr.calibrate.capture import blockwise_hessians
from lqlr.calibrate.text import calibration_ids, wikitext2_text
from lqlr.core.grids import Grid, QuantizedTensor, make_grid, quantize_rtn
from lqlr.core.hessian import cholesky, h_weighted_error, regularize
from lqlr.core.ldlq import ldlq_plan
from lqlr.core.lowrank import alternate_factors, rank_k_fit
from lqlr.finetune.lora import lora_factors
from lqlr.io.card import write_model_card
from lqlr.io.export import (
    ADAPTER_DIR,
    BASE_FILE,
    DENSE_DIR,
    MANIFEST,
    read_manifest,
    save_adapter,
    save_tensors,
    write_manifest,
)
from lqlr.io.load import load
from lqlr.nn.layer import FP16


def _copy_export(src: Path, out: Path) -> None:
    """A copy of the export ``src`` at ``out`` (which must not exist yet), its manifest left out."""

    if out.exists():
        raise FileExistsError(f"{out} already exists: choose another output folder or delete it")
    shutil.copytree(src, out, ignore=lambda d, names: [n for n in names if n == MANIFEST and Path(d) == src])


METHODS = ("hessian", "frobenius", "nearest")


@dataclass
class RequantizeConfig:
    """How a trained adapter's B, A go back onto the export's L, R grids.

    ``hessian`` (default): min tr((L̂ R̂ − B A) H (L̂ R̂ − B A)ᵀ) over L̂, R̂ on their grids, H the
    layer's input second moment on ``n_samples`` × ``seq_len`` tokens of the training text (run
    through the fine-tuned model): the LR step's alternation, each factor rounded by LDLQ.
    ``frobenius``: the same alternation with H = I (no data). ``nearest``: each trained factor to its
    nearest grid point, no refit: exactly the function that ``train.qat=true`` trained.
    """

    method: str = "hessian"
    n_samples: int = 32
    seq_len: int = 512
    batch_size: int = 8
    lr_iters: int = 5  # alternations of the factor refits (the best iterate is kept)
    damp: Optional[float] = None  # ridge on H (None: the export's qlr.damp)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"requantize method={self.method!r}: choose one of {', '.join(METHODS)}")
        for name in ("n_samples", "seq_len", "batch_size", "lr_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"requantize {name}={getattr(self, name)}: must be >= 1")
        if self.damp is not None and self.damp < 0:
            raise ValueError(f"requantize damp={self.damp}: must be >= 0 (null: the export's own)")


def factor_grid(spec: dict, cols: int) -> Grid | None:
    """The grid a stored factor of ``cols`` columns is on, from its spec (None: fp16)."""
    if spec["kind"] == FP16:
        return None
    return make_grid(spec["kind"], spec["bits"], min(spec["group_size"], cols))


def _stored(x: torch.Tensor, q: QuantizedTensor | None, prefix: str) -> dict[str, torch.Tensor]:
    if q is None:
        return {f"{prefix}_weight": x.to(torch.float16)}
    return {f"{prefix}_{k}": v for k, v in q.packed().items()}


def nearest_on_grid(x: torch.Tensor, grid: Grid | None) -> tuple[torch.Tensor, QuantizedTensor | None]:
    """x on its grid by round-to-nearest (fp16 when the grid is None): values and storage."""
    if grid is None:
        return x.to(torch.float16).to(torch.float32), None
    q = quantize_rtn(x, grid)
    return q.dequantize(), q


def rotate_pair(B: torch.Tensor, A: torch.Tensor, module) -> tuple[torch.Tensor, torch.Tensor]:
    """(U B, A Vᵀ): a trained pair (B (out, k), A (k, in), original basis) in the module's stored basis."""
    rot = module.incoherence
    return (rot.U.apply(B.T).T, rot.V.apply(A)) if rot else (B, A)


def requantize_factors(B: torch.Tensor, A: torch.Tensor, module, H: torch.Tensor | None = None,
                       cfg: RequantizeConfig | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Packed l_*/r_* tensors of a trained pair (B (out, k) with the LoRA scale folded in, A (k, in),
    original basis) on the grids of ``module.spec``, and the rounding's errors.

    The pair is rotated into the stored basis (L' = U B, R' = A Vᵀ, H' = V H Vᵀ). ``hessian`` and
    ``frobenius`` alternate from two real starts — the trained (L', R') and the balanced closed-form
    split of L' R' under H' — and keep the lower tr(Δ H' Δᵀ) (H = I for ``frobenius``). Errors: the
    relative Frobenius error ``rel_error`` of B A, and, with H, the relative output error ``h_rel_error`` =
    tr(Δ H Δᵀ) / tr(B A H (B A)ᵀ).
    """
    cfg = cfg or RequantizeConfig()
    spec = module.spec
    if module.rank == 0 or "l" not in spec:
        raise ValueError("module with spec rank 0 has no L, R bit budget: requantize needs an export with L, R "
                         "(rank > 0), e.g. from method=lqlr")
    if B.shape[1] != module.rank or A.shape[0] != module.rank:
        raise ValueError(f"adapter rank {B.shape[1]} differs from the export's rank {module.rank}: "
                         "requantize needs the adapter trained on this export")
    if cfg.method == "hessian" and H is None:
        raise ValueError("requantize method=hessian needs the layer's H: pass H, or use method=frobenius")
    k = module.rank
    Ls, Rs = rotate_pair(B.float(), A.float(), module)
    grid_L, grid_R = factor_grid(spec["l"], k), factor_grid(spec["r"], Rs.shape[1])
    T = Ls @ Rs  # (out, in): the trained L' R', the target
    Hr = None
    if H is not None:
        rot = module.incoherence
        Hr = rot.rotate_hessian(H.float()) if rot else H.float()
    if cfg.method == "nearest":
        L, qL = nearest_on_grid(Ls, grid_L)
        R, qR = nearest_on_grid(Rs, grid_R)
    else:
        damp = spec.get("config", {}).get("damp", 0.01) if cfg.damp is None else cfg.damp
        plan = ldlq_plan(regularize(Hr, damp)) if cfg.method == "hessian" else None
        C = cholesky(plan.damped.H) if plan is not None else None
        starts = [(Ls, Rs), rank_k_fit(T, C, k, seed=cfg.seed)]
        best, best_obj = None, float("inf")
        for L0, R0 in starts:
            # min over L, R on their grids of tr((T − L R) H (T − L R)ᵀ), from this start
            f = alternate_factors(T, plan, L0, R0, grid_L, grid_R, cfg.lr_iters, damp)
            obj = h_weighted_error(T - f.L @ f.R, None if plan is None else plan.damped.H)
            if obj < best_obj:
                best, best_obj = f, obj
        L, R, qL, qR = best.L, best.R, best.qL, best.qR
    out = {**_stored(L, qL, "l"), **_stored(R, qR, "r")}
    E = L @ R - T
    errors = {"rel_error": float(torch.linalg.norm(E) / torch.linalg.norm(T).clamp_min(1e-30))}
    if Hr is not None:
        errors["h_rel_error"] = h_weighted_error(E, Hr) / max(h_weighted_error(T, Hr), 1e-30)
    return out, errors


def _layer_hessians(trained, names: list[str], tokenizer, text: str, cfg: RequantizeConfig, progress: bool):
    """``(block, {name: H})`` of the fine-tuned model (packed Q + trained B A) on ``cfg.n_samples`` ×
    ``cfg.seq_len`` windows of ``text``, one decoder block at a time."""
    ids = calibration_ids(tokenizer, text, cfg.n_samples, cfg.seq_len, cfg.seed)
    inner = trained.base_model.model  # the transformers model, its linears wrapped by PEFT
    with torch.no_grad():
        for block, hs in blockwise_hessians(inner, ids, names, cfg.batch_size, progress=progress):
            yield block, {n: H for n, (H, _) in hs.items()}


def requantize_adapter(path: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                       info: dict[str, Any] | None = None, cfg: RequantizeConfig | None = None,
                       text: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Write ``out``: a copy of the export ``path`` whose packed L, R (and adapter/) are the trained
    adapter's B, A put back on the manifest's grids (:func:`requantize_factors`), so the all-in bits
    are unchanged. ``method=hessian`` weighs each layer's rounding by its H on ``text`` (default: the
    WikiText-2 validation split, the default training text). The manifest is rewritten last with new
    sha256s and a ``finetune`` record (``info``, the method and the mean/max errors); each module records
    its own. Returns that record."""
    from transformers import AutoTokenizer

    from lqlr.io.weights import read_tensors

    cfg = cfg or RequantizeConfig()
    src, out = Path(path), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose another output folder or delete it")
    manifest = read_manifest(src)
    trained_model = load(src, peft=True, adapter=adapter)
    trained = lora_factors(trained_model)
    model = load(src, verify=False)
    state = read_tensors(src / BASE_FILE)
    missing = sorted(set(manifest["modules"]) - set(trained))
    if missing:
        raise ValueError(f"{adapter} has no LoRA for {missing[0]} (+{len(missing) - 1} more): requantize needs the "
                         "adapter trained on this export")
    t0 = time.perf_counter()
    if cfg.method == "hessian":
        tokenizer = AutoTokenizer.from_pretrained(src)
        groups = _layer_hessians(trained_model, sorted(trained), tokenizer,
                                 text if text is not None else wikitext2_text("validation"), cfg, progress)
    else:
        groups = iter([(None, dict.fromkeys(trained))])
    errors: dict[str, dict[str, float]] = {}
    for _, hessians in groups:
        for name, H in hessians.items():
            module = model.get_submodule(name)
            B, A = trained[name]
            try:
                packed, errors[name] = requantize_factors(B, A, module, H, cfg)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            tensors = module.packed_tensors()
            tensors.update(packed)
            module.load_packed(tensors)
            for key, value in packed.items():
                state[f"{name}.{key}"] = value
    del trained_model
    seconds = time.perf_counter() - t0
    _copy_export(src, out)
    save_tensors(state, out / BASE_FILE)
    qlr = {n: model.get_submodule(n) for n in manifest["modules"]}
    base_name = str(out / DENSE_DIR) if (src / DENSE_DIR).is_dir() else manifest["source"].get("model", "")
    save_adapter(qlr, out / ADAPTER_DIR, base_name=base_name)
    record = dict(info or {})
    record.update(adapter=str(adapter), requantized=True, method=cfg.method, requantize_s=seconds)
    if cfg.method == "hessian":
        record.update(n_samples=cfg.n_samples, seq_len=cfg.seq_len)
    for key in ("rel_error", "h_rel_error"):
        vals = [e[key] for e in errors.values() if key in e]
        if vals:
            record[f"{key}_mean"], record[f"{key}_max"] = sum(vals) / len(vals), max(vals)
    manifest["finetune"] = record
    for name, err in errors.items():
        manifest["modules"][name].update({f"finetune_requant_{k}": v for k, v in err.items()})
    write_manifest(out, manifest)
    write_model_card(out, manifest)  # "not measured": lqlr-finetune rewrites it once it evaluated the export
    return record
