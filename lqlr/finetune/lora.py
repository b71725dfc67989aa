"""The adapter to train on an export: its own L, R, or a QLoRA-style zero-initialised LoRA; and the
trained factors read back from a PeftModel."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lqlr.core.arch import set_module
from lqlr.engine.models import load_model
from lqlr.io.export import ADAPTER_DIR, read_manifest
from lqlr.io.load import load
from lqlr.nn.layer import QLRLinear
from lqlr.nn.lora import zero_init_lora

log = logging.getLogger("lqlr.finetune")


def lora_layout(adapter: str | os.PathLike) -> dict[str, Any]:
    """r, rank_pattern and target_modules of a PEFT adapter folder (to give another base the same ranks)."""
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return {"r": cfg["r"], "rank_pattern": dict(cfg.get("rank_pattern") or {}),
            "target_modules": cfg["target_modules"]}


INITS = ("export", "zero")
QONLY_RANK = 16  # the LoRA rank trained on a Q-only export when none is given


BASES = ("packed", "fp32")


def prepare(path: str | os.PathLike, init: str = "export", base: str = "packed",
            lora_like: str | os.PathLike | None = None, rank: int | None = None, seed: int = 0):
    """The PeftModel to train on the export ``path``.

    ``init="export"``: LoRA = the decomposition's L, R on the packed Q-only base (``lqlr.load(path, peft=True)``).
    ``init="zero"``: QLoRA-style B = 0 on the same packed Q-only base, with the ranks and targets of
    ``lora_like`` (an adapter folder; default the export's own ``adapter/``) or one ``rank`` for every
    compressed module. ``base="fp32"``: zero-init LoRA of those ranks on the uncompressed source
    model instead (full-precision LoRA, the reference for memory and quality).
    """
    if init not in INITS or base not in BASES:
        raise ValueError(f"init={init!r}, base={base!r}: choose init from {INITS} and base from {BASES}")
    if base == "fp32" and init != "zero":
        raise ValueError("base=fp32 trains a zero-init LoRA on the source model: set init=zero")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank={rank!r}: the LoRA rank must be an integer >= 1")
    root = Path(path)
    manifest = read_manifest(root)
    has_factors = (root / ADAPTER_DIR / "adapter_config.json").is_file()
    if init == "export" and has_factors:
        return load(root, peft=True, verify=False)
    if init == "export":  # a Q-only export: nothing to start from but Q itself
        rank = rank or QONLY_RANK
        log.warning("%s is a Q-only export (no L, R): training a zero-initialised LoRA of rank %d on the packed base "
                    "(QLoRA style; rank=N changes it)", root, rank)
    if rank is not None:
        layout = {"r": int(rank), "rank_pattern": {}, "target_modules": sorted(manifest["modules"])}
    elif lora_like is not None or has_factors:
        layout = lora_layout(lora_like or root / ADAPTER_DIR)
    else:
        raise ValueError(f"{root} is a Q-only export (no adapter/ to copy the ranks of): set rank=<int> or "
                         "lora_like=<adapter folder>")
    if base == "fp32":
        model = load_model(manifest["source"]["model"])[0]
    else:
        model = load(root, verify=False)
        for name, m in list(model.named_modules()):
            if isinstance(m, QLRLinear) and m.rank > 0:
                set_module(model, name, m.without_factors())
    return zero_init_lora(model, layout["r"], layout["target_modules"], layout["rank_pattern"], seed=seed)


def lora_factors(peft_model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (B·scale (out, k), A (k, in))} of the active adapter, in the original basis."""
    out = {}
    for name, m in peft_model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "active_adapters") and m.active_adapters[0] in m.lora_A:
            key = m.active_adapters[0]
            A = m.lora_A[key].weight.detach().float()  # (k, in)
            B = m.lora_B[key].weight.detach().float() * m.scaling[key]  # (out, k)
            out[name.removeprefix("base_model.model.")] = (B, A)
    return out
