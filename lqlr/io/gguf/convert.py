"""llama.cpp's conventions for a Llama-family model: architecture, hyperparameter keys, tensor names, the
Q/K row permutation, and which ggml type a float tensor is written in.

These follow llama.cpp's convert_hf_to_gguf.py (``TextModel.set_gguf_parameters``, ``LlamaModel``,
``ModelBase.prepare_tensors``) and convert_lora_to_gguf.py, so that llama.cpp and Ollama read the files
lqlr writes as they read their own conversions.

* Hyperparameters: ``{arch}.block_count``, ``context_length``, ``embedding_length``,
  ``feed_forward_length``, ``attention.head_count``, ``attention.head_count_kv``, ``rope.freq_base``,
  ``attention.layer_norm_rms_epsilon``, ``attention.key_length``/``value_length`` (when the config has
  ``head_dim``), ``general.file_type``, ``vocab_size``, ``rope.dimension_count``.
* Tensor names: gguf-py's ``TensorNameMap`` (``model.layers.3.self_attn.q_proj.weight`` →
  ``blk.3.attn_q.weight``).
* Q/K permutation: transformers' Llama rotates the halves of each head (``rotate_half``), llama.cpp
  rotates adjacent pairs, so convert_hf_to_gguf reorders the rows of q_proj (heads ``n_head``) and
  k_proj (heads ``n_head_kv``): inside each head, row ``h·d + 2i + s`` of the GGUF tensor is row
  ``h·d + s·d/2 + i`` of the HF one (d the head size, s ∈ {0, 1}). Only rows move, so a block-
  quantized tensor is permuted by moving its rows of bytes.
* Float types: 1-D tensors and norms are F32; other tensors keep their stored type (F32, F16, BF16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch

# model_type of transformers' config -> llama.cpp architecture, and whether q/k rows are permuted
LLAMA_FAMILY = {"llama": gguf.MODEL_ARCH.LLAMA}


@dataclass(frozen=True)
class Arch:
    """A model's llama.cpp architecture and the hyperparameters the conversion needs."""

    model_arch: gguf.MODEL_ARCH
    n_layers: int
    n_head: int
    n_head_kv: int
    config: dict[str, Any]

    @property
    def name(self) -> str:
        """The architecture's name in GGUF (``general.architecture``), e.g. ``"llama"``."""
        return gguf.MODEL_ARCH_NAMES[self.model_arch]

    def tensor_map(self) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.model_arch, self.n_layers)


