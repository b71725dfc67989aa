"""`lqlr-bench gguf-speed`: decode speed of lqlr's GGUF exports in llama.cpp, base alone and base + lora.gguf,
against llama.cpp's own quant of the same type, llama.cpp on F32, transformers in fp32 and lqlr's packed kernel.

Every llama.cpp row is one ``lqlr-llama-logits --decode`` process (:func:`lqlr.util.llamacpp.decode_speed`: the
prompt in one batch, then ``--new-tokens`` tokens generated greedily, one ``llama_decode`` each, with llama.cpp's
defaults: K/V cache f16, weight repacking on; the fastest of ``--repeats`` runs), on ``--threads`` threads. The lqlr
files are those ``lqlr-bench gguf`` made in its work folder (``WORK/gguf/<type>-k0-ao``, ``<type>-r<rank>-ao``);
llama.cpp's are ``llama-quantize --allow-requantize`` of the source GGUF (no imatrix: the speed does not depend on
it) to the same type and to F32. The Python rows are :mod:`lqlr.bench.inference`'s workers (a fresh process each,
the same prompt length and new tokens): transformers on the float32 model, and lqlr's packed kernel on that
benchmark's 4-bit export.

Issue 19's target: llama.cpp runs the lqlr export (base + lora.gguf) at ≥ 0.9 × the decode speed of its own quant of
the same type.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lqlr.bench import gguf as G
from lqlr.util import llamacpp

Record = dict[str, Any]
TARGET = 0.9  # lqlr base + LoRA against llama.cpp's own quant of the same type
METHODS = ("llamacpp-f32", "llamacpp", "lqlr-k0", "lqlr-q", "lqlr-qlr", "lqlr-k0-q8e", "lqlr-qlr-q8e",
           "transformers-fp32", "lqlr-packed")
ADAPTED = ("lqlr-qlr", "lqlr-qlr-q8e")  # the lqlr exports with lora.gguf that the target is about


def prompt_ids(vocab: int, length: int, seed: int = 0) -> list[int]:
    """The prompt every row decodes after: ``length`` token ids drawn uniformly (seeded) from the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=gen).tolist()


def lqlr_files(work: Path, kind: str, rank: int) -> dict[str, Path]:
    """The lqlr-GGUF files ``lqlr-bench gguf`` made for ``kind`` (act-order rows); one-line ValueError naming the
    command that makes a missing one."""
    k0, lr = work / "gguf" / G.k0_tag(kind, True), work / "gguf" / G.rank_tag(kind, rank, None, True)
    files = {"lqlr-k0": k0 / "model.gguf", "lqlr-q": lr / "model.gguf", "lqlr-qlr": lr / "lora.gguf"}
    for path in (*files.values(), work / "exports" / k0.name / "manifest.json", work / "exports" / lr.name / "manifest.json"):
        if not path.is_file():
            raise ValueError(f"{path} is missing: run `lqlr-bench gguf --types {kind} --lora-types {kind} --rank {rank} "
                             f"--work-dir {work}` first (it makes the lqlr-GGUF files this benchmark times)")
    return files


def q8_0_embedding_copy(work: Path, tag: str, ldir: Path) -> Path:
    """model.gguf of ``lqlr-bench gguf``'s export ``tag`` written again with ``--embedding-type q8_0`` (once)."""
    from lqlr.io.gguf import export_gguf

    out = ldir / f"{tag}-q8e"
    if not (out / "gguf.json").is_file():
        export_gguf(work / "exports" / tag, out, embedding_type="q8_0")
    return out / "model.gguf"


def gguf_bits(model_gguf: Path, lora_gguf: Path | None, reference: torch.nn.Module) -> dict[str, float]:
    """All-in bits over the block linears of a GGUF file (plus its LoRA), as ``lqlr-bench gguf`` counts them."""
    linears = G.read_linears(model_gguf, reference)
    lora_bytes = G.read_lora(lora_gguf, reference)[1] if lora_gguf else 0
    return G.bits(linears, lora_bytes, reference)


