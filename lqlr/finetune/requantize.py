"""Put a trained adapter's B, A back on the export's L, R grids: an lqlr export again, at the same all-in bits."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lqlr.core.grids import make_grid, quantize_rtn
from lqlr.core.lowrank import solve_psd
from lqlr.finetune.lora import lora_factors
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


def requantize_factors(B: torch.Tensor, A: torch.Tensor, module) -> dict[str, torch.Tensor]:
    """Packed l_*/r_* tensors of a trained pair (B (out, k), A (k, in), original basis) on the grids of
    ``module.spec`` (the module's L, R bit budget).

    The pair is rotated into the stored basis (L' = U B, R' = A Vᵀ), R' is rounded to nearest on its
    grid, L is refit to min ‖L R̂ − L' R'‖_F (closed form) and rounded: one LPLR alternation with H = I.
    """

    spec = module.spec
    if module.rank == 0 or "l" not in spec:
        raise ValueError("module with spec rank 0 has no L, R bit budget: requantize needs an export with L, R "
                         "(rank > 0), e.g. from method=lqlr")
    if B.shape[1] != module.rank or A.shape[0] != module.rank:
        raise ValueError(f"adapter rank {B.shape[1]} differs from the export's rank {module.rank}: "
                         "requantize needs the adapter trained on this export")
    rot = module.incoherence
    Ls = rot.U.apply(B.T).T if rot else B  # (out, k) = U B
    Rs = rot.V.apply(A) if rot else A  # (k, in) = A Vᵀ
    out: dict[str, torch.Tensor] = {}
    if spec["r"]["kind"] == FP16:
        R_hat = Rs.to(torch.float16)
        out["r_weight"] = R_hat
        R_hat = R_hat.float()
    else:
        qR = quantize_rtn(Rs, make_grid(spec["r"]["kind"], spec["r"]["bits"], spec["r"]["group_size"]))
        out.update({f"r_{k}": v for k, v in qR.packed().items()})
        R_hat = qR.dequantize()
    target = Ls @ (Rs @ R_hat.T)  # (out, k) = L' R' R̂ᵀ
    L_fit = solve_psd(R_hat @ R_hat.T, target.T).T  # (out, k)
    if spec["l"]["kind"] == FP16:
        out["l_weight"] = L_fit.to(torch.float16)
    else:
        qL = quantize_rtn(L_fit, make_grid(spec["l"]["kind"], spec["l"]["bits"], spec["l"]["group_size"]))
        out.update({f"l_{k}": v for k, v in qL.packed().items()})
    return out


def requantize_adapter(path: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                       info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out``: a copy of the export ``path`` whose packed L, R (and adapter/) are the trained
    adapter's B, A put back on the manifest's grids, so the all-in bits are unchanged. The manifest
    is rewritten last with new sha256s and a ``finetune`` record (``info`` plus the relative
    Frobenius error of each requantized B·A). Returns that record."""
    from safetensors.torch import load_file


    src, out = Path(path), Path(out)
    manifest = read_manifest(src)
    trained = lora_factors(load(src, peft=True, adapter=adapter))
    model = load(src, verify=False)
    state = load_file(str(src / BASE_FILE))
    errors = {}
    for name, (B, A) in trained.items():
        module = model.get_submodule(name)
        try:
            packed = requantize_factors(B, A, module)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        tensors = module.packed_tensors()
        tensors.update(packed)
        module.load_packed(tensors)
        for key, value in packed.items():
            state[f"{name}.{key}"] = value
        L, R = module.factors()
        ref = B @ A
        errors[name] = float(torch.linalg.norm(L @ R - ref) / torch.linalg.norm(ref).clamp_min(1e-30))
    _copy_export(src, out)
    save_tensors(state, out / BASE_FILE)
    qlr = {n: model.get_submodule(n) for n in manifest["modules"]}
    base_name = str(out / DENSE_DIR) if (src / DENSE_DIR).is_dir() else manifest["source"].get("model", "")
    save_adapter(qlr, out / ADAPTER_DIR, base_name=base_name)
    record = dict(info or {})
    record.update(adapter=str(adapter), requantized=True, rel_error_mean=sum(errors.values()) / max(1, len(errors)),
                  rel_error_max=max(errors.values(), default=0.0))
    manifest["finetune"] = record
    for name, err in errors.items():
        manifest["modules"][name]["finetune_requant_rel_error"] = err
    write_manifest(out, manifest)
    return record
