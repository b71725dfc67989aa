"""An lqlr export as llama.cpp / Ollama files (docs/gguf.md):

    model.gguf   the base: each compressed linear's Q as its GGUF block type, the packed codes as they are
                 (no requantization); embeddings, norms, LM head as stored; the tokenizer; llama.cpp's metadata
    lora.gguf    L, R in the original basis as a llama.cpp LoRA adapter (or a fine-tuned PEFT adapter's B, A)
    Modelfile    for ``ollama create``: FROM ./model.gguf, ADAPTER ./lora.gguf (+ a TEMPLATE for ChatML models)
    gguf.json    the plan: per tensor its ggml type and bytes, the fallbacks, the all-in bits; written last

Every file is written to a temp name and renamed when complete; gguf.json is removed first and written last,
so a folder without it is an unfinished export.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from lqlr.core.gguf_grids import BLOCK, GGUF_GRIDS
from lqlr.core.grids import make_grid, quantize_rtn
from lqlr.io.export import ADAPTER_DIR, BASE_FILE, read_manifest
from lqlr.io.gguf.blocks import ggml_type, to_gguf_bytes
from lqlr.io.gguf.convert import (Arch, add_hparams, file_type, float_array, gguf_name, llama_arch, permute_rows,
                                  qk_heads)
from lqlr.io.gguf.vocab import VocabRecord, add_tokenizer, tokenizer_kind
from lqlr.nn.layer import QLRLinear
from lqlr.util.files import atomic_write, sha256_file

MODEL_FILE = "model.gguf"
LORA_FILE = "lora.gguf"
MODELFILE = "Modelfile"
PLAN_FILE = "gguf.json"
FLOAT_TYPES = {"f32": (np.float32, gguf.GGMLQuantizationType.F32), "f16": (np.float16, gguf.GGMLQuantizationType.F16)}
LORA_TYPES = ("f16", "f32", "q8_0")
EMBEDDING_TYPES = ("stored", "q8_0")  # token_embd.weight: as the export stores it, or Q8_0 as llama-quantize writes it
EMBEDDING = "token_embd.weight"
STORED_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# Ollama's ChatML template (its chatml.gotmpl), for tokenizers whose chat template is ChatML
CHATML_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                   "<|im_start|>assistant\n")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor written to a GGUF file: its names, ggml type, (rows, cols) as in transformers, bytes, note."""

    name: str
    source: str
    type: str
    shape: tuple[int, ...]
    nbytes: int
    note: str


@dataclass(frozen=True)
class LinearPlan:
    """How one compressed linear goes into model.gguf: its codes as they are (``type`` = the grid's GGUF type),
    or, when its rows are not made of the type's blocks (32 weights, or 256 for a k-quant), its dequantized Q
    in ``fallback`` type."""

    name: str
    tensor: str
    shape: tuple[int, int]
    type: str
    fallback: str | None


def _refusal(name: str, spec: dict[str, Any]) -> str | None:
    """Why the Q of module ``name`` cannot be written as llama.cpp blocks as it is (None when it can)."""
    q = spec["q"]
    fix = ("compress with a GGUF grid and no rotation (method.grid=q4_0 method.bq=4 method.group_size=32 "
           "method.incoherence=false, or q4_1/q5_0/q5_1/q8_0/iq4_nl; or the k-quants q2_k…q6_k or the i-quants "
           "iq4_xs/iq3_xxs/iq2_xs/iq2_s with method.group_size=256) to export to GGUF")
    if spec.get("rotation"):
        return (f"{name} has an incoherence rotation: its Q is stored in a rotated basis that llama.cpp cannot "
                f"undo; {fix}")
    if q["kind"] not in GGUF_GRIDS:
        return (f"{name}: Q is on grid {q['kind']}{q.get('bits', '')}/g{q.get('group_size', '')}, not a GGUF block "
                f"type ({', '.join(GGUF_GRIDS)}); {fix}")
    return None


