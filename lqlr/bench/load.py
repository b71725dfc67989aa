"""Peak memory and time of loading an export (``lqlr-bench load``): transformers' ``from_pretrained``
(optionally with ``dtype=``) against ``lqlr.load``, each in fresh child processes.

Issue 20's check: the peak RSS of ``AutoModelForCausalLM.from_pretrained(export)`` is at most
1.15 × the packed tensor bytes plus the runtime baseline. Each child

1. imports torch, transformers and lqlr (RSS ``rss_imports_mb``);
2. warms up: imports the export's model class and loads a tiny export (a stories260K one unless
   ``--warmup`` names another; ``--warmup none`` skips it) with the same call, then drops it, returns
   freed heap pages to the OS and resets the peak counter (``reset_peak_rss``). One-off costs
   (transformers' lazy modules, the modeling code, lqlr's quantizer hooks, the compiled kernels) are
   so not counted against the weights. The RSS at that point is the **baseline** (``baseline_mb``);
3. loads the export, timed (``load_s``), and reads the peak RSS since the reset (VmHWM; ru_maxrss,
   which includes the warm-up, where /proc/self/clear_refs is missing): ``peak_load_mb``;
4. reads one element of every memory page of every weight (``touch``) and reads the peak again:
   ``peak_mb``. safetensors memory-maps the file, and pages nothing has read yet are not resident,
   so the load-only peak understates what the model holds once it runs; the check uses ``peak_mb``.

The weights are measured two ways: ``stored_mb``, the sum of the tensor sizes in model.safetensors
(from its header), and ``memory_mb``, the parameter and buffer bytes of the loaded model (shared
tensors once). They differ when the untouched tensors (embeddings, norms; stored in 16 bits) are
held in float32, transformers' default. ``overhead_stored`` = (peak − baseline) / stored and
``overhead_memory`` = (peak − baseline) / memory; the check passes when it is ≤ 1.15. The same ratio
against the import-only RSS (``overhead_stored_cold``) charges the warm-up's one-off costs to the
weights. The RSS growth is split into heap (``rss_anon_growth_mb``) and mapped files
(``rss_file_growth_mb``).

Each call runs ``repeats`` times (one child each): the record keeps the best load time and the memory
of the child with the largest peak − baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOADERS = ("from_pretrained", "lqlr.load")
FACTOR = 1.15  # issue 20: peak RSS <= 1.15 x packed tensor bytes + the runtime baseline
SMALL_MB = 16.0  # below this many MB of tensors, the model's fixed costs (~1 MB outside its tensors) dominate
WARMUP_NAME = "warmup-stories260k"


# ----- the export -----------------------------------------------------------------------------
def check_export(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the export at ``path`` (sha256 not checked here: each load checks them);
    ValueError, one line, when ``path`` is not an export."""
    from lqlr.io.export import BASE_FILE, read_manifest

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder: --path takes an lqlr export (a folder with manifest.json)")
    try:
        manifest = read_manifest(root, verify=False)
    except ValueError as err:  # IntegrityError: no manifest, not lqlr's format, missing files
        raise ValueError(str(err)) from err
    if not (root / BASE_FILE).is_file():
        raise ValueError(f"{root} has no {BASE_FILE}: not an lqlr export")
    config = json.loads((root / "config.json").read_text()) if (root / "config.json").is_file() else {}
    if (config.get("quantization_config") or {}).get("quant_method") != "lqlr":
        raise ValueError(f"{root}/config.json has no quantization_config with quant_method 'lqlr' (written by an lqlr "
                         "older than from_pretrained support, which would build a dense model): export it again")
    return manifest