def _rope(config: dict[str, Any]) -> tuple[str, float | None]:
    """(rope type, rope theta) from transformers' ``rope_parameters`` (5.x) or ``rope_scaling``/``rope_theta``."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    theta = config.get("rope_theta") or rope.get("rope_theta")
    return kind, theta


def llama_arch(config: dict[str, Any]) -> Arch:
    """The :class:`Arch` of a transformers ``config.json`` dict; one-line ValueError unless it is a Llama-family
    model with plain RoPE (what lqlr-export gguf writes)."""
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise ValueError(f"model_type {model_type!r} is not supported by lqlr-export gguf (Llama-family only: "
                         f"{', '.join(LLAMA_FAMILY)}); convert the export's dense/ folder with llama.cpp's "
                         "convert_hf_to_gguf.py instead")
    kind, _ = _rope(config)
    if kind != "default":
        raise ValueError(f"rope_type {kind!r} (RoPE scaling) is not written by lqlr-export gguf yet: only plain RoPE "
                         "models (rope_type 'default') are supported")
    n_head = int(config["num_attention_heads"])
    return Arch(model_arch=LLAMA_FAMILY[model_type], n_layers=int(config["num_hidden_layers"]), n_head=n_head,
                n_head_kv=int(config.get("num_key_value_heads") or n_head), config=config)


def add_hparams(writer: gguf.GGUFWriter, arch: Arch, file_type: gguf.LlamaFileType) -> None:
    """The ``{arch}.*`` hyperparameters and ``general.file_type``, as convert_hf_to_gguf writes them for Llama."""
    c = arch.config
    writer.add_block_count(arch.n_layers)
    for key, add in (("max_position_embeddings", writer.add_context_length),
                     ("hidden_size", writer.add_embedding_length),
                     ("intermediate_size", writer.add_feed_forward_length),
                     ("num_attention_heads", writer.add_head_count),
                     ("num_key_value_heads", writer.add_head_count_kv)):
        if c.get(key) is not None:
            add(int(c[key]))
    _, theta = _rope(c)
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if c.get("rms_norm_eps") is not None:
        writer.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    if c.get("head_dim") is not None:
        writer.add_key_length(int(c["head_dim"]))
        writer.add_value_length(int(c["head_dim"]))
    writer.add_file_type(file_type)
    writer.add_vocab_size(int(c["vocab_size"]))
    writer.add_rope_dimension_count(int(c.get("head_dim") or int(c["hidden_size"]) // arch.n_head))


def gguf_name(tensor_map: gguf.TensorNameMap, hf_name: str) -> str:
    """The GGUF name of the transformers tensor ``hf_name`` (one-line ValueError if llama.cpp has none)."""
    name = tensor_map.get_name(key=hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"{hf_name} has no llama.cpp tensor name for this architecture: lqlr-export gguf cannot "
                         "place it in model.gguf")
    return name


def qk_heads(arch: Arch, hf_name: str) -> int | None:
    """The head count whose rows llama.cpp permutes for ``hf_name``: n_head for q_proj, n_head_kv for
    k_proj (weight or bias), None for every other tensor."""
    module = hf_name.rsplit(".", 1)[0]
    if module.endswith("q_proj"):
        return arch.n_head
    if module.endswith("k_proj"):
        return arch.n_head_kv
    return None


def permute_rows(a: np.ndarray, n_head: int | None) -> np.ndarray:
    """convert_hf_to_gguf's ``permute``: rows (n_head, 2, d/2) → (n_head, d/2, 2), other axes unchanged
    (``a`` may hold the rows of floats, or of a block type's bytes). ``n_head=None``: ``a`` itself."""
    if n_head is None:
        return a
    rows = a.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be {n_head} heads of an even size: the config does not fit the tensor")
    return np.ascontiguousarray(a.reshape(n_head, 2, rows // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape))



def unpermute_rows(a: np.ndarray, n_head: int | None) -> np.ndarray:
    """The inverse of :func:`permute_rows`: a GGUF tensor's q/k rows back in transformers' order."""
    if n_head is None:
        return a
    rows = a.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be {n_head} heads of an even size: the config does not fit the tensor")
    return np.ascontiguousarray(a.reshape(n_head, rows // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape))

def float_array(t: torch.Tensor, gname: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A stored float tensor as (array, ggml type): F32 for 1-D tensors and norms (llama.cpp's rule), else the
    stored F32/F16/BF16 (BF16 as its raw bytes)."""
    if not t.is_floating_point():
        raise ValueError(f"{gname}: a {t.dtype} tensor is not a weight llama.cpp reads")
    if t.ndim <= 1 or gname.endswith("_norm.weight"):
        return t.to(torch.float32).numpy(), gguf.GGMLQuantizationType.F32
    if t.dtype == torch.float16:
        return t.numpy(), gguf.GGMLQuantizationType.F16
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16
    return t.to(torch.float32).numpy(), gguf.GGMLQuantizationType.F32


def file_type(types: list[str]) -> gguf.LlamaFileType:
    """``general.file_type`` from the ggml types of the compressed linears (the most frequent one; ties:
    the first in ``types``), e.g. ``["q4_0", "f16"]`` → MOSTLY_Q4_0, ``["q4_k", "q4_k", "q6_k"]`` → MOSTLY_Q4_K_M."""
    if not types:
        return gguf.LlamaFileType.MOSTLY_F16
    best = max(dict.fromkeys(types), key=types.count)
    if best == "f32":
        return gguf.LlamaFileType.ALL_F32
    if best in ("q3_k", "q4_k", "q5_k"):  # llama.cpp's names: _M where some tensors are wider k-quants (its
        wider = {"q3_k": ("q4_k", "q5_k", "q6_k"), "q4_k": ("q6_k",), "q5_k": ("q6_k",)}[best]  # Q4_K_M mix), else _S
        return gguf.LlamaFileType[f"MOSTLY_{best.upper()}_{'M' if any(t in types for t in wider) else 'S'}"]
    return gguf.LlamaFileType[f"MOSTLY_{best.upper()}"]