def plan_linears(manifest: dict[str, Any], arch: Arch, fallback_type: str = "f16") -> list[LinearPlan]:
    """The :class:`LinearPlan` of every compressed module; one-line ValueError naming the first module whose Q
    is rotated or not on a GGUF grid (and how many more there are)."""
    problems = [p for name, e in manifest["modules"].items() if (p := _refusal(name, e["spec"]))]
    if problems:
        more = f" ({len(problems) - 1} more modules alike)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)
    tmap = arch.tensor_map()
    plans = []
    for name, entry in manifest["modules"].items():
        out_f, in_f = entry["shape"]
        kind = entry["spec"]["q"]["kind"]
        fallback = None
        block = GGUF_GRIDS[kind].group_block  # 32, or a k-quant's super-block of 256
        if in_f % block:
            fallback = (f"rows of {in_f} are not a multiple of {block}: no {kind} blocks; the dequantized Q is written "
                        f"as {fallback_type} (as llama.cpp keeps such tensors in a fallback type)")
        plans.append(LinearPlan(name=name, tensor=gguf_name(tmap, f"{name}.weight"), shape=(out_f, in_f),
                                type=fallback_type if fallback else kind, fallback=fallback))
    return plans


def _layer(f, name: str, entry: dict[str, Any]) -> QLRLinear:
    """The QLRLinear of module ``name`` from the open base file ``f`` (its packed buffers only)."""
    out_f, in_f = entry["shape"]
    layer = QLRLinear(in_f, out_f, entry["spec"], bias=False)
    layer.load_packed({b: f.get_tensor(f"{name}.{b}") for b, _ in layer.named_buffers(recurse=False)})
    return layer


def _order(hf_name: str) -> tuple:
    """Tensors in llama.cpp's usual order: token embeddings, then block by block, then the rest."""
    bid = next((int(p) for p in hf_name.split(".") if p.isdecimal()), None)
    if bid is not None:
        return (1, bid, hf_name)
    return (0 if "embed_tokens" in hf_name else 2, 0, hf_name)


def _write_gguf(path: Path, writer: gguf.GGUFWriter) -> None:
    def write(tmp: Path) -> None:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)


def _add_metadata(writer: gguf.GGUFWriter, card_dir: Path | None, name: str | None, kind: str) -> None:
    """general.type and the general.* keys gguf-py's Metadata derives from a model folder (model card, config),
    as convert_hf_to_gguf's prepare_metadata writes them."""
    total, shared, expert, count = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, card_dir if card_dir and card_dir.is_dir() else None, None, total)
    if name:
        meta.name = name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    writer.add_type(kind)
    meta.set_gguf_meta_model(writer)


