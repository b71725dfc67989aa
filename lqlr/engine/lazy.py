"""Load a checkpoint block by block, so a model larger than RAM at full precision can be compressed.

The model is built with every parameter on the ``meta`` device (buffers such as rotary tables stay
real); the embeddings, final norm and LM head are read from the safetensors shards up front, and
each decoder block's parameters are read only when the pipeline reaches that block. After the
block is compressed its dense target weights are dropped (the QLRLinear keeps packed codes), so the
resident size is about: packed model so far + one dense block + calibration activations.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lqlr.core.arch import find_blocks
from lqlr.util.meta import parameters_on_meta


class ShardedCheckpoint:
    """Tensor-by-tensor access to a folder of safetensors files (single file or sharded with an index)."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.folder} holds neither model.safetensors nor model.safetensors.index.json: "
                                    "lazy loading needs a safetensors checkpoint (set model.lazy=false)")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._open = {f: safe_open(str(self.folder / f), framework="pt") for f in files}
        self.weight_map = weight_map or {k: "model.safetensors" for k in self._open["model.safetensors"].keys()}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
        return self._open[self.weight_map[name]].get_tensor(name)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def key(self) -> str:
        """Names the checkpoint's contents without reading them: each file's name, size and modification time."""
        files = sorted({*self._open, "config.json"})
        stats = [(f, (self.folder / f).stat().st_size, (self.folder / f).stat().st_mtime_ns)
                 for f in files if (self.folder / f).is_file()]
        return f"{self.folder.resolve()}:{stats}"


def materialize(module: nn.Module, prefix: str, ckpt: ShardedCheckpoint, dtype=torch.float32) -> None:
    """Read every meta parameter of ``module`` (full name ``prefix + local name``) from the checkpoint."""
    for local, param in list(module.named_parameters()):
        if param.device.type != "meta":
            continue
        owner_name, _, attr = local.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        tensor = ckpt.get(prefix + local).to(dtype)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"checkpoint tensor {prefix + local} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=param.requires_grad)


def resolve_checkpoint(name: str) -> Path:
    """A local folder as-is; otherwise the hub snapshot of ``name`` (config, tokenizer, safetensors only)."""
    path = Path(name)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))


def lazy_model(folder: str | Path, dtype=torch.float32):
    """(model, checkpoint, loader): a model whose decoder-block parameters are still on meta, and
    ``loader(block, prefix)`` that reads one block's parameters when the pipeline reaches it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = ShardedCheckpoint(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    path, blocks = find_blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    for name, param in list(model.named_parameters()):
        if id(param) in in_blocks or param.device.type != "meta":
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if name in ckpt:
            owner._parameters[attr] = nn.Parameter(ckpt.get(name).to(dtype), requires_grad=param.requires_grad)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta" and id(p) not in in_blocks]
    if still_meta:
        raise ValueError(f"checkpoint at {folder} lacks {still_meta[:3]} (names must match the transformers model)")
    model.eval()

    def loader(block: nn.Module, prefix: str) -> None:
        materialize(block, prefix, ckpt, dtype)

    return model, ckpt, loader


def folder_tokenizer(folder: str | Path):
    """The tokenizer saved in a checkpoint folder, or None when it has none (calibration ids must then be given)."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((Path(folder) / n).is_file() for n in names):
        return None
    return AutoTokenizer.from_pretrained(folder)
