"""Quantization-aware training of the adapter: B, A trained through their L, R grids.

With ``enable_qat(model)`` every LoRA pair on a QLRLinear computes with its factors on the export's
grids: in the stored basis, L' = U (B·scale) and R' = A Vᵀ are rounded to nearest (each group's
parameters refit on the current values), rotated back and used in forward, while the gradient passes
straight through to the real-valued B, A (straight-through estimator: w + (round(w) − w) detached).
Requantizing such an adapter with ``method=nearest`` gives exactly the function that was trained.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lqlr.finetune.requantize import factor_grid, nearest_on_grid
from lqlr.nn.layer import QLRLinear

QAT_ATTR = "_lqlr_qat"  # set on a LoRA Linear whose forward is fake-quantized


def _fake_quant(w: torch.Tensor, to_grid: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """w in forward as its grid value, with the identity gradient (straight-through)."""
    with torch.no_grad():
        delta = to_grid(w.detach().float()).to(w.dtype) - w.detach()
    return w + delta


def _factor_spec(layer: QLRLinear) -> dict:
    """rank and L, R grid specs of the export's module (a Q-only base under PEFT keeps them aside)."""
    return getattr(layer, "factor_spec", None) or layer.spec


def _round_left(layer: QLRLinear, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """B (out, k) ↦ the B whose B·scale is L' = U B·scale rounded on the L grid."""
    spec = _factor_spec(layer)
    grid, rot = factor_grid(spec["l"], int(spec["rank"])), layer.incoherence

    def to_grid(B: torch.Tensor) -> torch.Tensor:
        Ls = rot.U.apply((B * scale).T).T if rot else B * scale  # (out, k) = U B·scale
        Lq = nearest_on_grid(Ls, grid)[0]
        return (rot.U.apply_inverse(Lq.T).T if rot else Lq) / scale
    return to_grid


def _round_right(layer: QLRLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    """A (k, in) ↦ Vᵀ (A Vᵀ rounded on the R grid)."""
    grid, rot = factor_grid(_factor_spec(layer)["r"], layer.in_features), layer.incoherence

    def to_grid(A: torch.Tensor) -> torch.Tensor:
        Rs = rot.V.apply(A) if rot else A  # (k, in) = A Vᵀ
        Rq = nearest_on_grid(Rs, grid)[0]
        return rot.V.apply_inverse(Rq) if rot else Rq
    return to_grid


def _patch(linear: nn.Linear, to_grid: Callable[[torch.Tensor], torch.Tensor]) -> None:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _fake_quant(linear.weight, to_grid), linear.bias)
    linear.forward = forward  # an instance attribute: the state dict and PEFT's saving are unchanged
    setattr(linear, QAT_ATTR, True)


def enable_qat(peft_model: nn.Module) -> int:
    """Fake-quantize every active LoRA pair whose base is a QLRLinear with L, R grids; returns how many.

    Raises ValueError when the adapter's ranks differ from the export's (its grids would not fit)
    or when no pair qualifies (e.g. a zero-initialised LoRA on a Q-only export: nothing to round to)."""
    n = 0
    for name, m in peft_model.named_modules():
        base = getattr(m, "base_layer", None)
        if not (hasattr(m, "lora_A") and isinstance(base, QLRLinear)) or not m.active_adapters:
            continue
        key, spec = m.active_adapters[0], _factor_spec(base)
        if key not in m.lora_A or "l" not in spec or not spec.get("rank"):
            continue
        A, B = m.lora_A[key], m.lora_B[key]
        if A.out_features != int(spec["rank"]):
            raise ValueError(f"{name}: LoRA rank {A.out_features} differs from the export's rank {spec['rank']}: "
                             "train.qat needs the export's own adapter (init=export)")
        if not getattr(A, QAT_ATTR, False):
            _patch(A, _round_right(base))
            _patch(B, _round_left(base, float(m.scaling[key])))
        n += 1
    if n == 0:
        raise ValueError("train.qat: no LoRA layer sits on a QLRLinear with L, R grids (a Q-only export has none): "
                         "use init=export on an export with rank > 0, or train.qat=false")
    return n


def disable_qat(peft_model: nn.Module) -> None:
    """Undo :func:`enable_qat`: the LoRA layers compute with the real-valued B, A again."""
    for m in peft_model.modules():
        if getattr(m, QAT_ATTR, False):
            del m.forward
            delattr(m, QAT_ATTR)