def label(method: str, kind: str | None, rank: int) -> str:
    return {"llamacpp-f32": "llama.cpp, F32 (llama-quantize)",
            "llamacpp": f"llama.cpp, its own {kind} (llama-quantize)",
            "lqlr-k0": f"lqlr-GGUF {kind}, LDLQ (k = 0)",
            "lqlr-q": f"lqlr-GGUF {kind} rank {rank}: model.gguf alone",
            "lqlr-qlr": f"lqlr-GGUF {kind} rank {rank}: model.gguf + lora.gguf",
            "lqlr-k0-q8e": f"lqlr-GGUF {kind}, LDLQ (k = 0), token embedding Q8_0",
            "lqlr-qlr-q8e": f"lqlr-GGUF {kind} rank {rank}: + lora.gguf, token embedding Q8_0",
            "transformers-fp32": "transformers, fp32",
            "lqlr-packed": "lqlr packed kernel (4-bit export of lqlr-bench inference)"}[method]


def verdicts(records: list[Record]) -> list[dict]:
    """Per type and lqlr export with lora.gguf (token embedding as stored, and Q8_0): its decode speed over
    llama.cpp's own quant's, and whether it is ≥ TARGET."""
    by = {(r.get("type"), r["method"]): r for r in records}
    out = []
    for kind in dict.fromkeys(r["type"] for r in records if r.get("type")):
        for method in ADAPTED:
            ours, theirs = by.get((kind, method)), by.get((kind, "llamacpp"))
            if ours and theirs:
                ratio = ours["decode_tok_s"] / theirs["decode_tok_s"]
                out.append({"type": kind, "method": method, "label": ours["label"], "ratio": ratio,
                            "met": ratio >= TARGET})
    return out


def markdown(records: list[Record], meta: dict) -> str:
    if not records:
        return "No rows.\n"
    lines = [f"### {meta['model']}: decode speed, {meta['threads']} threads, a {meta['prompt_len']}-token prompt then "
             f"{meta['new_tokens']} greedy tokens (fastest of {meta['repeats']})", "",
             "| type | method | all-in bits | decode tok/s | × llama.cpp's own quant | prompt tok/s |",
             "|---|---|---:|---:|---:|---:|"]
    own = {r["type"]: r["decode_tok_s"] for r in records if r["method"] == "llamacpp"}
    for r in records:
        ratio = f"{r['decode_tok_s'] / own[r['type']]:.2f}" if r.get("type") in own else ""
        bits = f"{r['bits_per_param']:.3f}" if r.get("bits_per_param") is not None else ""
        lines.append(f"| {r.get('type') or '–'} | {r['label']} | {bits} | {r['decode_tok_s']:.1f} | {ratio} | "
                     f"{r['prompt_tok_s']:.1f} |")
    v = verdicts(records)
    if v:
        lines += ["", f"Issue 19's target: lqlr's model.gguf + lora.gguf at ≥ {TARGET} × the decode speed of llama.cpp's "
                  "own quant of the same type.", "", "| type | lqlr export | ratio | met |", "|---|---|---:|---|"]
        lines += [f"| {x['type']} | {x['label']} | {x['ratio']:.2f} | {'yes' if x['met'] else '**no**'} |" for x in v]
    if meta.get("skipped"):
        lines += ["", f"Not run: {meta['skipped']}"]
    lines += ["", "All-in bits over the block linears (their GGUF bytes, plus lora.gguf's). "
              f"Produced by `{meta['command']}` (WORK is --work-dir; the lqlr files come from `lqlr-bench gguf` there)."]
    return "\n".join(lines) + "\n"


