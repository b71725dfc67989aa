"""``lqlr-eval EXPORT``: WikiText-2 perplexity, KL to the source model, all-in bits and size of an export, as JSON."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lqlr.eval.metrics import evaluate


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lqlr-eval``: perplexity, KL, bits and size of an exported directory; JSON out."""
    p = argparse.ArgumentParser(prog="lqlr-eval", description="Evaluate an lqlr export on WikiText-2 test.")
    p.add_argument("path", help="exported directory (with manifest.json)")
    p.add_argument("--reference", default=None, help="uncompressed model for KL (default: the manifest's source model)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: min(context, 2048))")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every file")
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    a = p.parse_args(argv)
    result = evaluate(a.path, reference=a.reference, seq_len=a.seq_len, max_windows=a.max_windows,
                      verify=not a.no_verify, progress=True)
    text = json.dumps(result, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
