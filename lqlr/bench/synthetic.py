"""Synthetic checkpoints with the real shapes of large models, made locally (no download).

A folder written here is a stock transformers Llama checkpoint: config.json plus sharded bf16
safetensors with an index, one shard per decoder block. Only the first ``blocks`` decoder blocks
are written (``num_hidden_layers = blocks``); ``full_layers`` in :data:`SHAPES` is what the whole
model has, for projections. Each weight is a Gaussian bulk plus a spike of ``SPIKES`` directions
whose singular values decay as a power law, like trained LLM weights (a few large singular values
above a Marchenko–Pastur-like bulk), so that low-rank terms and Hessian-aware rounding meet the same
kind of spectrum as on a real model. Seeded: the same call writes the same bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lqlr.util.files import atomic_write

SPIKES = 256  # directions above the bulk
SPIKE_DECAY = 0.6  # σ_j ∝ (1 + j)^(−SPIKE_DECAY)
SPIKE_TOP = 12.0  # σ_0 over the bulk's largest singular value
BULK_STD = 0.02


@dataclass(frozen=True)
class Shape:
    """A decoder-only model's dimensions (Llama family)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    full_layers: int

    def block_params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attn + 3 * self.hidden * self.intermediate

    def matrices(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear of one block, by its name inside the block."""
        kv = self.kv_heads * (self.hidden // self.heads)
        return {"self_attn.q_proj": (self.hidden, self.hidden), "self_attn.k_proj": (kv, self.hidden),
                "self_attn.v_proj": (kv, self.hidden), "self_attn.o_proj": (self.hidden, self.hidden),
                "mlp.gate_proj": (self.intermediate, self.hidden), "mlp.up_proj": (self.intermediate, self.hidden),
                "mlp.down_proj": (self.hidden, self.intermediate)}


SHAPES: dict[str, Shape] = {
    "llama2-7b": Shape(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000, full_layers=32),
    "llama3-8b": Shape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, full_layers=32),
    "llama2-70b": Shape(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000, full_layers=80),
    "tiny": Shape(hidden=256, intermediate=688, heads=4, kv_heads=2, vocab=1024, full_layers=4),  # tests, --quick
}


def spiked_weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """(out, in) float32: Gaussian bulk + Σ_j σ_j u_j v_jᵀ with power-law σ_j (see the module docstring)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=gen) * BULK_STD
    edge = BULK_STD * (out_f**0.5 + in_f**0.5)  # the bulk's largest singular value
    k = min(SPIKES, out_f, in_f)
    sigma = SPIKE_TOP * edge * (1.0 + torch.arange(k, dtype=torch.float32)) ** (-SPIKE_DECAY)
    U = torch.randn(out_f, k, generator=gen) / out_f**0.5  # nearly orthonormal columns at these sizes
    V = torch.randn(k, in_f, generator=gen) / in_f**0.5
    W.addmm_(U * sigma, V)
    return W


def write_checkpoint(folder: str | Path, name: str, blocks: int, seed: int = 0, progress: bool = True) -> Path:
    """Write the first ``blocks`` decoder blocks of ``SHAPES[name]`` (plus embeddings, norm, LM head)
    to ``folder`` as sharded bf16 safetensors. An existing complete folder is kept (the index is
    written last, so a folder with an index is complete)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}: choose one of {sorted(SHAPES)}")
    shape = SHAPES[name]
    out = Path(folder)
    if (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         vocab_size=shape.vocab, num_hidden_layers=blocks, max_position_embeddings=4096,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    config.save_pretrained(out)
    weight_map: dict[str, str] = {}
    counter = iter(range(10**6))

    def shard(file: str, tensors: dict[str, torch.Tensor]) -> None:
        atomic_write(out / file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        weight_map.update({k: file for k in tensors})

    gen = torch.Generator(device="cpu").manual_seed(seed)
    shard("embeddings.safetensors", {
        "model.embed_tokens.weight": (torch.randn(shape.vocab, shape.hidden, generator=gen) * BULK_STD).bfloat16(),
        "lm_head.weight": spiked_weight(shape.vocab, shape.hidden, seed * 1000 + next(counter)).bfloat16(),
        "model.norm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16),
    })
    for i in tqdm(range(blocks), desc=f"writing {name}", disable=not progress):
        p = f"model.layers.{i}."
        tensors = {p + m + ".weight": spiked_weight(o, n, seed * 1000 + next(counter)).bfloat16()
                   for m, (o, n) in shape.matrices().items()}
        tensors[p + "input_layernorm.weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
        shard(f"block-{i:05d}.safetensors", tensors)
    index = {"metadata": {"total_size": sum((out / f).stat().st_size for f in set(weight_map.values()))},
             "weight_map": weight_map}
    atomic_write(out / "model.safetensors.index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
    return out
