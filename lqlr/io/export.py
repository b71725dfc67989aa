"""Write a compressed model to one directory (docs/design.md §5), and load it back.

    manifest.json           format version, source, per-module spec and bits, sha256 of every file
    config.json             the model's transformers config, with quantization_config (quant_method "lqlr")
    model.safetensors       packed Q codes + scales, packed L/R, every untouched tensor as-is
    tokenizer files         when a tokenizer was given
    README.md               the model card (lqlr.io.card); not in the checksums, so it may be edited
    adapter/                stock PEFT LoRA adapter: lora_B = L, lora_A = R, alpha = r (scale 1)
    dense/                  (optional) plain HF model folder with Q dequantized

Only safetensors and JSON are read back; nothing is unpickled, and ``trust_remote_code`` is never
turned on here. The manifest is written last, so a directory without one is an unfinished export.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lqlr.io.card import CARD, write_model_card
from lqlr.nn.layer import QLRLinear
from lqlr.util.files import atomic_write, sha256_file

FORMAT = "lqlr"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
UNSTORED_REPORT_FIELDS = ("name", "time_s", "pack_s")  # timings differ run to run: the manifest stays byte-stable
BASE_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"
DENSE_DIR = "dense"
# files of the export that the manifest does not checksum: the model card is documentation that users
# (and the hub's editor) change; editing it must not make the model unloadable
UNCHECKED = frozenset({CARD})


# config.json's `transformers_weights` names the file transformers reads the weights from. An export sets it
# to this sentence, which is no file name: transformers without lqlr then refuses the folder with an error that
# says what to do, where it would otherwise only warn about the unknown quant_method and fill every compressed
# linear with random weights. lqlr's quantizer (lqlr.io.hf) removes it before transformers looks for weights.
NEEDS_LQLR = "lqlr export with packed weights: run `import lqlr` before from_pretrained (pip install lqlr)"


class IntegrityError(ValueError):
    """A file of a compressed directory is missing, altered or not what the manifest says."""


def quantization_config() -> dict[str, Any]:
    """The ``quantization_config`` of an export's config.json: how transformers finds lqlr's loader
    (``quant_method``), the format version, and where the per-module specs are (the manifest)."""
    return {"quant_method": FORMAT, "format_version": FORMAT_VERSION, "manifest": MANIFEST}


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata={"format": "pt"}))


def check_output_dir(out: str | os.PathLike, source: dict[str, Any]) -> None:
    """Refuse an output directory that already holds the export of a different run."""
    manifest = Path(out) / MANIFEST
    if not manifest.is_file():
        return
    try:
        previous = json.loads(manifest.read_text()).get("source")
    except (OSError, json.JSONDecodeError):
        previous = None
    if json.loads(json.dumps(previous, default=str)) != json.loads(json.dumps(source, default=str)):
        raise FileExistsError(f"{out} already holds a different lqlr export: choose another output_dir or delete it")


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied tensors (e.g. lm_head tied to the embeddings)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.numel())
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def qlr_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The QLRLinear modules of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QLRLinear)}


def _clean_config(model: nn.Module):
    config = model.config.__class__.from_dict(model.config.to_dict())
    for key in ("quantization_config", "transformers_weights"):  # e.g. a GGUF source, or an export loaded back
        if hasattr(config, key):
            delattr(config, key)
    return config


def _save_base_config(model: nn.Module, out: Path) -> None:
    """config.json of the packed base: the model's config plus quantization_config and the guard
    against loading without lqlr (``NEEDS_LQLR``), which transformers' own save would drop."""
    _clean_config(model).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config()
    config["transformers_weights"] = NEEDS_LQLR
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))


def save_adapter(qlr: dict[str, nn.Module], out: Path, base_name: str) -> None:
    """Stock PEFT LoRA adapter with lora_B = L, lora_A = R and α = r, so the LoRA scale is exactly 1."""
    ranked = {n: m for n, m in qlr.items() if m.rank > 0}
    if not ranked:
        raise ValueError("no compressed module has L, R (rank 0 everywhere): a Q-only export has no adapter to write")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in ranked.items():
        L, R = m.factors()
        tensors[f"base_model.model.{name}.lora_A.weight"] = R.contiguous()  # (k, in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = L.contiguous()  # (out, k)
    r = Counter(m.rank for m in ranked.values()).most_common(1)[0][0]
    pattern = {name: m.rank for name, m in ranked.items() if m.rank != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranked), "lora_dropout": 0.0, "use_rslora": False, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }
    save_tensors(tensors, out / "adapter_model.safetensors")
    _write_json(out / "adapter_config.json", config)


def save_dense(model: nn.Module, qlr: dict[str, nn.Module], out: Path, untouched_dtype: torch.dtype = torch.float32) -> None:
    """A plain float32 transformers folder with each compressed weight replaced by its dequantized Q;
    untouched tensors carry the same (rounded) values as the packed base."""
    out.mkdir(parents=True, exist_ok=True)
    state = _unique_state(model)
    dense = {}
    for k, v in state.items():
        module_name = k.rsplit(".", 1)[0]
        if module_name not in qlr:
            dense[k] = v.to(untouched_dtype).to(v.dtype) if v.is_floating_point() else v
    for name, m in qlr.items():
        Q = m.q_weight()
        dense[f"{name}.weight"] = Q.T.contiguous() if m.spec.get("layout") == "conv1d" else Q
        if m.bias is not None:
            dense[f"{name}.bias"] = m.bias.detach()
    save_tensors(dense, out / BASE_FILE)
    _clean_config(model).save_pretrained(out)


