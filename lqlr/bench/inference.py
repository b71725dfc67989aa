"""Inference speed and memory of compressed models (``lqlr-bench inference``).

For each model (stories260K, SmolLM2-135M) and each way of running it — the uncompressed fp32
model, ``lqlr.load`` with the packed kernel at ~2.5/3/4 all-in bits, the pure-torch reference
path, dequantize-once modes (dense W in fp32/fp16/bf16) and the PEFT-wrapped model (packed Q base
+ LoRA L, R) — one fresh worker process loads the model and measures:

* load time (``lqlr.load`` / ``from_pretrained``) and resident memory (RSS) after loading;
* the bytes held by the compressed linears (packed buffers + kernel extras, or the dense cache)
  against their packed bytes on disk;
* prefill tokens/s: one forward over a 512-token prompt (logits of the last position only);
* batch-1 greedy decode tokens/s: N tokens, one forward per token with the KV cache.

Timings are the best of ``repeats`` runs. The compressed exports are made on first use with a fast
recipe (Q+LR with incoherence, H = I, one outer iteration: speed does not depend on quality) and
cached under the work folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# all-in bit budgets of the packed exports and the Q width each uses (ranks fill the rest)
BUDGETS = {2.5: 2, 3.0: 2, 4.0: 3}


@dataclass(frozen=True)
class Mode:
    """One way of running a model: ``source`` "fp32" or a budget; ``kernel``; ``peft``."""

    name: str
    bits: float | None  # None: the uncompressed model
    kernel: str = "auto"
    peft: bool = False


def modes(bits: tuple[float, ...], reference: bool = True) -> list[Mode]:
    """The benchmark's rows: fp32; packed per budget; then at the lowest budget the reference
    path, dequantize-once modes and the PEFT-wrapped model."""
    low = min(bits)
    out = [Mode("fp32 (uncompressed)", None)]
    out += [Mode(f"packed {b:g}", b, "packed") for b in bits]
    if reference:
        out.append(Mode(f"reference {low:g}", low, "reference"))
    out += [Mode(f"dense-{d} {low:g}", low, f"dense-{d}") for d in ("fp32", "fp16", "bf16")]
    out.append(Mode(f"peft + packed {low:g}", low, "packed", peft=True))
    return out


# ----- exports ------------------------------------------------------------------------------
def fp32_dir(model: str, work: Path) -> Path:
    """The uncompressed model saved as a plain fp32 safetensors folder (made once)."""
    out = work / f"{model}-fp32"
    if not (out / "config.json").is_file():
        from lqlr.engine.models import load_model

        m, tok = load_model(model)
        if getattr(m, "hf_quantizer", None) is not None:  # GGUF sources come dequantized, flagged as quantized
            m.hf_quantizer = None
            m.config.__dict__.pop("quantization_config", None)
            m.is_quantized = False
        m.to(torch.float32).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def export_dir(model: str, bits: float, work: Path) -> Path:
    """A compressed export at ``bits`` all-in bits (made once with a fast recipe)."""
    out = work / f"{model}-{bits:g}bit"
    if not (out / "manifest.json").is_file():
        import lqlr

        cfg = lqlr.CompressConfig(qlr=lqlr.QLRConfig(bq=BUDGETS[bits], rank=8, bl=4, br=4, group_size=64, iters=1,
                                                     incoherence=True, seed=0),
                                  use_hessian=False, hessian_mode="independent",
                                  calibration=lqlr.CalibrationConfig(source="wikitext2", n_samples=4, seq_len=128),
                                  budget=lqlr.BudgetConfig(bits=bits))
        lqlr.compress(model, cfg, output_dir=out, progress=False)
    return out


# ----- worker (one fresh process per mode) ----------------------------------------------------
def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, Linux units (KiB)


def linear_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(resident, packed) bytes of the compressed linears: resident counts each distinct storage
    of their buffers, plus the kernel's extras (rotation signs and odd-part factors, dense caches);
    packed is their stored tensors' bytes."""
    from lqlr.nn.layer import QLRLinear

    seen: set[int] = set()
    resident = packed = 0
    for m in model.modules():
        if not isinstance(m, QLRLinear):
            continue
        for t in m.packed_tensors().values():
            packed += t.numel() * t.element_size()
        tensors = [b for _, b in m.named_buffers(recurse=False)]
        weight = getattr(m._fast, "weight", None)
        if weight is not None:
            tensors.append(weight)
        for t in tensors:
            if t.data_ptr() not in seen:  # shared buffers (a PEFT base and its copy) count once
                seen.add(t.data_ptr())
                resident += t.numel() * t.element_size()
        rot = m.incoherence
        if m.kernel == "packed" and rot is not None:
            resident += 4 * (rot.U.n + rot.U.m**2 + rot.V.n + rot.V.m**2)
    return resident, packed


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one model as ``spec`` says and measure it (runs inside the worker process)."""
    import lqlr

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    _warm_imports(spec)
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    if spec["bits"] is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
        kernel_counts: dict[str, int] = {}
    else:
        model = lqlr.load(spec["path"], peft=spec["peft"], verify=False, kernel=spec["kernel"]).eval()
        kernel_counts = _kernel_counts(model)
    load_s = time.perf_counter() - t0
    rss = _rss_bytes()
    resident, packed = linear_bytes(model)
    vocab = model.config.vocab_size if hasattr(model, "config") else model.get_base_model().config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, spec["prompt_len"]), generator=gen)
    short = prompt[:, :16]
    n_new = spec["new_tokens"]

    def prefill() -> None:
        model(input_ids=prompt, use_cache=False, logits_to_keep=1)

    def decode() -> None:  # batch-1 greedy: one forward per token with the KV cache
        out = model(input_ids=short, use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(n_new):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    with torch.inference_mode():
        prefill()  # warm-up
        prefill_s = _timed(prefill, spec["repeats"])
        decode_s = _timed(decode, spec["repeats"])
    rss_run = _rss_bytes()  # every weight touched (safetensors loads are memory-mapped lazily)
    bits = None
    if spec["bits"] is not None:
        bits = json.loads((Path(spec["path"]) / "manifest.json").read_text())["summary"]["bits_per_param"]
    return {"model": spec["model"], "mode": spec["name"], "kernel": spec.get("kernel") if spec["bits"] else "fp32",
            "kernels_used": kernel_counts, "peft": spec["peft"], "budget_bits": spec["bits"], "bits_per_param": bits,
            "decode_tok_s": n_new / decode_s, "prefill_tok_s": spec["prompt_len"] / prefill_s,
            "load_s": load_s, "rss_mb": rss / 2**20, "rss_delta_mb": (rss - rss0) / 2**20,
            "rss_after_run_mb": rss_run / 2**20,
            "linear_resident_mb": resident / 2**20 if spec["bits"] else None,
            "linear_packed_mb": packed / 2**20 if spec["bits"] else None,
            "linear_memory_ratio": resident / packed if spec["bits"] and packed else None,
            "threads": torch.get_num_threads(), "prompt_len": spec["prompt_len"], "new_tokens": n_new,
            "repeats": spec["repeats"]}


def _warm_imports(spec: dict[str, Any]) -> None:
    """Import the model's classes (and peft, and the compiled kernels) before the timed load, so
    load time is reading and building the model, not Python imports or the one-off kernel build."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(spec["path"]))]
    if spec["peft"]:
        import peft  # noqa: F401
    if spec["bits"] is not None and spec["kernel"] in ("auto", "packed"):
        from lqlr.nn.kernels import extension

        extension()