def stored_tensor_bytes(path: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, int]:
    """Bytes of the tensors stored in the export's model.safetensors, from its header (nothing else is
    read): ``total``, ``packed`` (the compressed linears' codes, scales, factors) and ``untouched``."""
    from lqlr.io.export import BASE_FILE

    with open(Path(path) / BASE_FILE, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    prefixes = tuple(name + "." for name in manifest["modules"])
    out = {"total": 0, "packed": 0, "untouched": 0}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        out["total"] += size
        out["packed" if key.startswith(prefixes) else "untouched"] += size
    return out


def warmup_export(work: Path) -> Path:
    """A tiny stories260K export (seconds to make; made once under ``work``) for the children's warm-up load."""
    import lqlr

    out = work / WARMUP_NAME
    if (out / "manifest.json").is_file():
        return out
    cfg = lqlr.CompressConfig(qlr=lqlr.QLRConfig(bq=3, rank=4, group_size=32, iters=1, incoherence=True),
                              calibration=lqlr.CalibrationConfig(source="wikitext2", n_samples=4, seq_len=64))
    lqlr.compress("stories260k", cfg, output_dir=out, progress=False)
    return out


# ----- the child ------------------------------------------------------------------------------
def _load(loader: str, path: str, dtype: str | None = None):
    """Load ``path`` the way ``loader`` names: a Hugging Face user's call (``dtype``: its ``dtype=``
    argument, None for transformers' default), or lqlr's own (which has no dtype)."""
    import torch

    if loader == "from_pretrained":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, **({"dtype": getattr(torch, dtype)} if dtype else {}))
    if loader == "lqlr.load":
        import lqlr

        if dtype is not None:
            raise ValueError(f"dtype={dtype!r}: lqlr.load has no dtype argument (it computes in float32)")
        return lqlr.load(path)
    raise ValueError(f"unknown loader {loader!r}: choose one of {LOADERS}")


def loader_label(loader: str, dtype: str | None) -> str:
    """How a record names its call, e.g. ``from_pretrained(dtype=float16)``."""
    return f"{loader}(dtype={dtype})" if dtype else loader


