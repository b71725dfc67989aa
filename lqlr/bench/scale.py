"""`lqlr-bench scale`: 7B–70B shapes, lazily, block by block; time and memory per stage, and projections.

For each shape (lqlr.bench.synthetic.SHAPES) a synthetic checkpoint of its first ``blocks`` decoder
blocks is written once (sharded bf16 safetensors), then compressed lazily by each method in a child
process of its own, so that each peak RSS is that method's alone:

* ``gptq``: Q only (k = 0), LDLQ under H, the budget's nearest BQ/group;
* ``lqlr``: the default method (Q + L·R, incoherence, rank from the budget);
* ``auto``: the default method with the global allocator as ``lqlr-compress`` runs it by default
  (the ``budget=auto_fast`` preset's menu at the benchmark's bits: block-wise sensitivities,
  Hessians and cost table).

Each record holds the run's per-block stages (lqlr.engine.blocks.BlockStats), the allocator's time,
the peak RSS and GPU memory, and projections to the whole model: time = planning and blocks scaled
by full_layers / blocks (the allocator's passes go block by block too), memory = the measured peak
plus what grows with depth (the packed blocks so far; for the allocator, one saved hidden-state
tensor per block for its backward pass). A kill/resume check compresses with ``gptq`` in a child
that is killed once its first block is checkpointed, resumes it, and compares the export's bytes
with the uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lqlr.bench.synthetic import SHAPES, write_checkpoint
from lqlr.config import BudgetConfig, CalibrationConfig, CompressConfig, Menu, QLRConfig
from lqlr.io.export import BASE_FILE
from lqlr.util.files import sha256_file

METHODS = ("gptq", "lqlr", "auto")


def method_config(method: str, bits: float, device: str, n_samples: int, seq_len: int):
    """The CompressConfig of one benchmark method (the lqlr-compress presets' values)."""
    calibration = CalibrationConfig(source="wikitext2", n_samples=n_samples, seq_len=seq_len)
    if method == "gptq":  # method=gptq: Q only, LDLQ, no rotation
        qlr, budget = QLRConfig(bq=4, rank=0, group_size=128, incoherence=False), BudgetConfig(bits=bits, fit="nearest")
    elif method in ("lqlr", "auto"):  # method=lqlr
        qlr = QLRConfig(bq=3, rank=32, bl=4, br=4, group_size=64, iters=5, lr_iters=3, incoherence=True)
        budget = allocator_budget(bits) if method == "auto" else BudgetConfig(bits=bits, cache=False)
    else:
        raise ValueError(f"unknown method {method!r}: choose one of {METHODS}")
    return CompressConfig(qlr=qlr, budget=budget, lazy=True, device=device, calibration=calibration)


def allocator_budget(bits: float) -> BudgetConfig:
    """``budget=auto_fast`` (the allocator preset of lqlr-compress's default) at ``bits``, without the cost cache."""
    import yaml

    from lqlr.cli.compress import CONFIG_DIR

    preset = yaml.safe_load((CONFIG_DIR / "budget" / "auto_fast.yaml").read_text())
    return BudgetConfig(mode=preset["mode"], bits=bits, menu=Menu(**preset["menu"]), cache=False)


def run_one(folder: str, method: str, out_dir: str, resume_dir: str | None, bits: float, device: str,
            n_samples: int, seq_len: int, seed: int) -> dict:
    """Compress ``folder`` lazily with ``method`` in this process; the record of the run."""
    import lqlr
    from lqlr.util.memory import peak_rss_mb

    cfg = method_config(method, bits, device, n_samples, seq_len)
    config = json.loads((Path(folder) / "config.json").read_text())
    gen = torch.Generator(device="cpu").manual_seed(seed)  # random token ids: no tokenizer for a synthetic model
    ids = torch.randint(0, config["vocab_size"], (n_samples, seq_len), generator=gen)
    t0 = time.perf_counter()
    res = lqlr.compress(folder, cfg, calibration=ids, output_dir=out_dir, resume_dir=resume_dir, progress=False)
    wall = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    files = sorted(p for p in Path(out_dir).rglob("*") if p.is_file())
    return dict(method=method, bits=res.bits_per_param, wall_s=wall, plan_s=res.plan_s,
                blocks=[s.to_dict() for s in res.block_stats], peak_rss_mb=peak_rss_mb(), peak_gpu_mb=gpu,
                export_mb=sum(p.stat().st_size for p in files) / 2**20,
                base_sha256=sha256_file(Path(out_dir) / BASE_FILE),
                mean_error=sum(r.error for r in res.reports) / len(res.reports))


def _child(args: dict, timeout: float | None = None) -> dict:
    """``run_one(**args)`` in a fresh interpreter; its record."""
    out = Path(args["out_dir"]).with_suffix(".record.json")
    code = ("import json, sys; from lqlr.bench.scale import run_one; "
            f"json.dump(run_one(**json.loads(sys.argv[1])), open({str(out)!r}, 'w'))")
    subprocess.run([sys.executable, "-c", code, json.dumps(args)], check=True, timeout=timeout)
    return json.loads(out.read_text())


def kill_after_first_block(args: dict, poll_s: float = 0.01) -> None:
    """Start ``run_one(**args)`` and SIGKILL it as soon as its first block checkpoint exists."""
    code = "import json, sys; from lqlr.bench.scale import run_one; run_one(**json.loads(sys.argv[1]))"
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)])
    first = Path(args["resume_dir"]) / "block_00000.safetensors"
    while proc.poll() is None and not first.is_file():
        time.sleep(poll_s)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if not first.is_file():
        raise RuntimeError(f"the run to kill ended (rc {proc.returncode}) before writing {first}")


