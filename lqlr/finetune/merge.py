"""Merge a trained adapter into a plain transformers model (W = Q + B·A) with stock PEFT."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from lqlr.io.export import DENSE_DIR, qlr_modules, save_dense
from lqlr.io.load import load

log = logging.getLogger("lqlr.finetune")


def merge_adapter(path: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A plain transformers folder at ``out`` with W = Q + B·A·scale merged by stock PEFT
    (``merge_and_unload``) on the export's dense Q base (``dense/``, or one built from the packed Q)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer


    src, out = Path(path), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose another merge folder or delete it")
    with tempfile.TemporaryDirectory() as tmp:
        dense = src / DENSE_DIR
        if not dense.is_dir():
            model = load(src)
            dense = Path(tmp) / DENSE_DIR
            save_dense(model, qlr_modules(model), dense)  # Q only, like dense/
            del model
        base = AutoModelForCausalLM.from_pretrained(dense)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    except (OSError, ValueError):
        log.warning("no tokenizer in %s: %s has the weights and config only", src, out)
    return out
