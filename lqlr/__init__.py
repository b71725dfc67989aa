"""lqlr: compress LLM weights as W ≈ Q + L·R (low-bit backbone + low-rank, low-bit factors).

One matrix::

    cfg = lqlr.QLRConfig(bq=2, rank=32, bl=4, br=4, group_size=64, iters=20, seed=0)
    d = lqlr.decompose(W, H, cfg)   # W (out, in); H (in, in) or None
    d.weight(), d.error, d.bits_per_param, d.history

A whole model::

    res = lqlr.compress("stories260k", lqlr.CompressConfig(budget=lqlr.BudgetConfig(bits=3)), output_dir="out/s3")
    model = lqlr.load("out/s3")                 # QLRLinear modules; lqlr.load(..., peft=True) to fine-tune
    lqlr.evaluate("out/s3")                     # WikiText-2 ppl, KL to the source, all-in bits, size
"""
from lqlr.config import (
                         BudgetConfig,
                         CalibrationConfig,
                         CompressConfig,
                         EvalConfig,
                         ExportConfig,
                         Menu,
                         QLRConfig,
)
from lqlr.core.bits import BitBreakdown, bit_breakdown, bits_per_param
from lqlr.core.decompose import Decomposition, decompose
from lqlr.core.grids import NormalFloatGrid, QuantizedTensor, UniformGrid, make_grid
from lqlr.engine.pipeline import CompressResult, compress
from lqlr.eval.metrics import evaluate
from lqlr.io.export import save_compressed
from lqlr.io.hf import register as _register_transformers
from lqlr.io.load import load
from lqlr.nn.layer import QLRLinear

__all__ = [
    "compress",
    "CompressConfig",
    "CompressResult",
    "CalibrationConfig",
    "BudgetConfig",
    "Menu",
    "ExportConfig",
    "EvalConfig",
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
__version__ = "0.2.0"

_register_transformers()  # AutoModelForCausalLM.from_pretrained(export) loads it packed (lqlr.io.hf)