def project(record: dict, shape_name: str, n_blocks: int, hidden: int, tokens: int) -> dict:
    """Whole-model time and peak memory from the measured blocks (see the module docstring)."""
    full = SHAPES[shape_name].full_layers
    blocks = [b for b in record["blocks"] if not b["resumed"]]
    per_block = sum(b["wall_s"] for b in blocks) / max(len(blocks), 1)
    fixed = record["wall_s"] - record["plan_s"] - sum(b["wall_s"] for b in record["blocks"])  # load, export
    grows = record["block_mb"] * (full - n_blocks)  # each further block adds its packed tensors
    if record["method"] == "auto":
        grows += tokens * hidden * 4 * (full - n_blocks) / 2**20  # the sensitivity pass's saved block inputs
    return dict(full_layers=full, per_block_s=per_block, per_block_with_plan_s=per_block + record["plan_s"] / n_blocks,
                whole_model_s=fixed + record["plan_s"] * full / n_blocks + per_block * full,
                whole_model_peak_rss_mb=record["peak_rss_mb"] + grows)


def stage_shares(record: dict) -> dict:
    """Each stage's share of the (non-resumed) blocks' wall time."""
    blocks = [b for b in record["blocks"] if not b["resumed"]]
    total = sum(b["wall_s"] for b in blocks) or 1.0
    stages = ("load_s", "forward_s", "hessian_s", "decompose_s", "pack_s", "checkpoint_s")
    return {k[:-2]: sum(b[k] for b in blocks) / total for k in stages}


def run(shapes: list[str], blocks: dict[str, int], methods: list[str], work_dir: Path, bits: float, device: str,
        n_samples: int, seq_len: int, resume_check: bool, seed: int = 0, collect_only: bool = False) -> list[dict]:
    """Every (shape, method) record, plus the kill/resume check of each shape. ``collect_only``: run
    nothing, gather the records the child runs of an earlier (perhaps interrupted) call left in ``work_dir``."""
    records = []
    for name in shapes:
        shape, n = SHAPES[name], blocks[name]
        folder = work_dir / f"{name}-{n}blocks"
        if not collect_only:
            write_checkpoint(folder, name, n, seed=seed)
        by_method = {}
        for method in methods:
            out = work_dir / f"{name}-{method}"
            if collect_only:
                saved = out.with_suffix(".record.json")
                if not saved.is_file():
                    continue
                rec = json.loads(saved.read_text())
            else:
                _clean(out)
                args = dict(folder=str(folder), method=method, out_dir=str(out), resume_dir=str(out) + ".ckpt",
                            bits=bits, device=device, n_samples=n_samples, seq_len=seq_len, seed=seed)
                rec = _child(args)
            rec.setdefault("block_mb", block_mb(out))
            rec.update(shape=name, n_blocks=n, block_params=shape.block_params(), calibration_tokens=n_samples * seq_len,
                       stage_share=stage_shares(rec), **project(rec, name, n, shape.hidden, n_samples * seq_len))
            by_method[method] = rec
            records.append(rec)
            print(f"{name} {method}: {rec['wall_s']:.0f} s, per block {rec['per_block_s']:.0f} s, "
                  f"peak RSS {rec['peak_rss_mb']:.0f} MiB", flush=True)
        if "gptq" in by_method:
            for rec in by_method.values():
                rec["per_block_vs_gptq"] = rec["per_block_with_plan_s"] / by_method["gptq"]["per_block_with_plan_s"]
        if resume_check and n >= 2 and not collect_only:
            out = work_dir / f"{name}-gptq-resumed"
            _clean(out)
            args = dict(folder=str(folder), method="gptq", out_dir=str(out), resume_dir=str(out) + ".ckpt",
                        bits=bits, device=device, n_samples=n_samples, seq_len=seq_len, seed=seed)
            kill_after_first_block(args)
            resumed = _child(args)
            same = "gptq" in by_method and resumed["base_sha256"] == by_method["gptq"]["base_sha256"]
            records.append(dict(shape=name, method="gptq-killed-and-resumed", n_blocks=n, bits=resumed["bits"],
                                resumed_blocks=sum(b["resumed"] for b in resumed["blocks"]),
                                same_bytes_as_uninterrupted=same, wall_s=resumed["wall_s"]))
            print(f"{name}: killed after block 0 and resumed; same bytes as uninterrupted: {same}", flush=True)
    return records


