"""Text sources: WikiText-2 raw (local files first, hub as fallback) and calibration windows."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .models import shared_assets_dir

__all__ = ["wikitext2_text", "calibration_ids"]

WIKITEXT2_ENV = "LQLR_WIKITEXT2"
_SPLITS = {"validation": "valid", "valid": "valid", "test": "test"}


def _local_wikitext2_dir() -> Path | None:
    """Return the local ``wikitext-2-raw`` folder, or None if there is none."""
    env = os.environ.get(WIKITEXT2_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{WIKITEXT2_ENV}={env} is not a folder; point it at the folder holding "
                "wiki.valid.raw and wiki.test.raw, or unset it"
            )
        return path
    try:
        path = shared_assets_dir() / "wikitext-2-raw"
    except FileNotFoundError:
        return None
    return path if path.is_dir() else None


def wikitext2_text(split: str = "test") -> str:
    """Return the WikiText-2 raw text of one split.

    Source order: the folder in env ``LQLR_WIKITEXT2``; else ``shared_assets_dir()/wikitext-2-raw``
    if it exists; else the hub (``datasets.load_dataset("wikitext", "wikitext-2-raw-v1")``, rows
    joined with ``"\\n\\n"``). The local ``wiki.{valid,test}.raw`` files are returned as-is: they
    are the raw concatenation, a slightly different string from the hub's ``"\\n\\n"`` join.

    Args:
        split: ``"validation"`` (or ``"valid"``) for calibration, ``"test"`` for evaluation.

    Raises:
        ValueError: on an unknown split.
        FileNotFoundError: if the local folder lacks the split's file.
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown WikiText-2 split {split!r}; use 'validation' or 'test'")
    short = _SPLITS[split]
    folder = _local_wikitext2_dir()
    if folder is not None:
        path = folder / f"wiki.{short}.raw"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; put wiki.{short}.raw there or set {WIKITEXT2_ENV} to its folder"
            )
        return path.read_text(encoding="utf-8")

    import datasets  # deferred: heavy import, only needed without local files

    rows = datasets.load_dataset(
        "wikitext", "wikitext-2-raw-v1", split="validation" if short == "valid" else "test"
    )
    return "\n\n".join(rows["text"])


def calibration_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, n_samples: int, seq_len: int, seed: int
) -> torch.LongTensor:
    """Draw random token windows from ``text`` for calibration.

    The text is tokenized once, without special tokens (no BOS); each window start is drawn
    uniformly from ``[0, n_tokens - seq_len - 1]`` by a ``torch.Generator`` seeded with ``seed``,
    so the result depends only on (tokenizer, text, n_samples, seq_len, seed).

    Returns:
        ``(n_samples, seq_len)`` int64 token ids.

    Raises:
        ValueError: if ``n_samples`` or ``seq_len`` is not positive, or the text has fewer than
            ``seq_len + 1`` tokens.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(
            f"n_samples={n_samples} and seq_len={seq_len} must both be >= 1; pass positive sizes"
        )
    encoded = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(encoded, dtype=torch.long)  # (n_tokens,)
    n_tokens = ids.numel()
    if n_tokens < seq_len + 1:
        raise ValueError(
            f"text has {n_tokens} tokens but seq_len={seq_len} needs at least {seq_len + 1}; "
            "use a longer text or a shorter seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seq_len, (n_samples,), generator=gen)  # (n_samples,)
    offsets = torch.arange(seq_len)  # (seq_len,)
    return ids[starts[:, None] + offsets[None, :]]  # (n_samples, seq_len)