def _kernel_counts(model: torch.nn.Module) -> dict[str, int]:
    from lqlr.nn.layer import QLRLinear

    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QLRLinear):
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return counts


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure ``spec`` in a fresh Python process (so RSS and load time start from scratch)."""
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "lqlr.bench.inference", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker for {spec['model']} / {spec['name']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(models: tuple[str, ...], bits: tuple[float, ...], work: Path, new_tokens: int = 64, prompt_len: int = 512,
        repeats: int = 3, threads: int | None = None, reference: bool = True, progress: bool = True) -> list[dict]:
    """All modes of all models, side by side (exports made or reused under ``work``)."""
    from lqlr.nn.kernels import extension

    extension()  # build the kernels once, outside the timed workers
    records = []
    for model in models:
        for mode in modes(bits, reference=reference):
            path = fp32_dir(model, work) if mode.bits is None else export_dir(model, mode.bits, work)
            if mode.peft and not _has_factors(path):
                print(f"{model:14s} {mode.name:22s} skipped: no matrix has rank > 0 at this budget", flush=True)
                continue
            slow = mode.kernel == "reference" and model != "stories260k"
            spec = {"model": model, "name": mode.name, "bits": mode.bits, "kernel": mode.kernel, "peft": mode.peft,
                    "path": str(path), "threads": threads, "prompt_len": prompt_len,
                    "new_tokens": max(4, new_tokens // 8) if slow else new_tokens, "repeats": 1 if slow else repeats}
            rec = run_worker(spec)
            if progress:
                print(f"{model:14s} {mode.name:22s} decode {rec['decode_tok_s']:8.1f} tok/s  "
                      f"prefill {rec['prefill_tok_s']:8.1f} tok/s  rss {rec['rss_mb']:7.1f} MB  "
                      f"load {rec['load_s']:.2f} s", flush=True)
            records.append(rec)
    return records


def run_paths(paths: list[str], work: Path, new_tokens: int = 64, prompt_len: int = 512, repeats: int = 3,
              threads: int | None = None, kernel: str = "auto", progress: bool = True) -> list[dict]:
    """Time given exports (``lqlr-bench inference --path``) against their source model in fp32: one
    fp32 row per source model (its name from the export's manifest), then one row per export with
    ``kernel`` (``auto``: the packed kernel where it reads the layers' grids)."""
    from lqlr.bench.load import check_export
    from lqlr.nn.kernels import check_kernel, extension

    check_kernel(kernel)
    extension()
    records, seen = [], set()
    for p in paths:
        manifest = check_export(p)  # one-line error when p is not an export
        model = (manifest.get("source") or {}).get("model") or "smollm2-135m"
        bits = float(manifest["summary"]["bits_per_param"])
        specs = []
        if model not in seen:
            seen.add(model)
            specs.append({"model": model, "name": "fp32 (uncompressed)", "bits": None, "kernel": "fp32", "peft": False,
                          "path": str(fp32_dir(model, work))})
        specs.append({"model": model, "name": f"{Path(p).name} ({kernel})", "bits": bits, "kernel": kernel,
                      "peft": False, "path": str(Path(p).resolve())})
        for spec in specs:
            spec.update(threads=threads, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats)
            rec = run_worker(spec)
            rec["path"] = Path(p).name if spec["bits"] is not None else None
            if progress:
                print(f"{model:14s} {spec['name']:30s} decode {rec['decode_tok_s']:8.1f} tok/s  "
                      f"prefill {rec['prefill_tok_s']:8.1f} tok/s  kernels {rec['kernels_used']}", flush=True)
            records.append(rec)
    return records


def _has_factors(path: Path) -> bool:
    manifest = json.loads((path / "manifest.json").read_text())
    return any(int(e["spec"].get("rank", 0)) > 0 for e in manifest["modules"].values())


def markdown(records: list[dict]) -> str:
    """One table per model: speed relative to fp32, memory, load time."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        base = next((r for r in rows if r["kernel"] == "fp32"), None)
        lines += [f"### {model}", "",
                  "| mode | all-in bits | decode tok/s | × fp32 | prefill tok/s (512) | × fp32 | RSS after load / after run (MB) "
                  "| linears resident / packed (MB) | load (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            bits = f"{r['bits_per_param']:.3f}" if r["bits_per_param"] else "32"
            rel_d = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else ""
            rel_p = f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}" if base else ""
            lin = (f"{r['linear_resident_mb']:.1f} / {r['linear_packed_mb']:.1f} ({r['linear_memory_ratio']:.2f}×)"
                   if r["linear_packed_mb"] else "")
            lines.append(f"| {r['mode']} | {bits} | {r['decode_tok_s']:.1f} | {rel_d} | {r['prefill_tok_s']:.1f} | "
                         f"{rel_p} | {r['rss_mb']:.0f} / {r.get('rss_after_run_mb', float('nan')):.0f} | {lin} | {r['load_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # worker entry: python -m lqlr.bench.inference '<spec json>'
    print(json.dumps(measure(json.loads(sys.argv[1]))))