UNTOUCHED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, source: dict[str, Any],
                    reports: list | dict[str, dict[str, Any]] | None = None, tokenizer=None, dense_base: bool = False,
                    untouched_dtype: str = "float16", extra: dict[str, Any] | None = None) -> Path:
    """Write the export directory; returns its path. The manifest (with checksums) is written last.

    ``reports``: the ``ModuleReport`` of each compressed matrix, or the manifest entries of an export
    being written again (by name). ``untouched_dtype``: storage of the tensors that are not compressed
    (embeddings, norms, LM head), 16-bit by default (docs/design.md §3); ``"float32"`` keeps them
    bit-exact. ``extra``: more top-level manifest fields (e.g. ``finetune``).
    """
    if untouched_dtype not in UNTOUCHED_DTYPES:
        raise ValueError(f"untouched_dtype={untouched_dtype!r}: choose one of {sorted(UNTOUCHED_DTYPES)}")
    out = Path(out_dir)
    qlr = qlr_modules(model)
    if not qlr:
        raise ValueError("the model has no QLRLinear module: compress it before saving")
    check_output_dir(out, source)
    out.mkdir(parents=True, exist_ok=True)
    packed_keys = {f"{n}.{b}" for n, m in qlr.items() for b, _ in m.named_buffers(recurse=False)}
    dtype = UNTOUCHED_DTYPES[untouched_dtype]
    base = {k: v.to(dtype) if k not in packed_keys and v.is_floating_point() else v for k, v in _unique_state(model).items()}
    save_tensors(base, out / BASE_FILE)
    _save_base_config(model, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if any(m.rank > 0 for m in qlr.values()):  # a Q-only export has no L, R: no adapter/ (see lqlr.load lora_rank)
        save_adapter(qlr, out / ADAPTER_DIR, base_name=str(out / DENSE_DIR) if dense_base else source.get("model", ""))
    if dense_base:
        save_dense(model, qlr, out / DENSE_DIR, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(out / DENSE_DIR)
    report_by_name = dict(reports) if isinstance(reports, dict) else {r.name: r.to_dict() for r in (reports or [])}
    modules = {}
    for name, m in qlr.items():
        entry = {"spec": m.spec, "shape": [m.out_features, m.in_features], "bias": m.bias is not None}
        entry.update({k: v for k, v in report_by_name.get(name, {}).items() if k not in UNSTORED_REPORT_FIELDS})
        modules[name] = entry
    params = sum(m.out_features * m.in_features for m in qlr.values())
    bits = sum(modules[n].get("bits_per_param", 0) * m.out_features * m.in_features for n, m in qlr.items())
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "source": source, "modules": modules,
        "untouched_dtype": untouched_dtype,
        "summary": {"compressed_params": params, "bits_per_param": bits / params if params else None,
                    "n_modules": len(qlr)},
        **(extra or {}),
    }
    write_model_card(out, manifest)  # "not measured": lqlr-compress rewrites it once its evaluation ran
    write_manifest(out, manifest)
    return out


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Fill ``manifest["files"]`` with the sha256 of every file under ``out`` (but the manifest itself, the
    ``UNCHECKED`` model card and temp files) and write it, atomically, last."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
                   and str(p.relative_to(out)) not in UNCHECKED)
    manifest["files"] = {str(p.relative_to(out)): sha256_file(p) for p in files}
    _write_json(out / MANIFEST, manifest)


def read_manifest(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Read and check manifest.json: format version, files inside the folder, sha256 of each.

    A listed file may be a symbolic link to a file elsewhere (the hub cache's snapshot folders link to
    its blobs); what must stay inside the folder is the name the manifest lists. README.md is never
    checked (``UNCHECKED``)."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise IntegrityError(f"{mpath} not found: not an lqlr export, or an unfinished one (the manifest is written last)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{mpath} is not valid JSON ({err.msg}); re-export the model") from err
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise IntegrityError(f"{mpath}: format {manifest.get('format')!r} v{manifest.get('format_version')!r} "
                             f"is not {FORMAT} v{FORMAT_VERSION}; use the lqlr version that wrote it")
    for rel, digest in manifest.get("files", {}).items():
        if rel in UNCHECKED:
            continue
        parts = Path(rel).parts
        if Path(rel).is_absolute() or not parts or ".." in parts:
            raise IntegrityError(f"manifest lists {rel!r}, which points outside {root}; refusing to read it")
        f = root / rel
        if not f.is_file():
            raise IntegrityError(f"{f} is missing: the export is incomplete; re-export or restore the file")
        if verify and sha256_file(f) != digest:
            raise IntegrityError(f"{f} does not match its sha256 in the manifest: the file is corrupt or was changed")
    return manifest
