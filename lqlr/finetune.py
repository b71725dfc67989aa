"""Fine-tune the exported L, R as a LoRA adapter on the frozen, packed Q base, and write it back.

    model = lqlr.load(path, peft=True)             # PeftModel: packed Q-only base + trainable B = L, A = R
    history = train(model, windows, FinetuneConfig(steps=200))
    model.save_pretrained(adapter_dir)             # a stock PEFT adapter
    merge_adapter(path, adapter_dir, merged_dir)   # optional: a plain transformers model Q + B A
    requantize_adapter(path, adapter_dir, out_dir) # optional: L, R back on their grids, an lqlr export again

The base stays packed during training: ``QLRLinear`` dequantizes Q' in forward and again in
backward, never keeping a dense copy for autograd (DESIGN §5). Gradients flow through Q' to the
input, and only the LoRA weights receive them.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .memory import set_mmap_threshold

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


def causal_lm_loss(model: nn.Module, ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids`` (b, T), as ``model(input_ids=ids, labels=ids).loss``.

    With ``chunk`` > 0 the LM head and the loss run on ``chunk`` tokens at a time, each recomputed in
    backward, so the (b·T, vocab) logits are never held whole: on a 49k-vocabulary model they are
    most of a LoRA step's activation memory. Models whose head does more than a linear map (logit
    soft-capping or scaling) take the stock path.
    """
    from torch.utils.checkpoint import checkpoint

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    conf = getattr(base, "config", None)
    plain_head = not any(getattr(conf, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    if chunk <= 0 or body is None or head is None or not plain_head:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].reshape(-1, head.in_features)
    target = ids[:, 1:].reshape(-1)

    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # summed cross-entropy of one chunk
        return nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

    total = sum(checkpoint(piece, h, y, use_reentrant=False) for h, y in zip(hidden.split(chunk), target.split(chunk)))
    return total / target.numel()


def train(model: nn.Module, windows: torch.Tensor, cfg: FinetuneConfig,
          on_step: Callable[[int, float], None] | None = None, progress: bool = True) -> TrainResult:
    """Minimise the next-token loss of ``model`` on ``windows`` (n, seq_len), ``cfg.batch_size`` rows per
    step in order (n ≥ steps·batch_size), updating only the parameters that require grad.

    ``on_step(step, loss)`` is called after every step (1-based). Deterministic given ``cfg.seed``.
    """
    import time

    from tqdm.auto import tqdm

    need = cfg.steps * cfg.batch_size
    if windows.ndim != 2 or windows.shape[0] < need:
        raise ValueError(f"train needs {need} windows (steps × batch_size) of tokens, got shape {tuple(windows.shape)}")
    params = trainable_parameters(model)
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


def lora_layout(adapter: str | os.PathLike) -> dict[str, Any]:
    """r, rank_pattern and target_modules of a PEFT adapter folder (to give another base the same ranks)."""
    import json

    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return {"r": cfg["r"], "rank_pattern": dict(cfg.get("rank_pattern") or {}),
            "target_modules": cfg["target_modules"]}


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


INITS = ("export", "zero")
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
    from .arch import set_module
    from .export import ADAPTER_DIR, load, read_manifest
    from .layer import QLRLinear

    if init not in INITS or base not in BASES:
        raise ValueError(f"init={init!r}, base={base!r}: choose init from {INITS} and base from {BASES}")
    if base == "fp32" and init != "zero":
        raise ValueError("base=fp32 trains a zero-init LoRA on the source model: set init=zero")
    root = Path(path)
    manifest = read_manifest(root)
    if init == "export":
        return load(root, peft=True, verify=False)
    if rank is not None:
        layout = {"r": int(rank), "rank_pattern": {}, "target_modules": sorted(manifest["modules"])}
    else:
        layout = lora_layout(lora_like or root / ADAPTER_DIR)
        if not layout["target_modules"]:
            raise ValueError(f"{lora_like or root / ADAPTER_DIR} targets no module (a Q-only export): "
                             "set lora_like=<adapter folder> or rank=<int>")
    if base == "fp32":
        from .models import load_model

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


def _copy_export(src: Path, out: Path) -> None:
    """A copy of the export ``src`` at ``out`` (which must not exist yet), its manifest left out."""
    from .export import MANIFEST

    if out.exists():
        raise FileExistsError(f"{out} already exists: choose another output folder or delete it")
    shutil.copytree(src, out, ignore=lambda d, names: [n for n in names if n == MANIFEST and Path(d) == src])


def requantize_factors(B: torch.Tensor, A: torch.Tensor, module) -> dict[str, torch.Tensor]:
    """Packed l_*/r_* tensors of a trained pair (B (out, k), A (k, in), original basis) on the grids of
    ``module.spec`` (the module's L, R bit budget).

    The pair is rotated into the stored basis (L' = U B, R' = A Vᵀ), R' is rounded to nearest on its
    grid, L is refit to min ‖L R̂ − L' R'‖_F (closed form) and rounded: one LPLR alternation with H = I.
    """
    from .layer import FP16
    from .lr_step import solve_psd
    from .quantizers import make_grid, quantize_rtn

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

    from .export import ADAPTER_DIR, BASE_FILE, DENSE_DIR, _save_tensors, load, read_manifest, save_adapter, write_manifest

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
    _save_tensors(state, out / BASE_FILE)
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


def merge_adapter(path: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A plain transformers folder at ``out`` with W = Q + B·A·scale merged by stock PEFT
    (``merge_and_unload``) on the export's dense Q base (``dense/``, or one built from the packed Q)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .export import DENSE_DIR, _qlr_modules, load, save_dense

    src, out = Path(path), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose another merge folder or delete it")
    with tempfile.TemporaryDirectory() as tmp:
        dense = src / DENSE_DIR
        if not dense.is_dir():
            model = load(src)
            dense = Path(tmp) / DENSE_DIR
            save_dense(model, _qlr_modules(model), dense)  # Q only, like dense/
            del model
        base = AutoModelForCausalLM.from_pretrained(dense)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    except (OSError, ValueError):
        log.warning("no tokenizer in %s: %s has the weights and config only", src, out)
    return out
