"""GGUF (llama.cpp) output: lqlr's GGUF grids as ggml tensor bytes."""
from lqlr.io.gguf.blocks import from_gguf_bytes, ggml_type, to_gguf_bytes

__all__ = ["from_gguf_bytes", "ggml_type", "to_gguf_bytes"]
