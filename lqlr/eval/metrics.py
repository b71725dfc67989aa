"""Evaluation (docs/design.md §6): WikiText-2 perplexity and KL divergence to the uncompressed model, in one pass.

``quality`` is the one evaluation loop: each batch of windows goes through the model (and the
reference, when given) once, and perplexity of both and KL(reference ‖ model) come out of the same
log-probabilities. ``perplexity`` and ``kl_divergence`` are views of it; ``evaluate_model`` picks
the windows (WikiText-2 test, or held-out self-generated text when WikiText-2 cannot be had), and
``evaluate`` does all of it for an export directory.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from lqlr.calibrate.text import generated_ids, wikitext2_text
from lqlr.config import EvalConfig
from lqlr.engine.models import load_model
from lqlr.io.export import read_manifest
from lqlr.io.load import load
from lqlr.nn.layer import dense_cache
from lqlr.nn.loss import chunked_log_probs

log = logging.getLogger("lqlr")

EVAL_CHUNK = 256  # positions per LM-head call in the evaluation


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


def context_length(model: nn.Module) -> int:
    """The model's context (``max_position_embeddings`` or ``n_positions``; 2048 when it says neither)."""
    conf = model.config
    return getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", None) or 2048


def wikitext2_windows(model: nn.Module, tokenizer, seq_len: int | None = None, max_windows: int | None = None) -> torch.Tensor:
    """Windows of WikiText-2 test (no BOS, non-overlapping) of ``seq_len`` tokens (None: min(context, 2048))."""
    ids = torch.tensor(tokenizer(wikitext2_text("test"), add_special_tokens=False, verbose=False)["input_ids"])
    return eval_windows(ids, seq_len or min(context_length(model), 2048), max_windows)


@torch.no_grad()
def quality(model: nn.Module, reference: nn.Module | None, windows: torch.Tensor, batch_size: int = 2,
            progress: bool = False) -> dict[str, float]:
    """Perplexity exp(mean next-token NLL) over every predicted token of ``windows`` (n, seq_len) and,
    with a ``reference``, its perplexity and the mean over all tokens of KL(p_reference ‖ p_model)
    (nats), from one forward pass of each model per batch."""
    model.eval()
    if reference is not None:
        reference.eval()
    nll = nll_ref = kl = 0.0
    device = next(model.parameters()).device
    for batch in tqdm(windows.split(batch_size), desc="eval (ppl, KL)" if reference is not None else "perplexity",
                      disable=not progress):
        batch = batch.to(device)
        # the LM head runs EVAL_CHUNK positions at a time: (b, T, vocab) log-probabilities are never held whole
        pieces = chunked_log_probs(model, batch, EVAL_CHUNK)
        ref_pieces = chunked_log_probs(reference, batch.to(next(reference.parameters()).device), EVAL_CHUNK) \
            if reference is not None else None
        for i, logp in pieces:
            c = logp.shape[1]
            target = batch[:, i + 1 : i + 1 + c][..., None]  # (b, c', 1): the next tokens (none after the last)
            nll -= float(logp[:, : target.shape[1]].gather(-1, target).sum())
            if ref_pieces is not None:
                _, logq = next(ref_pieces)
                logq = logq.to(logp.device)
                nll_ref -= float(logq[:, : target.shape[1]].gather(-1, target).sum())
                kl += float((logq.exp() * (logq - logp)).sum())
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    out = {"ppl": math.exp(nll / n_pred)}
    if reference is not None:
        out.update(ppl_reference=math.exp(nll_ref / n_pred), kl=kl / windows.numel())
    return out


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token NLL) over every predicted token of the windows (n, seq_len)."""
    return quality(model, None, windows, batch_size, progress)["ppl"]


def kl_divergence(model: nn.Module, reference: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                  progress: bool = False) -> float:
    """Mean over tokens of KL(p_reference ‖ p_model) of the next-token distributions (nats)."""
    return quality(model, reference, windows, batch_size, progress)["kl"]


def size_on_disk(path: str | Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def evaluate_model(model: nn.Module, reference: nn.Module | None, tokenizer, cfg: EvalConfig | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """Perplexity on WikiText-2 test and, with a ``reference``, its perplexity and KL to it. When
    WikiText-2 cannot be had (no local copy, no hub), KL on held-out self-generated samples instead."""
    cfg = cfg or EvalConfig()
    out: dict[str, Any] = {"eval_seq_len": cfg.seq_len or min(context_length(model), 2048)}
    try:
        windows = wikitext2_windows(model, tokenizer, cfg.seq_len, cfg.max_windows)
    except Exception as err:  # no local file and no hub: KL on held-out calibration-style samples instead
        log.warning("WikiText-2 test text unavailable (%s); reporting KL on held-out generated samples only", err)
        if reference is None:
            return out
        windows = generated_ids(reference, tokenizer, 4, 256, 10_000, progress=progress)
        with dense_cache(model):
            out["kl"] = quality(model, reference, windows, cfg.batch_size, progress)["kl"]
        out["kl_on"] = "held-out self-generated samples"
        return out
    out["eval_tokens"] = windows.numel()
    t0 = time.perf_counter()
    with dense_cache(model):
        out.update(quality(model, reference, windows, cfg.batch_size, progress))
    out["eval_s"] = time.perf_counter() - t0
    return out


def evaluate(path: str | Path, reference: nn.Module | str | None = None, seq_len: int | None = None,
             max_windows: int | None = None, verify: bool = True, batch_size: int = 2, progress: bool = False) -> dict:
    """Evaluate an exported directory: WikiText-2 test perplexity, KL to ``reference`` (a model or a
    name; default the manifest's source model), all-in bits and size on disk."""
    manifest = read_manifest(path, verify=verify)
    model = load(path, verify=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if reference is None or isinstance(reference, str):
        reference = load_model(reference or manifest["source"]["model"])[0]
    metrics = evaluate_model(model, reference, tokenizer, EvalConfig(seq_len=seq_len, max_windows=max_windows,
                                                                     batch_size=batch_size), progress)
    metrics.pop("eval_s", None)
    return {"path": str(path), "bits_per_param": manifest["summary"]["bits_per_param"],
            "size_on_disk_bytes": size_on_disk(path), **metrics}