def touch(model) -> None:
    """Read one element of every memory page of every parameter and buffer (each shared tensor once), so
    that weights safetensors memory-mapped but nothing has read yet are resident too; allocates nothing
    of the tensors' size."""
    import torch

    seen: set[int] = set()
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.numel() == 0 or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if t.is_contiguous():
                t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()  # one element per 4 KiB page
            else:
                t.detach().sum()


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Baseline, load time and peak RSS of loading ``spec["path"]`` with ``spec["loader"]``; meant to run
    in a fresh process (``run_child``), since the RSS of this process is what it measures."""
    import torch
    import transformers  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import lqlr  # noqa: F401  (registers quant_method "lqlr" with transformers)
    from lqlr.nn.layer import QLRLinear
    from lqlr.util.memory import (
        module_memory_mb,
        peak_rss_mb,
        reset_peak_rss,
        rss_mb,
        rss_parts_mb,
    )

    startup_s = time.time() - spec["spawned_at"] if spec.get("spawned_at") else None  # interpreter + imports
    rss_imports = rss_mb()
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(spec["path"]))]  # the modeling code, imported
    warmup_s = None
    if spec.get("warmup"):
        t0 = time.perf_counter()
        warm = _load(spec["loader"], spec["warmup"], spec.get("dtype"))
        warmup_s = time.perf_counter() - t0
        del warm
    reset = reset_peak_rss()  # gc, malloc_trim, VmHWM := VmRSS
    baseline, parts0 = rss_mb(), rss_parts_mb()
    t0 = time.perf_counter()
    model = _load(spec["loader"], spec["path"], spec.get("dtype"))
    load_s = time.perf_counter() - t0
    peak_load = peak_rss_mb()
    touch(model)  # every page of every weight resident, as once the model has run
    peak = peak_rss_mb()
    after, parts = rss_mb(), rss_parts_mb()
    held = module_memory_mb(model)
    qlr = [m for m in model.modules() if isinstance(m, QLRLinear)]
    if spec.get("n_modules") is not None and len(qlr) != spec["n_modules"]:
        raise RuntimeError(f"{spec['loader']}({spec['path']}) built {len(qlr)} QLRLinear modules, the manifest "
                           f"lists {spec['n_modules']}: not the packed model")
    linears = sum(sum(module_memory_mb(m).values()) for m in qlr)
    return {"loader": spec["loader"], "startup_s": startup_s, "warmup_s": warmup_s, "load_s": load_s,
            "rss_imports_mb": rss_imports, "baseline_mb": baseline, "peak_load_mb": peak_load, "peak_mb": peak, "rss_after_mb": after,
            "rss_anon_growth_mb": parts["anon"] - parts0["anon"], "rss_file_growth_mb": parts["file"] - parts0["file"],
            "peak_reset": reset, "memory_mb": held["trainable"] + held["frozen"], "memory_linears_mb": linears,
            "n_qlr_linear": len(qlr), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "threads": torch.get_num_threads()}


def run_child(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """``measure(spec)`` in a fresh interpreter; its result."""
    spec = {**spec, "spawned_at": time.time()}
    proc = subprocess.run([sys.executable, "-m", "lqlr.bench.load", json.dumps(spec)], check=False,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load benchmark child ({loader_label(spec['loader'], spec.get('dtype'))} {spec['path']}) failed with exit code "
                           f"{proc.returncode}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----- records --------------------------------------------------------------------------------
def record(path: str | os.PathLike, loader: str, warmup: str | os.PathLike | None, dtype: str | None = None,
           repeats: int = 1, timeout: float | None = None, factor: float = FACTOR) -> dict[str, Any]:
    """One (export, loader, dtype) record: the export's method, all-in bits and tensor bytes, the children's
    measurements (best load time; the memory of the child with the largest peak − baseline), the check."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: run each loader at least once")
    manifest = check_export(path)
    stored = stored_tensor_bytes(path, manifest)
    spec = {"path": str(path), "loader": loader, "dtype": dtype, "warmup": str(warmup) if warmup else None,
            "n_modules": manifest["summary"]["n_modules"]}
    runs = [run_child(spec, timeout) for _ in range(repeats)]
    worst = max(runs, key=lambda r: r["peak_mb"] - r["baseline_mb"])
    source = manifest.get("source", {})
    rec = {"path": str(path), "model": source.get("model"), "method": source.get("method"),
           "bits_per_param": manifest["summary"]["bits_per_param"], "n_modules": manifest["summary"]["n_modules"],
           "stored_mb": stored["total"] / 2**20, "stored_packed_mb": stored["packed"] / 2**20,
           "stored_untouched_mb": stored["untouched"] / 2**20, "warmup": spec["warmup"], "repeats": repeats,
           "dtype_requested": dtype, "call": loader_label(loader, dtype),
           **worst, "load_s": min(r["load_s"] for r in runs), "load_s_runs": [r["load_s"] for r in runs],
           "peak_mb_runs": [r["peak_mb"] for r in runs], "factor": factor}
    rec["warmup"] = Path(warmup).name if warmup else None  # a name: no machine path in the results
    delta = rec["peak_mb"] - rec["baseline_mb"]
    rec["peak_minus_baseline_mb"] = delta
    rec["overhead_stored"] = delta / rec["stored_mb"]
    rec["overhead_memory"] = delta / rec["memory_mb"]
    rec["overhead_stored_load_only"] = (rec["peak_load_mb"] - rec["baseline_mb"]) / rec["stored_mb"]
    rec["overhead_stored_cold"] = (rec["peak_mb"] - rec["rss_imports_mb"]) / rec["stored_mb"]
    rec["pass_stored"] = rec["overhead_stored"] <= factor
    rec["pass_memory"] = rec["overhead_memory"] <= factor
    return rec


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**fail**"


