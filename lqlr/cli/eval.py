"""``lqlr-eval EXPORT``: WikiText-2 perplexity, KL to the source model, all-in bits and size of an export,
and with ``--tasks`` lm-evaluation-harness task metrics, as one JSON.

    lqlr-eval out/s3 --max-windows 8 --out out/s3/eval.json
    lqlr-eval out/s3 --tasks hellaswag,arc_easy --num-fewshot 0 --limit 200 --batch-size 8
    lqlr-eval out/s3 --tasks my_task --include-path my_tasks/ --tasks-only
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lqlr.eval.harness import lm_eval_export
from lqlr.eval.metrics import evaluate, size_on_disk
from lqlr.io.card import write_model_card
from lqlr.io.export import read_manifest


def _limit(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def parser() -> argparse.ArgumentParser:
    """The ``lqlr-eval`` command line."""
    p = argparse.ArgumentParser(prog="lqlr-eval", description="Evaluate an lqlr export: WikiText-2 test perplexity, "
                                "KL to the source model, and lm-evaluation-harness tasks.")
    p.add_argument("path", help="exported directory (with manifest.json)")
    p.add_argument("--reference", default=None, help="uncompressed model for KL (default: the manifest's source model)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: min(context, 2048))")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every file (ppl/KL only; "
                   "from_pretrained for --tasks always verifies)")
    p.add_argument("--tasks", default=None, help="lm-eval tasks, comma-separated (e.g. hellaswag,arc_easy; globs "
                   "such as 'arc_*'); needs pip install 'lqlr[eval]'")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: examples per prompt (default: each task's own)")
    p.add_argument("--limit", type=_limit, default=None, help="lm-eval: first N documents per task (a fraction if < 1)")
    p.add_argument("--batch-size", default="1", help="lm-eval: requests per forward, or 'auto' (default 1)")
    p.add_argument("--include-path", action="append", default=None,
                   help="lm-eval: a folder of your own task YAML files (repeatable)")
    p.add_argument("--tasks-only", action="store_true", help="run only the lm-eval tasks (no WikiText-2 ppl/KL, "
                   "so the source model is not loaded)")
    p.add_argument("--card", action="store_true", help="also write the measured numbers into the export's README.md")
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lqlr-eval``: perplexity, KL, bits, size and lm-eval tasks of an exported directory; JSON out."""
    p = parser()
    a = p.parse_args(argv)
    if a.tasks_only and not a.tasks:
        p.error("--tasks-only needs --tasks (the lm-eval tasks to run)")
    if a.tasks is None and (a.num_fewshot is not None or a.limit is not None or a.include_path):
        p.error("--num-fewshot, --limit and --include-path are lm-eval options: give --tasks too")
    batch_size = a.batch_size if a.batch_size == "auto" else int(a.batch_size)
    if a.tasks_only:
        manifest = read_manifest(a.path, verify=not a.no_verify)
        result = {"path": str(a.path), "bits_per_param": manifest["summary"]["bits_per_param"],
                  "size_on_disk_bytes": size_on_disk(a.path)}
    else:
        result = evaluate(a.path, reference=a.reference, seq_len=a.seq_len, max_windows=a.max_windows,
                          verify=not a.no_verify, progress=True)
    if a.tasks:
        harness = lm_eval_export(a.path, a.tasks, num_fewshot=a.num_fewshot, limit=a.limit, batch_size=batch_size,
                                 include_path=a.include_path)
        result["lm_eval"] = harness["results"]
        result["lm_eval_config"] = harness["config"]
    text = json.dumps(result, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    if a.card:
        write_model_card(a.path, quality=result)
    print(text)