def main(args) -> None:
    """Entry of ``lqlr-bench gguf-speed`` (flags in lqlr/bench/__init__.py)."""
    from lqlr.bench import inference
    from lqlr.bench.output import write_results
    from lqlr.engine.models import load_model

    kinds = list(dict.fromkeys(args.types))
    bad = [k for k in kinds if k not in G.TYPES]
    if bad:
        raise ValueError(f"--types {' '.join(bad)}: choose from {' '.join(G.TYPES)}")
    if args.new_tokens < 1 or args.prompt_len < 1 or args.repeats < 1:
        raise ValueError("--new-tokens, --prompt-len and --repeats must be at least 1")
    work = Path(args.work_dir).expanduser()
    files = {k: lqlr_files(work, k, args.rank) for k in kinds}  # before any slow step
    why = llamacpp.missing()
    if why:
        raise ValueError(f"llama.cpp is not built ({why}): run `python -m lqlr.util.llamacpp build`")
    t0 = time.perf_counter()
    reference, _ = load_model(args.model)
    prompt = prompt_ids(reference.config.vocab_size, args.prompt_len)
    skipped = G.tools_missing() if not args.skip_llamacpp_quants else "llama.cpp's own quants (--skip-llamacpp-quants)"
    ldir = work / "speed"
    ldir.mkdir(parents=True, exist_ok=True)
    records: list[Record] = []

    def timed(method: str, kind: str | None, model_gguf: Path, lora: Path | None = None) -> None:
        res = llamacpp.decode_speed(model_gguf, prompt, args.new_tokens, lora=lora, threads=args.threads,
                                    repeats=args.repeats)
        bits = 32.0 if method == "llamacpp-f32" else gguf_bits(model_gguf, lora, reference)["bits_per_param"]
        rec = {"model": args.model, "type": kind, "method": method, "label": label(method, kind, args.rank),
               "bits_per_param": bits, **{k: v for k, v in res.items() if k != "generated"},
               "file": G._scrub(str(model_gguf), work), "lora": G._scrub(str(lora), work) if lora else None}
        records.append(rec)
        print(f"{rec['label']:58s} decode {rec['decode_tok_s']:7.1f} tok/s  prompt {rec['prompt_tok_s']:7.1f} tok/s",
              flush=True)

    source = None if skipped else G.source_gguf(args.model)
    if source is not None:
        f32 = ldir / f"{args.model}-f32.gguf"
        if not f32.is_file():
            G.quantize(source, f32, "f32", threads=args.threads)
        timed("llamacpp-f32", None, f32)
    for kind in kinds:
        if source is not None:
            own = ldir / f"{args.model}-{kind}.gguf"
            if not own.is_file():
                G.quantize(source, own, kind, threads=args.threads)
            timed("llamacpp", kind, own)
        timed("lqlr-k0", kind, files[kind]["lqlr-k0"])
        timed("lqlr-q", kind, files[kind]["lqlr-q"])
        timed("lqlr-qlr", kind, files[kind]["lqlr-q"], files[kind]["lqlr-qlr"])
        q8e = {m: q8_0_embedding_copy(work, f.parent.name, ldir) for m, f in files[kind].items() if m != "lqlr-qlr"}
        timed("lqlr-k0-q8e", kind, q8e["lqlr-k0"])
        timed("lqlr-qlr-q8e", kind, q8e["lqlr-q"], q8e["lqlr-q"].with_name("lora.gguf"))
    if not args.skip_python:
        from lqlr.nn.kernels import extension

        extension()  # built once, outside the timed workers
        iwork = work / "inference"
        for method, path, bits in (("transformers-fp32", inference.fp32_dir(args.model, iwork), None),
                                   ("lqlr-packed", inference.export_dir(args.model, 4.0, iwork), 4.0)):
            spec = {"model": args.model, "name": method, "bits": bits, "kernel": "packed", "peft": False,
                    "path": str(path), "threads": args.threads, "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens, "repeats": args.repeats}
            res = inference.run_worker(spec)
            records.append({"model": args.model, "type": None, "method": method, "label": label(method, None, args.rank),
                            "bits_per_param": 32.0 if bits is None else res["bits_per_param"],
                            "decode_tok_s": res["decode_tok_s"], "prompt_tok_s": res["prefill_tok_s"],
                            "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens, "threads": res["threads"],
                            "repeats": args.repeats, "kernels_used": res.get("kernels_used")})
            print(f"{records[-1]['label']:58s} decode {res['decode_tok_s']:7.1f} tok/s", flush=True)
    argv = [G._scrub(a, work) for a in getattr(args, "argv", sys.argv[1:])]
    meta = dict(command="lqlr-bench " + " ".join(argv), model=args.model, types=kinds, rank=args.rank,
                threads=args.threads, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                skipped=skipped, llamacpp=f"{llamacpp.PACKAGE}=={llamacpp.VERSION} (vendored llama.cpp)",
                torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count(),
                wall_s=time.perf_counter() - t0)
    write_results(Path(args.out), args.name, records, markdown(records, meta), meta)
