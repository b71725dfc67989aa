"""``lqlr-diagnose MODEL``: TwoNN intrinsic dimension of each block and effective ranks of each W and H."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from lqlr.calibrate.diagnostics import diagnose, plot, table
from lqlr.calibrate.text import calibration_from
from lqlr.engine.models import load_model


def main(argv: list[str] | None = None) -> None:
    """``lqlr-diagnose MODEL``: print the table, write JSON and a plot."""
    p = argparse.ArgumentParser(prog="lqlr-diagnose", description="Intrinsic dimension (TwoNN) of each block's "
                                "hidden states and effective ranks of each W and H.")
    p.add_argument("model", help="stories260k, smollm2-135m, a local HF folder or a hub id")
    p.add_argument("--data", default="wikitext2", help="calibration source: wikitext2, self, or a text file/folder")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-points", type=int, default=2000, help="hidden states per block for TwoNN")
    p.add_argument("--out", default="results", help="folder for diagnostics_<model>.json/.md/.png")
    a = p.parse_args(argv)

    model, tok = load_model(a.model)
    source = a.data if a.data in ("self", "wikitext2") else "text"
    ids = calibration_from(source, model, tok, a.n_samples, a.seq_len, 0, path=a.data, progress=True)
    diag = diagnose(model, ids, max_points=a.max_points)
    md = table(diag)
    print(md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "diagnostics_" + Path(a.model).name.replace("/", "_")
    (out / f"{stem}.json").write_text(json.dumps({"model": a.model, "command": "lqlr-diagnose " + " ".join(sys.argv[1:] if argv is None else argv),
                                                  "blocks": [asdict(d) for d in diag]}, indent=1))
    (out / f"{stem}.md").write_text(f"### {a.model}\n\n{md}\n")
    plot(diag, out / f"{stem}.png", a.model)
    print(f"wrote {out / stem}.json, .md and .png")
