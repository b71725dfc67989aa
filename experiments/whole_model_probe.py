"""Whole-model probe: compress SmolLM2-135M several ways on the same WikiText-2 calibration and
compare WikiText-2 test perplexity and KL on the first windows of 2048 tokens.

    python experiments/whole_model_probe.py rtn3 gptq3 gptq3inc gptq4 lqlr3 lqlr35 [--windows 2]

Each variant prints one line: name, compression seconds, ppl, reference ppl, KL. It is a quick
probe for choosing defaults; the full side-by-side benchmark is the quality-benchmark issue.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import lqlr
from lqlr.config import CompressConfig
from lqlr.engine.blocks import compress_model
from lqlr.calibrate.text import calibration_ids, wikitext2_text
from lqlr.eval.metrics import dense_cache, eval_windows, quality
from lqlr.engine.models import load_model
from lqlr.budget.plan import make_plan
from lqlr.config import BudgetConfig

VARIANTS = {
    # name: (QLRConfig, use_hessian, all-in budget or None)
    "rtn3": (lqlr.QLRConfig(bq=3, rank=0), False, None),
    "gptq3": (lqlr.QLRConfig(bq=3, rank=0), True, None),
    "gptq3inc": (lqlr.QLRConfig(bq=3, rank=0, incoherence=True), True, None),
    "gptq4": (lqlr.QLRConfig(bq=4, rank=0, group_size=128), True, None),
    "lqlr3": (lqlr.QLRConfig(bq=2, rank=32, iters=5, incoherence=True), True, 3.0),
    "lqlr35": (lqlr.QLRConfig(bq=3, rank=32, iters=5, incoherence=True), True, 3.5),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    p.add_argument("--windows", type=int, default=2, help="WikiText-2 test windows of 2048 tokens")
    args = p.parse_args()
    ref, tok = load_model("smollm2-135m")
    test = torch.tensor(tok(wikitext2_text("test"), add_special_tokens=False, verbose=False)["input_ids"])
    windows = eval_windows(test, 2048, args.windows)
    calib = calibration_ids(tok, wikitext2_text("validation"), 32, 256, 0)
    for name in args.variants:
        qcfg, use_h, bits = VARIANTS[name]
        model = copy.deepcopy(ref)
        t0 = time.perf_counter()
        plan = make_plan(model, qcfg, BudgetConfig(bits=bits))
        compress_model(model, calib, CompressConfig(qlr=qcfg, use_hessian=use_h), plan=plan, progress=False)
        seconds = time.perf_counter() - t0
        with dense_cache(model):
            metrics = quality(model, ref, windows)
        print(name, round(seconds), {k: round(v, 4) for k, v in metrics.items()}, flush=True)


if __name__ == "__main__":
    main()
