"""Write a compressed model to one directory (DESIGN §5), and load it back.

    manifest.json           format version, source, per-module spec and bits, sha256 of every file
    config.json             the model's transformers config
    model.safetensors       packed Q codes + scales, packed L/R, every untouched tensor as-is
    tokenizer files         when a tokenizer was given
    adapter/                stock PEFT LoRA adapter: lora_B = L, lora_A = R, alpha = r (scale 1)
    dense/                  (optional) plain HF model folder with Q dequantized

Only safetensors and JSON are read back; nothing is unpickled, and ``trust_remote_code`` is never
turned on here. The manifest is written last, so a directory without one is an unfinished export.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .arch import set_module
from .lazy import parameters_on_meta

FORMAT = "lqlr"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BASE_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"
DENSE_DIR = "dense"


class IntegrityError(ValueError):
    """A file of a compressed directory is missing, altered or not what the manifest says."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ExportWriteError(OSError):
    """Writing the export failed (e.g. the disk is full); files written before are left intact."""


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then fsync and rename over ``path``; on failure the temp file is removed, the
    previous ``path`` (if any) is untouched, and one ExportWriteError names the file and the fix."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ExportWriteError(err.errno, f"writing {path} failed ({reason}): free space or choose another "
                                          "output_dir and rerun; files written before are intact") from err


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
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


def _qlr_modules(model: nn.Module) -> dict[str, nn.Module]:
    from .layer import QLRLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QLRLinear)}


def _clean_config(model: nn.Module):
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # e.g. a GGUF source: the export is plain float tensors
    return config


def save_adapter(qlr: dict[str, nn.Module], out: Path, base_name: str) -> None:
    """Stock PEFT LoRA adapter with lora_B = L, lora_A = R and α = r, so the LoRA scale is exactly 1."""
    ranked = {n: m for n, m in qlr.items() if m.rank > 0}
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in ranked.items():
        L, R = m.factors()
        tensors[f"base_model.model.{name}.lora_A.weight"] = R.contiguous()  # (k, in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = L.contiguous()  # (out, k)
    ranks = Counter(m.rank for m in ranked.values())
    r = ranks.most_common(1)[0][0] if ranks else 8
    pattern = {name: m.rank for name, m in ranked.items() if m.rank != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranked), "lora_dropout": 0.0, "use_rslora": False, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }
    _save_tensors(tensors, out / "adapter_model.safetensors")
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
    _save_tensors(dense, out / BASE_FILE)
    _clean_config(model).save_pretrained(out)


UNTOUCHED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, source: dict[str, Any], reports: list | None = None,
                    tokenizer=None, dense_base: bool = False, untouched_dtype: str = "float16") -> Path:
    """Write the export directory; returns its path. The manifest (with checksums) is written last.

    ``untouched_dtype``: storage of the tensors that are not compressed (embeddings, norms, LM head),
    16-bit by default (DESIGN §3); ``"float32"`` keeps them bit-exact.
    """
    if untouched_dtype not in UNTOUCHED_DTYPES:
        raise ValueError(f"untouched_dtype={untouched_dtype!r}: choose one of {sorted(UNTOUCHED_DTYPES)}")
    out = Path(out_dir)
    qlr = _qlr_modules(model)
    if not qlr:
        raise ValueError("the model has no QLRLinear module: compress it before saving")
    check_output_dir(out, source)
    out.mkdir(parents=True, exist_ok=True)
    packed_keys = {f"{n}.{b}" for n, m in qlr.items() for b, _ in m.named_buffers(recurse=False)}
    dtype = UNTOUCHED_DTYPES[untouched_dtype]
    base = {k: v.to(dtype) if k not in packed_keys and v.is_floating_point() else v for k, v in _unique_state(model).items()}
    _save_tensors(base, out / BASE_FILE)
    _clean_config(model).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_adapter(qlr, out / ADAPTER_DIR, base_name=str(out / DENSE_DIR) if dense_base else source.get("model", ""))
    if dense_base:
        save_dense(model, qlr, out / DENSE_DIR, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(out / DENSE_DIR)
    report_by_name = {r.name: r.to_dict() for r in (reports or [])}
    modules = {}
    for name, m in qlr.items():
        entry = {"spec": m.spec, "shape": [m.out_features, m.in_features], "bias": m.bias is not None}
        entry.update({k: v for k, v in report_by_name.get(name, {}).items() if k not in ("name", "time_s")})
        modules[name] = entry
    params = sum(m.out_features * m.in_features for m in qlr.values())
    bits = sum(modules[n].get("bits_per_param", 0) * m.out_features * m.in_features for n, m in qlr.items())
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "source": source, "modules": modules,
        "untouched_dtype": untouched_dtype,
        "summary": {"compressed_params": params, "bits_per_param": bits / params if params else None,
                    "n_modules": len(qlr)},
    }
    write_manifest(out, manifest)
    return out


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Fill ``manifest["files"]`` with the sha256 of every file under ``out`` and write it, atomically, last."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))
    manifest["files"] = {str(p.relative_to(out)): sha256_file(p) for p in files}
    _write_json(out / MANIFEST, manifest)


