"""Where the decoder blocks and the compressible linears of a causal LM are.

One table of block paths per architecture family instead of a driver per model; an unknown
architecture falls back to the ModuleList whose length is the config's layer count.
GPT-2's ``Conv1D`` stores its weight as (in, out); :func:`weight_of` always returns (out, in).
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable

import torch
from torch import nn

BLOCK_PATHS = {
    "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers",
    "gemma": "model.layers", "gemma2": "model.layers", "phi": "model.layers", "phi3": "model.layers",
    "opt": "model.decoder.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
}


class UnsupportedModelError(ValueError):
    """The model's architecture or a layer type is not supported."""


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return ()
    return (Conv1D,)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (a linear layer with a transposed weight)."""
    return isinstance(module, (nn.Linear, *_conv1d_type()))


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, _conv1d_type()) if _conv1d_type() else False


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) float32 matrix."""
    W = module.weight.detach()
    return (W.T if is_conv1d(module) else W).to(torch.float32)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the decoder blocks."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    modules = dict(model.named_modules())
    path = BLOCK_PATHS.get(model_type or "")
    if path and isinstance(modules.get(path), nn.ModuleList):
        return path, modules[path]
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    candidates = [(name, m) for name, m in modules.items()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and (n_layers is None or len(m) == n_layers)]
    if not candidates:
        raise UnsupportedModelError(
            f"cannot find the decoder blocks of model_type={model_type!r}: add its block path to lqlr.arch.BLOCK_PATHS")
    return candidates[0]


def _match_one(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    try:
        if re.fullmatch(pattern, name) is not None:
            return True
    except re.error:  # e.g. "*.down_proj": not a regex, only a glob
        pass
    return fnmatch.fnmatchcase(name, pattern)


def matches(name: str, pattern: str | Iterable[str] | None) -> bool:
    """lqlr's one rule for naming modules (``targets`` and ``budget.overrides[].match``), PEFT's
    ``target_modules`` convention plus globs.

    * ``None`` matches every module.
    * A string matches a name it fully matches as a regular expression (PEFT) or as a glob
      (``"model.layers.*.mlp.down_proj"``, ``"*.k_proj"``); ``"re:..."`` is a regular expression only.
    * A list matches a name equal to one entry, ending in ``"." + entry`` (PEFT: ``["q_proj", "v_proj"]``),
      or matching an entry that is a glob or ``"re:..."``.
    """
    if pattern is None:
        return True
    if isinstance(pattern, str):
        return _match_one(name, pattern)
    return any(name == p or name.endswith("." + p) or
               ((p.startswith("re:") or any(c in p for c in "*?[")) and _match_one(name, p)) for p in pattern)


def check_pattern(pattern: str | Iterable[str] | None, where: str) -> None:
    """One-line error for a pattern that is neither None, a string nor a list of strings, or holds a bad ``re:`` regex."""
    if pattern is None:
        return
    items = [pattern] if isinstance(pattern, str) else list(pattern) if isinstance(pattern, (list, tuple)) else None
    if items is None or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{where}={pattern!r}: give a module-name pattern, a string (regex or glob) or a list of "
                         "names, suffixes or globs, e.g. ['q_proj', 'v_proj'] or 'model.layers.*.mlp.down_proj'")
    for p in items:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as err:
                raise ValueError(f"{where} pattern {p!r} is not a valid regex: {err}") from err


def target_linears(model: nn.Module, targets: str | Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Linear layers inside the decoder blocks selected by ``targets`` (None: all of them; see :func:`matches`)."""
    check_pattern(targets, "targets")
    path, blocks = find_blocks(model)
    found = {}
    for i, block in enumerate(blocks):
        for sub, module in block.named_modules():
            name = f"{path}.{i}.{sub}"
            if sub and is_linear(module) and matches(name, targets):
                found[name] = module
    if not found:
        raise ValueError(f"targets={targets!r} match no linear layer inside {path}: check the module names "
                         f"(e.g. {next(iter(n for n, m in blocks[0].named_modules() if is_linear(m)), '?')})")
    return found


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
