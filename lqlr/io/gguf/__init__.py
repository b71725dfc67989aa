"""GGUF (llama.cpp) output: lqlr's GGUF grids as ggml tensor bytes, and an export as model.gguf + lora.gguf."""
from lqlr.io.gguf.blocks import from_gguf_bytes, ggml_type, to_gguf_bytes
from lqlr.io.gguf.export import export_gguf

__all__ = ["export_gguf", "from_gguf_bytes", "ggml_type", "to_gguf_bytes"]
