"""Evaluation: WikiText-2 perplexity and KL divergence to the uncompressed model (DESIGN §6)."""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) of a flat token stream (the tail shorter than seq_len is dropped)."""
    ids = ids.reshape(-1)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}: "
                         "use a longer text or a shorter seq_len")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(batch.to(device), use_cache=False).logits.float()


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token NLL) over every predicted token of the windows (n, seq_len)."""
    model.eval()
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        logits = _logits(model, batch)[:, :-1]  # (b, T-1, vocab)
        target = batch[:, 1:].to(logits.device)
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                      reduction="sum"))
        count += target.numel()
    return math.exp(nll / count)


@torch.no_grad()
def kl_divergence(model: nn.Module, reference: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                  progress: bool = False) -> float:
    """Mean over tokens of KL(p_reference ‖ p_model) of the next-token distributions (nats)."""
    model.eval()
    reference.eval()
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="KL", disable=not progress):
        logp = torch.log_softmax(_logits(model, batch), -1)
        logq = torch.log_softmax(_logits(reference, batch), -1).to(logp.device)
        total += float((logq.exp() * (logq - logp)).sum())
        count += batch.numel()
    return total / count


def size_on_disk(path) -> int:
    """Bytes of every file under ``path``."""
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
