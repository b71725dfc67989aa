"""Text sources: WikiText-2 raw (local files first, hub as fallback) and calibration windows."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lqlr.assets import assets_dir
from lqlr.core.arch import find_blocks
from lqlr.util.meta import blocks_streamed

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
        path = assets_dir() / "wikitext-2-raw"
    except FileNotFoundError:
        return None
    return path if path.is_dir() else None


def wikitext2_text(split: str = "test") -> str:
    """Return the WikiText-2 raw text of one split.

    Source order: the folder in env ``LQLR_WIKITEXT2``; else ``assets_dir()/wikitext-2-raw``
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


@torch.no_grad()
def generated_ids(model, tokenizer: PreTrainedTokenizerBase, n_samples: int, seq_len: int, seed: int,
                  batch_size: int = 32, top_p: float = 0.95, progress: bool = True,
                  load_block: Callable[[nn.Module, str], None] | None = None,
                  release_block: Callable[[nn.Module], None] | None = None) -> torch.LongTensor:
    """Data-free calibration: ``n_samples`` sequences of ``seq_len`` tokens sampled from the model itself.

    Each sequence starts from a random vocabulary token (more diverse than always starting from
    BOS, as in LLM-QAT's data-free generation) and continues by nucleus sampling (``top_p``) under
    a seeded, private RNG, so the result depends only on the model, the sizes and the seed.
    ``load_block(block, prefix)`` / ``release_block(block)`` (lazy loading): the decoder blocks stay
    unread and each decoding step reads and drops them one at a time, so the model is never in
    memory whole; the ids are the same as with the model loaded.
    """
    from tqdm.auto import tqdm

    if load_block is not None:
        if release_block is None:
            raise ValueError("generated_ids: load_block needs release_block (blocks are read for each decoding step)")
        path, blocks = find_blocks(model)
        with blocks_streamed(blocks, path, load_block, release_block):
            return generated_ids(model, tokenizer, n_samples, seq_len, seed, batch_size, top_p, progress)

    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"n_samples={n_samples}, seq_len={seq_len}: need n_samples >= 1 and seq_len >= 2")
    vocab = model.get_input_embeddings().weight.shape[0]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for b in tqdm(range(0, n_samples, batch_size), desc="self-generating calibration", disable=not progress):
            n = min(batch_size, n_samples - b)
            first = torch.randint(0, vocab, (n,), generator=gen)
            first = torch.tensor([t if t not in special else (t + 1) % vocab for t in first.tolist()])
            prompt = first[:, None].to(device)
            ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=top_p, top_k=0,
                                 max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                                 pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
            out.append(ids[:, :seq_len].cpu())
    return torch.cat(out)


def text_from_path(path: str | os.PathLike) -> str:
    """Text of a local file, or of every ``*.txt`` under a folder, read through ``datasets``' text builder."""
    import datasets

    p = Path(path)
    files = [p] if p.is_file() else sorted(p.rglob("*.txt")) if p.is_dir() else []
    if not files:
        raise FileNotFoundError(f"data.path={str(path)!r} is neither a text file nor a folder with .txt files")
    rows = datasets.load_dataset("text", data_files=[str(f) for f in files], split="train")
    return "\n".join(rows["text"])


def calibration_from(source: str, model, tokenizer: PreTrainedTokenizerBase, n_samples: int, seq_len: int, seed: int,
                     path: str | None = None, hub_name: str | None = None, hub_config: str | None = None,
                     split: str = "validation", text_field: str = "text", progress: bool = True,
                     load_block: Callable[[nn.Module, str], None] | None = None,
                     release_block: Callable[[nn.Module], None] | None = None) -> torch.LongTensor:
    """(n_samples, seq_len) calibration ids from ``source``: ``self`` (sampled from ``model``; with
    ``load_block``/``release_block`` its blocks are read one at a time, see :func:`generated_ids`),
    ``wikitext2`` (``split``), ``text`` (a file or folder at ``path``) or ``hub``
    (``datasets.load_dataset(hub_name, hub_config)``)."""
    if source == "self":
        return generated_ids(model, tokenizer, n_samples, seq_len, seed, progress=progress, load_block=load_block,
                             release_block=release_block)
    text = source_text(source, path, hub_name, hub_config, split, text_field, n_docs=max(n_samples * 4, 64))
    return calibration_ids(tokenizer, text, n_samples, seq_len, seed)


def source_text(source: str, path: str | None = None, hub_name: str | None = None, hub_config: str | None = None,
                split: str = "validation", text_field: str = "text", n_docs: int = 64) -> str:
    """The raw text of a text source: ``wikitext2`` (``split``), ``text`` (a file or folder at ``path``) or
    ``hub`` (the first ``n_docs`` documents of ``datasets.load_dataset(hub_name, hub_config)``, streamed)."""
    if source == "wikitext2":
        text = wikitext2_text(split)
    elif source == "text":
        if not path:
            raise ValueError("data.source=text needs data.path=<file or folder of .txt files>")
        text = text_from_path(path)
    elif source == "hub":
        if not hub_name:
            raise ValueError("data.source=hub needs data.hub_name (e.g. allenai/c4) and optionally data.hub_config")
        import datasets

        rows = datasets.load_dataset(hub_name, hub_config, split=split, streaming=True)
        text = "\n\n".join(r[text_field] for _, r in zip(range(n_docs), rows))
    else:
        raise ValueError(f"data.source={source!r}: choose self, wikitext2, text or hub")
    return text