def write_model(root: Path, manifest: dict[str, Any], arch: Arch, plans: list[LinearPlan], path: Path,
                tokenizer_dir: Path, name: str | None, embedding_type: str = "stored"
                ) -> tuple[list[TensorEntry], VocabRecord]:
    """model.gguf: the packed Q codes as their GGUF type (fallback: dequantized Q), every untouched tensor as
    stored (norms in F32; the token embedding in Q8_0 with ``embedding_type="q8_0"`` where its rows are 32-weight
    blocks), the hyperparameters and the tokenizer. Returns the tensors written and the vocab."""
    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    tmap = arch.tensor_map()
    by_name = {p.name: p for p in plans}
    entries = []
    with safe_open(str(root / BASE_FILE), framework="pt") as f:
        packed = {f"{n}.{b}" for n, e in manifest["modules"].items()
                  for b, _ in QLRLinear(e["shape"][1], e["shape"][0], e["spec"], device="meta").named_buffers()}
        items = {k: None for k in f.keys() if k not in packed}  # noqa: SIM118 (safe_open is not iterable)
        items.update({f"{n}.weight": n for n in manifest["modules"]})
        for hf_name in sorted(items, key=_order):
            gname = gguf_name(tmap, hf_name)
            heads = qk_heads(arch, hf_name)
            module = items[hf_name]
            if module is None:  # untouched: as stored (the token embedding in Q8_0 when asked and its rows allow)
                t = f.get_tensor(hf_name)
                if gname == EMBEDDING and embedding_type == "q8_0" and t.ndim == 2 and t.shape[1] % BLOCK == 0:
                    data = q8_0_bytes(t)
                    writer.add_tensor(EMBEDDING, data, raw_dtype=ggml_type("q8_0"))
                    entries.append(TensorEntry(EMBEDDING, hf_name, "q8_0", tuple(t.shape), int(data.nbytes),
                                               "q8_0 (--embedding-type q8_0): rounded here, so llama.cpp's embedding "
                                               "and tied head differ from the export's"))
                    continue
                data, qtype = float_array(t, gname)
                data = permute_rows(data, heads) if data.ndim >= 1 and heads else data
                stored = STORED_TYPES.get(t.dtype, str(t.dtype))
                note = "as stored" if qtype.name.lower() == stored else \
                    f"stored as {stored}, written as f32 (llama.cpp keeps norms and 1-D tensors in F32)"
                entries.append(TensorEntry(gname, hf_name, qtype.name.lower(), tuple(t.shape), int(data.nbytes), note))
                writer.add_tensor(gname, data, raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.BF16 else None)
                continue
            plan = by_name[module]
            layer = _layer(f, module, manifest["modules"][module])
            if plan.fallback is None:
                data = permute_rows(to_gguf_bytes(layer.quantized("q")), heads)  # (rows, bytes), rows moved
                writer.add_tensor(gname, data, raw_dtype=ggml_type(plan.type))
                note = f"Q codes as stored ({plan.type})"
            else:
                np_dtype, _ = FLOAT_TYPES[plan.type]
                data = permute_rows(layer.q_weight().numpy(), heads).astype(np_dtype)
                writer.add_tensor(gname, data)
                note = plan.fallback
            entries.append(TensorEntry(gname, hf_name, plan.type, plan.shape, int(data.nbytes), note))
    _add_metadata(writer, root, name, gguf.GGUFType.MODEL)
    add_hparams(writer, arch, file_type([p.type for p in plans]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = add_tokenizer(writer, tokenizer_dir, int(arch.config["vocab_size"]))
    _write_gguf(path, writer)
    return entries, vocab


# ----- the LoRA adapter ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Factors:
    """One module's LoRA: A (k, in), B (out, k) in the original basis and the scale s (ΔW = s·B·A)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def export_factors(root: Path, manifest: dict[str, Any]) -> dict[str, Factors]:
    """L, R of every module with rank > 0, in the original basis (``QLRLinear.factors``), scale 1."""
    out = {}
    with safe_open(str(root / BASE_FILE), framework="pt") as f:
        for name, entry in manifest["modules"].items():
            if int(entry["spec"].get("rank", 0)) > 0:
                L, R = _layer(f, name, entry).factors()
                out[name] = Factors(A=R, B=L, scale=1.0)
    return out


def adapter_factors(root: Path, adapter: Path) -> dict[str, Factors]:
    """lora_A, lora_B and PEFT's own scaling (lora_alpha, rank_pattern, alpha_pattern, rsLoRA) of every layer of a
    PEFT LoRA adapter folder, read by loading it with PEFT on the export's packed base (``lqlr.load``)."""
    from peft.tuners.lora import LoraLayer

    from lqlr.io.load import load

    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if cfg.get("use_dora"):
        raise ValueError(f"{adapter} is a DoRA adapter (use_dora=true): llama.cpp's LoRA has no magnitude vector")
    if cfg.get("modules_to_save"):
        raise ValueError(f"{adapter} also trains whole modules (modules_to_save={cfg['modules_to_save']}): a llama.cpp "
                         "LoRA holds A, B pairs only")
    model = load(root, peft=True, adapter=adapter, verify=False)  # check_adapter: folder, targets and shapes
    out = {}
    for mname, mod in model.named_modules():
        if not isinstance(mod, LoraLayer) or "default" not in mod.lora_A:
            continue
        name = mname.removeprefix("base_model.model.")
        if getattr(mod, "lora_bias", {}).get("default"):
            raise ValueError(f"{adapter}: {name} has a LoRA bias (lora_bias=true), which llama.cpp's LoRA has not")
        out[name] = Factors(A=mod.lora_A["default"].weight.detach().float().cpu(),
                            B=mod.lora_B["default"].weight.detach().float().cpu(), scale=float(mod.scaling["default"]))
    if not out:
        raise ValueError(f"{adapter} has no LoRA layer on this export's modules")
    return out


def lora_alpha(factors: dict[str, Factors]) -> float:
    """The one ``adapter.lora.alpha`` of the file: the most frequent rank (ties: the smaller), so that
    alpha / rank = 1 for those tensors; every other tensor has the ratio folded into its lora_b."""
    counts = Counter(f.rank for f in factors.values())
    return float(max(sorted(counts), key=lambda r: counts[r]))


def q8_0_bytes(x: torch.Tensor) -> np.ndarray:
    """x (rows, cols), cols a multiple of 32, as ggml Q8_0 blocks: lqlr's Q8_0 fit and round to nearest."""
    return to_gguf_bytes(quantize_rtn(x.to(torch.float32), make_grid("q8_0", 8, BLOCK)))


def _lora_array(x: torch.Tensor, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None, str, str]:
    """(array, raw ggml type or None, type name, note) of a LoRA matrix in ``kind``; q8_0 rows that are not
    32-weight blocks fall back to f16, as convert_lora_to_gguf does."""
    if kind == "q8_0":
        if x.shape[1] % BLOCK == 0:
            return q8_0_bytes(x), ggml_type("q8_0"), "q8_0", ""
        a = x.numpy().astype(np.float16)
        return a, None, "f16", f"rows of {x.shape[1]} are not a multiple of {BLOCK}: f16 instead of q8_0"
    np_dtype, _ = FLOAT_TYPES[kind]
    return x.numpy().astype(np_dtype), None, kind, ""


def write_lora(factors: dict[str, Factors], arch: Arch, path: Path, lora_type: str, card_dir: Path | None,
               name: str | None) -> tuple[list[TensorEntry], float, dict[str, float]]:
    """lora.gguf: ``<base tensor>.lora_a`` = A (k, in) and ``.lora_b`` = fold·B (out, k), B's rows permuted like
    the base's for q/k, fold = s·k/alpha so llama.cpp's alpha/k scale gives s·B·A. Returns the tensors, alpha
    and each module's fold."""
    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    tmap = arch.tensor_map()
    alpha = lora_alpha(factors)
    entries, folds = [], {}
    for module in sorted(factors, key=lambda n: _order(f"{n}.weight")):
        fac = factors[module]
        hf_name = f"{module}.weight"
        gname = gguf_name(tmap, hf_name)
        fold = fac.scale * fac.rank / alpha
        folds[module] = fold
        heads = qk_heads(arch, hf_name)
        B = torch.from_numpy(permute_rows((fac.B * fold).numpy(), heads))  # (out, k)
        for suffix, x in (("lora_a", fac.A), ("lora_b", B)):
            data, raw, tname, note = _lora_array(x.contiguous(), lora_type)
            writer.add_tensor(f"{gname}.{suffix}", data, raw_dtype=raw)
            entries.append(TensorEntry(f"{gname}.{suffix}", f"{module}.lora_{suffix[-1].upper()}", tname,
                                       tuple(x.shape), int(data.nbytes), note))
    _add_metadata(writer, card_dir, name, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_gguf(path, writer)
    return entries, alpha, folds


# ----- Ollama -------------------------------------------------------------------------------------
def modelfile(has_lora: bool, vocab: VocabRecord) -> tuple[str, str | None, str]:
    """(Modelfile text, template name or None, note). ChatML chat templates get Ollama's ChatML TEMPLATE and
    stop tokens; any other chat template is left to Ollama, which reads tokenizer.chat_template from model.gguf."""
    lines = [f"FROM ./{MODEL_FILE}"]
    if has_lora:
        lines.append(f"ADAPTER ./{LORA_FILE}")
    tmpl = vocab.chat_template
    if tmpl is None:
        name, note = None, "no TEMPLATE: the tokenizer has no chat template (a plain completion model)"
    elif "<|im_start|>" in tmpl and "<|im_end|>" in tmpl:
        name, note = "chatml", "TEMPLATE: Ollama's ChatML template, the tokenizer's chat template is ChatML"
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', 'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']
    else:
        name, note = None, ("no TEMPLATE: the tokenizer's chat template is not ChatML; Ollama derives one from "
                            "tokenizer.chat_template in model.gguf")
    return "\n".join([f"# lqlr-export gguf; {note}", *lines]) + "\n", name, note


# ----- the whole export ---------------------------------------------------------------------------
def _summary(plans: list[LinearPlan], model_entries: list[TensorEntry], lora_entries: list[TensorEntry],
             factors: dict[str, Factors]) -> dict[str, Any]:
    """All-in bits over the compressed linears: GGUF bytes of Q plus the bytes of their LoRA tensors."""
    q_bytes = {e.source.removesuffix(".weight"): e.nbytes for e in model_entries}
    lora_bytes: Counter = Counter()
    for e in lora_entries:
        lora_bytes[e.source.rsplit(".lora_", 1)[0]] += e.nbytes
    params = sum(p.shape[0] * p.shape[1] for p in plans)
    q_total = sum(q_bytes[p.name] for p in plans)
    lora_total = sum(lora_bytes[p.name] for p in plans)
    other = sum(e.nbytes for e in model_entries if e.source.removesuffix(".weight") not in {p.name for p in plans})
    return {"compressed_linears": len(plans), "compressed_params": params, "q_bytes": q_total, "lora_bytes": lora_total,
            "bits_per_param": 8 * (q_total + lora_total) / params if params else None,
            "q_bits_per_param": 8 * q_total / params if params else None,
            "untouched_bytes": other, "fallback_linears": sum(p.fallback is not None for p in plans),
            "lora_modules": len(factors),
            "counted": "per compressed linear: its Q tensor in model.gguf plus its lora_a and lora_b in lora.gguf"}


def export_gguf(export: str | os.PathLike, out: str | os.PathLike, adapter: str | os.PathLike | None = None,
                lora_type: str = "f16", fallback_type: str = "f16", tokenizer: str | os.PathLike | None = None,
                verify: bool = True, embedding_type: str = "stored") -> dict[str, Any]:
    """Write model.gguf, lora.gguf (when there are factors), Modelfile and gguf.json for the lqlr export
    ``export`` into ``out``; returns the gguf.json record.

    ``adapter``: a PEFT LoRA adapter folder (e.g. lqlr-finetune's) written instead of the export's own L, R.
    ``lora_type``: f16 (default), f32 or q8_0 for the LoRA tensors. ``fallback_type``: f16 or f32 for the Q of
    linears whose rows are not 32-weight blocks. ``tokenizer``: a folder with tokenizer.json (default: the export).
    ``embedding_type``: ``stored`` (default: the token embedding as the export holds it, the same function as lqlr's
    model) or ``q8_0`` (as llama-quantize writes it: smaller, a further rounding; as stored where its rows are not
    32-weight blocks).
    Everything is checked before any file is written; errors are one-line ValueErrors.
    """
    if lora_type not in LORA_TYPES:
        raise ValueError(f"lora_type={lora_type!r}: choose one of {', '.join(LORA_TYPES)}")
    if fallback_type not in FLOAT_TYPES:
        raise ValueError(f"fallback_type={fallback_type!r}: choose one of {', '.join(FLOAT_TYPES)}")
    if embedding_type not in EMBEDDING_TYPES:
        raise ValueError(f"embedding_type={embedding_type!r}: choose one of {', '.join(EMBEDDING_TYPES)}")
    root, out = Path(export), Path(out)
    manifest = read_manifest(root, verify=verify)
    arch = llama_arch(json.loads((root / "config.json").read_text()))
    plans = plan_linears(manifest, arch, fallback_type)
    tok_dir = Path(tokenizer) if tokenizer is not None else root
    tokenizer_kind(tok_dir)  # refuse an unsupported tokenizer before writing
    adapter_dir = Path(adapter) if adapter is not None else None
    factors = adapter_factors(root, adapter_dir) if adapter_dir else export_factors(root, manifest)
    source = str(manifest.get("source", {}).get("model", "") or "")
    name = Path(source).name if source else None

    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).unlink(missing_ok=True)  # the folder is unfinished until gguf.json is written again
    model_entries, vocab = write_model(root, manifest, arch, plans, out / MODEL_FILE, tok_dir, name,
                                      embedding_type)
    lora_entries, alpha, folds = [], None, {}
    if factors:
        card = adapter_dir if adapter_dir else root / ADAPTER_DIR
        lora_entries, alpha, folds = write_lora(factors, arch, out / LORA_FILE, lora_type, card, name)
    else:
        (out / LORA_FILE).unlink(missing_ok=True)  # a stale adapter of an earlier export
    text, template, note = modelfile(bool(factors), vocab)
    atomic_write(out / MODELFILE, lambda tmp: tmp.write_text(text))
    record = {
        "format": "lqlr-gguf", "format_version": 1, "export": str(root), "source": manifest.get("source"),
        "architecture": arch.name, "adapter": str(adapter_dir) if adapter_dir else (ADAPTER_DIR if factors else None),
        "summary": _summary(plans, model_entries, lora_entries, factors),
        "fallbacks": {p.name: p.fallback for p in plans if p.fallback},
        "model": {"file": MODEL_FILE, "bytes": (out / MODEL_FILE).stat().st_size, "sha256": sha256_file(out / MODEL_FILE),
                  "file_type": file_type([p.type for p in plans]).name, "tokenizer": vocab.to_dict(),
                  "tensors": [asdict(e) for e in model_entries]},
        "lora": None if not factors else {
            "file": LORA_FILE, "bytes": (out / LORA_FILE).stat().st_size, "sha256": sha256_file(out / LORA_FILE),
            "type": lora_type, "alpha": alpha, "fold": folds, "tensors": [asdict(e) for e in lora_entries]},
        "modelfile": {"file": MODELFILE, "template": template, "note": note},
    }
    atomic_write(out / PLAN_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n"))
    return record