def markdown(records: list[dict[str, Any]], factor: float = FACTOR) -> str:
    """The table (one row per export and call) and the check's verdict per ``from_pretrained`` record."""
    lines = ["# Loading an export: peak RSS and time (`lqlr-bench load`)", "",
             (f"Check (issue 20): peak RSS of `AutoModelForCausalLM.from_pretrained(export)` ≤ {factor:g} × the "
              "packed tensor bytes + the runtime baseline. Each row: fresh child processes (best load time, worst "
              "peak). Baseline: the child's RSS after importing torch, transformers and lqlr and a warm-up load "
              "of a tiny export (dropped, peak counter reset). Peak: VmHWM after the load and after reading one "
              "element of every page of every weight (memory-mapped weights count once read: 'used'); the check "
              "uses the 'used' peak. Packed tensor bytes two ways: stored (model.safetensors) and in memory (the "
              "model's parameters and buffers; the untouched tensors are stored in 16 bits and held in the "
              "model's dtype). RSS growth split into heap (anon) and mapped files. MB = 2^20 bytes."), "",
             ("| export | method | all-in bits | call | load (s) | RSS imports / baseline (MB) "
              "| peak RSS load / used (MB) | peak − baseline (MB) | growth heap / file (MB) "
              "| tensors stored / in memory (MB) | ÷ stored | ÷ in memory | ÷ stored, import-only baseline |"),
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {Path(r['path']).name} | {r['method'] or '–'} | {r['bits_per_param']:.3f} | `{r['call']}` "
                     f"| {r['load_s']:.2f} | {r['rss_imports_mb']:.0f} / {r['baseline_mb']:.0f} "
                     f"| {r['peak_load_mb']:.0f} / {r['peak_mb']:.0f} | {r['peak_minus_baseline_mb']:.1f} "
                     f"| {r['rss_anon_growth_mb']:.1f} / {r['rss_file_growth_mb']:.1f} "
                     f"| {r['stored_mb']:.1f} / {r['memory_mb']:.1f} | {r['overhead_stored']:.2f}× "
                     f"| {r['overhead_memory']:.2f}× | {r['overhead_stored_cold']:.2f}× |")
    lines += ["", f"Verdict (`from_pretrained`, (used peak − baseline) ÷ tensor bytes ≤ {factor:g}):", ""]
    for r in records:
        if r["loader"] != "from_pretrained":
            continue
        small = (f" (only {r['stored_mb']:.1f} MB of tensors: the model's fixed costs, about 1 MB outside its "
                 "tensors, dominate; the check is meant for real model sizes)") if r["stored_mb"] < SMALL_MB else ""
        lines.append(f"- {Path(r['path']).name} ({r['bits_per_param']:.2f} bits), `{r['call']}`: against the stored "
                     f"bytes {r['overhead_stored']:.3f}× → {_verdict(r['pass_stored'])}; against the in-memory bytes "
                     f"{r['overhead_memory']:.3f}× → {_verdict(r['pass_memory'])}{small}")
    lines.append("")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    """``lqlr-bench load``: every export in ``args.path`` with every loader in ``args.loaders``
    (``from_pretrained`` once per dtype in ``args.dtypes``, "default" meaning no dtype argument)."""
    from lqlr.bench.output import write_results

    t0 = time.perf_counter()
    for p in args.path:
        check_export(p)
    if args.warmup == "auto":
        warmup: Path | None = warmup_export(Path(args.work_dir))
    elif args.warmup == "none":
        warmup = None
    else:
        warmup = Path(args.warmup)
        check_export(warmup)
    dtypes = [None if d == "default" else d for d in args.dtypes]
    calls = [(loader, d) for loader in args.loaders for d in (dtypes if loader == "from_pretrained" else [None])]
    records = []
    for p in args.path:
        for loader, dtype in calls:
            rec = record(p, loader, warmup, dtype=dtype, repeats=args.repeats, timeout=args.timeout)
            print(f"{Path(p).name:24s} {rec['call']:34s} load {rec['load_s']:6.2f} s  baseline {rec['baseline_mb']:7.1f} MB  "
                  f"peak {rec['peak_mb']:7.1f} MB  (peak - baseline) / stored {rec['overhead_stored']:.2f}x", flush=True)
            records.append(rec)
    import torch
    import transformers

    meta = {"command": "lqlr-bench load " + " ".join(args.argv[1:]), "factor": FACTOR, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "wall_s": time.perf_counter() - t0}
    write_results(Path(args.out), args.name, records, markdown(records), meta)


if __name__ == "__main__":  # child entry: python -m lqlr.bench.load '<spec json>'
    print(json.dumps(measure(json.loads(sys.argv[1]))))
