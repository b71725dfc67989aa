"""A zero-initialised LoRA on a model's (packed) linears, QLoRA style, with lqlr's scale convention (α = r)."""
from __future__ import annotations

import torch
from torch import nn


def zero_init_lora(model: nn.Module, r: int, target_modules, rank_pattern: dict[str, int] | None = None,
                   seed: int = 0):
    """QLoRA-style adapter: B = 0, A PEFT's default (Kaiming-uniform, seeded) init, α = r per module
    (scale 1, as in the export). Returns the PeftModel; only the LoRA weights are trainable."""
    from peft import LoraConfig, get_peft_model

    rank_pattern = dict(rank_pattern or {})
    cfg = LoraConfig(r=r, lora_alpha=r, rank_pattern=rank_pattern, alpha_pattern=dict(rank_pattern),
                     target_modules=target_modules, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)
