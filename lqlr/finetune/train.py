"""Fine-tune the exported L, R as a LoRA adapter on the frozen, packed Q base, and write it back.

    model = lqlr.load(path, peft=True)             # PeftModel: packed Q-only base + trainable B = L, A = R
    history = train(model, windows, FinetuneConfig(steps=200))
    model.save_pretrained(adapter_dir)             # a stock PEFT adapter
    merge_adapter(path, adapter_dir, merged_dir)   # optional: a plain transformers model Q + B A
    requantize_adapter(path, adapter_dir, out_dir) # optional: L, R back on their grids, an lqlr export again

The base stays packed during training: ``QLRLinear`` dequantizes Q' in forward and again in
backward, never keeping a dense copy for autograd (docs/design.md §5). Gradients flow through Q' to the
input, and only the LoRA weights receive them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lqlr.nn.loss import causal_lm_loss  # noqa: F401  (re-exported: the training loss)

from lqlr.util.memory import set_mmap_threshold

log = logging.getLogger("lqlr.finetune")

SCHEDULES = ("cosine", "constant")


@dataclass
class FinetuneConfig:
    """Training hyper-parameters of the adapter (a plain AdamW loop, one batch per step)."""

    steps: int = 200
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine decay to 0 after warmup | constant after warmup
    max_grad_norm: float = 1.0  # 0 = no clipping
    gradient_checkpointing: bool = False  # recompute each decoder block in backward (less activation memory)
    mmap_threshold_kb: int = 0  # >0: blocks this large are mmapped and returned when freed (less RSS, slower)
    loss_chunk: int = 256  # tokens per chunk of LM head + loss, recomputed in backward (0: full logits at once)
    qat: bool = False  # train B, A through their L, R grids (straight-through); stays on after train()
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mmap_threshold_kb < 0:
            raise ValueError(f"finetune mmap_threshold_kb={self.mmap_threshold_kb}: must be >= 0 (0 = allocator default)")
        if self.loss_chunk < 0:
            raise ValueError(f"finetune loss_chunk={self.loss_chunk}: must be >= 0 (0 = no chunking)")
        for name in ("steps", "batch_size", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"finetune {name}={getattr(self, name)}: must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"finetune lr={self.lr}: must be > 0")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("finetune warmup_steps, weight_decay and max_grad_norm must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"finetune schedule={self.schedule!r}: choose one of {SCHEDULES}")


@dataclass
class TrainResult:
    """Loss of every step, and the wall time of the loop."""

    losses: list[float] = field(default_factory=list)
    train_s: float = 0.0
    trainable_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warmup, then cosine or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / span))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter: load it with lqlr.load(path, peft=True) "
                         "or wrap it with zero_init_lora")
    return params


def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute each decoder block in backward (non-reentrant), or stop doing so; transformers 4 and 5."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
        if enabled:
            base.activation_checkpointing_enable({"use_reentrant": False})
        else:
            base.activation_checkpointing_disable()
    elif enabled:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def train(model: nn.Module, windows: torch.Tensor, cfg: FinetuneConfig,
          on_step: Callable[[int, float], None] | None = None, progress: bool = True) -> TrainResult:
    """Minimise the next-token loss of ``model`` on ``windows`` (n, seq_len), ``cfg.batch_size`` rows per
    step in order (n ≥ steps·batch_size), updating only the parameters that require grad.

    ``on_step(step, loss)`` is called after every step (1-based). Deterministic given ``cfg.seed``.
    ``cfg.qat``: the LoRA factors compute on their grids (:func:`lqlr.finetune.qat.enable_qat`), also
    after training, so the model evaluates as it will be requantized (``disable_qat`` undoes it).
    """
    import time

    from tqdm.auto import tqdm

    need = cfg.steps * cfg.batch_size
    if windows.ndim != 2 or windows.shape[0] < need:
        raise ValueError(f"train needs {need} windows (steps × batch_size) of tokens, got shape {tuple(windows.shape)}")
    params = trainable_parameters(model)
    if cfg.qat:
        from lqlr.finetune.qat import enable_qat

        log.info("quantization-aware training: %d LoRA pairs on their L, R grids", enable_qat(model))
    torch.manual_seed(cfg.seed)
    device = params[0].device
    if cfg.gradient_checkpointing:
        set_checkpointing(model, True)
    if cfg.mmap_threshold_kb and not set_mmap_threshold(cfg.mmap_threshold_kb):
        log.warning("mmap_threshold_kb=%d ignored: this C library has no mallopt", cfg.mmap_threshold_kb)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    result = TrainResult(trainable_params=sum(p.numel() for p in params))
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="fine-tune", disable=not progress)
    for step in bar:
        batch = windows[step * cfg.batch_size:(step + 1) * cfg.batch_size].to(device)  # (b, T)
        loss = causal_lm_loss(model, batch, cfg.loss_chunk)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"fine-tune loss is {value} at step {step + 1}: lower lr (now {cfg.lr})")
        result.losses.append(value)
        if on_step is not None:
            on_step(step + 1, value)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            recent = result.losses[-cfg.log_every:]
            log.info("step %d/%d  loss %.4f  lr %.2e", step + 1, cfg.steps, sum(recent) / len(recent),
                     sched.get_last_lr()[0])
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    result.train_s = time.perf_counter() - t0
    if cfg.gradient_checkpointing:
        set_checkpointing(model, False)
    model.eval()
    return result