def read_manifest(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Read and check manifest.json: format version, files inside the folder, sha256 of each."""
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
    resolved_root = root.resolve()
    for rel, digest in manifest.get("files", {}).items():
        f = (root / rel).resolve()
        if resolved_root not in f.parents:
            raise IntegrityError(f"manifest lists {rel!r}, which points outside {root}; refusing to read it")
        if not f.is_file():
            raise IntegrityError(f"{f} is missing: the export is incomplete; re-export or restore the file")
        if verify and sha256_file(f) != digest:
            raise IntegrityError(f"{f} does not match its sha256 in the manifest: the file is corrupt or was changed")
    return manifest


def load(path: str | os.PathLike, peft: bool = False, verify: bool = True, device: str | torch.device = "cpu",
         adapter: str | os.PathLike | None = None, kernel: str = "auto"):
    """Load an export as a transformers model whose compressed linears are QLRLinear modules.

    ``peft=True`` returns a ``PeftModel`` instead: Q-only QLRLinear bases (kept packed and frozen)
    with the trainable LoRA adapter L, R from ``adapter/`` (or from ``adapter``, e.g. a fine-tuned
    one). ``verify`` checks every file's sha256. ``kernel`` picks how the compressed linears
    compute (:mod:`lqlr.kernels`): ``"auto"`` (the compiled packed kernel where it is available,
    else ``"reference"``), ``"packed"``, ``"reference"``, or ``"dense-fp32"``/``"dense-fp16"``/
    ``"dense-bf16"`` (dequantize once, trading memory for speed).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .kernels import check_kernel, set_kernel
    from .layer import QLRLinear

    check_kernel(kernel)

    root = Path(path)
    manifest = read_manifest(root, verify=verify)
    config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    with parameters_on_meta():  # no dense weights are ever allocated: memory ≈ the packed file
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    for name, entry in manifest["modules"].items():
        out_f, in_f = entry["shape"]
        set_module(model, name, QLRLinear(in_f, out_f, entry["spec"], bias=entry["bias"]))
    packed = {f"{n}.{b}" for n in manifest["modules"] for b, _ in model.get_submodule(n).named_buffers(recurse=False)}
    try:
        state = load_file(str(root / BASE_FILE))
    except Exception as err:  # truncated or not a safetensors file (only reachable with verify=False)
        raise IntegrityError(f"cannot read {root / BASE_FILE} ({type(err).__name__}): the file is truncated or corrupt; "
                             "re-export or restore it") from err
    # untouched tensors may be stored in 16 bits: compute in float32 like the source model
    state = {k: v.float() if k not in packed and v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if any(p.device.type == "meta" for n, p in model.named_parameters() if n == k)]
    if missing or unexpected:
        raise IntegrityError(f"{root / BASE_FILE} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.to(device).eval()
    if not peft:
        set_kernel(model, kernel)
        return model
    from peft import PeftModel

    adapter = Path(adapter) if adapter is not None else root / ADAPTER_DIR
    check_adapter(adapter, manifest)
    for name in manifest["modules"]:
        m = model.get_submodule(name)
        if m.rank > 0:
            set_module(model, name, m.without_factors())
    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    set_kernel(peft_model, kernel)
    return peft_model


def check_adapter(adapter: Path, manifest: dict[str, Any]) -> None:
    """One-line errors for an adapter that is missing, unsafe, or whose shapes do not fit the base."""
    weights = adapter / "adapter_model.safetensors"
    if not (adapter / "adapter_config.json").is_file() or not weights.is_file():
        raise IntegrityError(f"{adapter} is not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for key, shape in shapes.items():
        name, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
        if name not in manifest["modules"]:
            raise IntegrityError(f"{weights}: {key} targets {name!r}, which is not a compressed module of this model")
        out_f, in_f = manifest["modules"][name]["shape"]
        ok = (shape[1] == in_f) if rest.startswith("A") else (shape[0] == out_f)
        if len(shape) != 2 or not ok:
            want = f"(r, {in_f})" if rest.startswith("A") else f"({out_f}, r)"
            raise IntegrityError(f"{weights}: {key} has shape {shape}, the base layer needs {want}: "
                                 "the adapter was trained for a different model")
