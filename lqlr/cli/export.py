"""``lqlr-export gguf EXPORT OUT``: an lqlr export as llama.cpp / Ollama files (docs/gguf.md).

    lqlr-export gguf out/s4 out/s4-gguf                       # model.gguf, lora.gguf, Modelfile, gguf.json
    lqlr-export gguf out/s4 out/s4-ft --adapter out/s4-ft/adapter --lora-type q8_0
    llama-cli -m out/s4-gguf/model.gguf --lora out/s4-gguf/lora.gguf -p "Once upon a time"
    cd out/s4-gguf && ollama create s4 -f Modelfile
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lqlr.io.gguf.export import EMBEDDING_TYPES, FLOAT_TYPES, LORA_TYPES, PLAN_FILE, export_gguf


def parser() -> argparse.ArgumentParser:
    """The ``lqlr-export`` command line."""
    p = argparse.ArgumentParser(prog="lqlr-export", description="Write an lqlr export in other formats.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{gguf}")
    g = sub.add_parser("gguf", help="model.gguf + lora.gguf + Ollama Modelfile for llama.cpp / Ollama",
                       description="Write an lqlr export (Q on a GGUF grid, no incoherence rotation) as llama.cpp "
                       "files: model.gguf (Q's codes as they are), lora.gguf (L, R), an Ollama Modelfile and "
                       "gguf.json (types, bytes, all-in bits).")
    g.add_argument("export", help="the lqlr export folder (with manifest.json)")
    g.add_argument("out", help="output folder (created; files are replaced atomically)")
    g.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder (e.g. lqlr-finetune's) to write "
                   "instead of the export's own L, R")
    g.add_argument("--lora-type", choices=LORA_TYPES, default="f16", help="type of the LoRA tensors (default f16)")
    g.add_argument("--fallback-type", choices=tuple(FLOAT_TYPES), default="f16",
                   help="type of Q for linears whose rows are not 32-weight blocks (default f16)")
    g.add_argument("--embedding-type", choices=EMBEDDING_TYPES, default="stored",
                   help="token embedding: as the export stores it (default) or q8_0 (as llama-quantize; smaller)")
    g.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: the export's)")
    g.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the export's files")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lqlr-export``; bad input ends with one line on stderr and exit status 1."""
    a = parser().parse_args(argv)
    logging.getLogger("gguf").setLevel(logging.ERROR)  # gguf-py's notes on special tokens are not for users
    try:
        r = export_gguf(a.export, a.out, adapter=a.adapter, lora_type=a.lora_type, fallback_type=a.fallback_type,
                        embedding_type=a.embedding_type,
                        tokenizer=a.tokenizer, verify=not a.no_verify)
    except (ValueError, OSError, KeyError) as err:
        message = (str(err).strip().splitlines() or [type(err).__name__])[0]
        sys.exit(f"lqlr-export {a.command}: error: {message}")
    out = Path(a.out)
    m, lora, s = r["model"], r["lora"], r["summary"]
    print(f"{out / m['file']}: {m['bytes']:,} bytes, {m['file_type']}, tokenizer {m['tokenizer']['model']}")
    if lora:
        print(f"{out / lora['file']}: {lora['bytes']:,} bytes, {lora['type']}, alpha {lora['alpha']:g}")
    for name, why in r["fallbacks"].items():
        print(f"fallback {name}: {why}")
    print(f"{out / r['modelfile']['file']}: {r['modelfile']['note']}")
    lora_bits = s["bits_per_param"] - s["q_bits_per_param"]
    print(f"all-in bits over {s['compressed_linears']} compressed linears: {s['bits_per_param']:.3f} "
          f"(Q {s['q_bits_per_param']:.3f} + LoRA {lora_bits:.3f}); plan in {out / PLAN_FILE}")
