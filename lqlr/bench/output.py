"""Benchmark output: one JSON file of records per benchmark plus its Markdown table."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(out_dir: Path, name: str, records: list[dict], table: str, meta: dict) -> None:
    """Write ``<name>.json`` (atomically: temp file + rename) and ``<name>.md`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": name, "meta": meta, "records": records}, indent=1))
    tmp.replace(json_path)
    (out_dir / f"{name}.md").write_text(table)
    print(table)
    print(f"wrote {json_path} and {out_dir / (name + '.md')}")