def block_mb(out: Path) -> float:
    """MiB of the exported decoder-block tensors per block (the packed part that grows with depth)."""
    from safetensors import safe_open

    total, blocks = 0, set()
    with safe_open(str(out / BASE_FILE), framework="pt") as f:
        for k in f.keys():
            if k.startswith("model.layers."):
                blocks.add(k.split(".")[2])
                t = f.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8}.get(t.get_dtype(), 1)
    return total / 2**20 / max(len(blocks), 1)


def _clean(out: Path) -> None:
    import shutil

    for p in (out, Path(str(out) + ".ckpt")):
        shutil.rmtree(p, ignore_errors=True)


def markdown(records: list[dict], meta: dict) -> str:
    lines = [f"# lqlr-bench scale — {meta['device']}, {meta['threads']} threads, "
             f"{meta['calibration']} calibration tokens, budget {meta['bits']} bits", "",
             "| shape | method | blocks run | all-in bits | per block (s) | × GPTQ (allocator included) | allocator (s) | peak RSS (GiB) "
             "| peak GPU (GiB) | whole model (projected) | peak RSS whole model (GiB, projected) | stages: fwd / H / decomp / pack / ckpt |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        if "per_block_s" not in r:
            continue
        sh = r["stage_share"]
        gpu = f"{r['peak_gpu_mb'] / 1024:.1f}" if r.get("peak_gpu_mb") else "–"
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['n_blocks']} of {r['full_layers']} | {r['bits']:.3f} | "
            f"{r['per_block_s']:.0f} | {r.get('per_block_vs_gptq', float('nan')):.2f} | {r['plan_s']:.0f} | "
            f"{r['peak_rss_mb'] / 1024:.1f} | {gpu} | {r['whole_model_s'] / 3600:.1f} h | "
            f"{r['whole_model_peak_rss_mb'] / 1024:.1f} | {sh['forward']:.0%} / {sh['hessian']:.0%} / "
            f"{sh['decompose']:.0%} / {sh['pack']:.0%} / {sh['checkpoint']:.0%} |")
    for r in records:
        if r["method"] == "gptq-killed-and-resumed":
            lines.append(f"\n{r['shape']}: a run killed after its first block and resumed ({r['resumed_blocks']} block "
                         f"reloaded) wrote the same bytes as the uninterrupted run: **{r['same_bytes_as_uninterrupted']}**.")
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(args) -> None:
    """The `lqlr-bench scale` entry (arguments parsed in lqlr.bench)."""
    from lqlr.bench.output import write_results
    from lqlr.util.devices import resolve_device

    t0 = time.perf_counter()
    load_start = os.getloadavg()  # other work on the machine slows every figure here
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    blocks = {s: (args.blocks_70b if s == "llama2-70b" else args.blocks) for s in args.shapes}
    records = run(args.shapes, blocks, args.methods, work, args.bits, args.device, args.n_samples, args.seq_len,
                  resume_check=not args.skip_resume_check, collect_only=args.collect_only)
    meta = dict(command="lqlr-bench scale " + " ".join(sys.argv[2:]), device=str(resolve_device(args.device)),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                threads=torch.get_num_threads(), cpus=os.cpu_count(), machine=platform.machine(),
                torch=torch.__version__, calibration=args.n_samples * args.seq_len, bits=args.bits,
                wall_s=time.perf_counter() - t0, shapes={s: asdict(SHAPES[s]) for s in args.shapes},
                load_average_at_start=load_start, load_average_at_end=os.getloadavg(),
                methods_recorded=sorted({r["method"] for r in records}))
    write_results(Path(args.out), args.name, records, markdown(records, meta), meta)
