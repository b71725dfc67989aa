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


@torch.no_grad()
def quality(model: nn.Module, reference: nn.Module, windows: torch.Tensor, batch_size: int = 2,
            progress: bool = False) -> dict[str, float]:
    """Perplexity of both models and KL(reference ‖ model), in one forward pass of each per batch."""
    model.eval()
    reference.eval()
    nll = nll_ref = kl = 0.0
    count = 0
    for batch in tqdm(windows.split(batch_size), desc="eval (ppl, KL)", disable=not progress):
        logp = torch.log_softmax(_logits(model, batch), -1)  # (b, T, vocab)
        logq = torch.log_softmax(_logits(reference, batch), -1).to(logp.device)
        target = batch[:, 1:].to(logp.device)
        nll -= float(logp[:, :-1].gather(-1, target[..., None]).sum())
        nll_ref -= float(logq[:, :-1].gather(-1, target[..., None]).sum())
        kl += float((logq.exp() * (logq - logp)).sum())
        count += batch.numel()
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    return {"ppl": math.exp(nll / n_pred), "ppl_reference": math.exp(nll_ref / n_pred), "kl": kl / count}


class dense_cache:
    """Context manager: every QLRLinear of ``model`` keeps its dequantized Q while inside (faster
    evaluation at the cost of dense memory); packed-only again on exit."""

    def __init__(self, model: nn.Module) -> None:
        from .layer import QLRLinear

        self.layers = [m for m in model.modules() if isinstance(m, QLRLinear)]

    def __enter__(self) -> "dense_cache":
        for m in self.layers:
            m.cache_dense(True)
        return self

    def __exit__(self, *exc) -> None:
        for m in self.layers:
            m.cache_dense(False)


def size_on_disk(path) -> int:
    """Bytes of every file under ``path``."""
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def evaluate(path, reference=None, seq_len: int | None = None, max_windows: int | None = None,
             verify: bool = True, batch_size: int = 2, progress: bool = False) -> dict:
    """Evaluate an exported directory: WikiText-2 test perplexity, KL to ``reference`` (a model or a
    name; default the manifest's source model), all-in bits and size on disk."""
    from transformers import AutoTokenizer

    from .data import wikitext2_text
    from .export import load, read_manifest
    from .models import load_model

    manifest = read_manifest(path, verify=verify)
    model = load(path, verify=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if reference is None or isinstance(reference, str):
        reference = load_model(reference or manifest["source"]["model"])[0]
    ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    seq_len = seq_len or min(ctx, 2048)
    ids = torch.tensor(tokenizer(wikitext2_text("test"), add_special_tokens=False, verbose=False)["input_ids"])
    windows = eval_windows(ids, seq_len, max_windows)
    with dense_cache(model):
        metrics = quality(model, reference, windows, batch_size, progress)
    return {"path": str(path), "bits_per_param": manifest["summary"]["bits_per_param"],
            "size_on_disk_bytes": size_on_disk(path), "eval_seq_len": seq_len, "eval_tokens": windows.numel(), **metrics}
