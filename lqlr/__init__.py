"""lqlr: compress LLM weights as W ≈ Q + L·R (low-bit backbone + low-rank, low-bit factors).

Public API::

    cfg = lqlr.QLRConfig(bq=2, rank=32, bl=4, br=4, group_size=64, iters=20, seed=0)
    d = lqlr.decompose(W, H, cfg)   # W (out, in); H (in, in) or None
    d.weight(), d.error, d.bits_per_param, d.history
"""
from .bits import BitBreakdown, bit_breakdown, bits_per_param
from .config import QLRConfig
from .decompose import Decomposition, decompose
from .quantizers import NormalFloatGrid, QuantizedTensor, UniformGrid, make_grid
from .compress import CompressConfig
from .eval import evaluate
from .export import load, save_compressed
from .layer import QLRLinear
from .pipeline import CompressResult, compress

__all__ = [
    "compress",
    "CompressConfig",
    "CompressResult",
    "load",
    "save_compressed",
    "evaluate",
    "QLRLinear",
    "QLRConfig",
    "decompose",
    "Decomposition",
    "BitBreakdown",
    "bit_breakdown",
    "bits_per_param",
    "UniformGrid",
    "NormalFloatGrid",
    "QuantizedTensor",
    "make_grid",
]
__version__ = "0.1.0"
