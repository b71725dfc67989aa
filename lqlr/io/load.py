"""Load an export directory back: a transformers model with QLRLinear modules, or a PeftModel to train.

:func:`build_packed` (empty QLRLinear modules in place of the compressed linears) and
:func:`check_packed` (every packed tensor arrived) are the one way an export becomes a model:
``lqlr.load`` and transformers' ``from_pretrained`` (:mod:`lqlr.io.hf`) both use them.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lqlr.core.arch import set_module
from lqlr.io.export import ADAPTER_DIR, BASE_FILE, IntegrityError, read_manifest
from lqlr.io.weights import read_header, read_tensors
from lqlr.nn.kernels import check_kernel
from lqlr.nn.layer import QLRLinear, set_kernel
from lqlr.nn.lora import zero_init_lora
from lqlr.util.meta import parameters_on_meta


def build_packed(model: torch.nn.Module, manifest: dict[str, Any]) -> dict[str, QLRLinear]:
    """Put an empty QLRLinear of the manifest's spec in place of each compressed linear of ``model``.

    Built under a meta-device context (transformers' loading) the buffers are meta tensors too, so
    nothing of the size of a dense weight is allocated; the stored tensors are assigned afterwards.
    Each layer is attached to its slot (:meth:`QLRLinear.attach`). Returns the layers by name.
    """
    built = {}
    for name, entry in manifest["modules"].items():
        out_f, in_f = entry["shape"]
        built[name] = place(model, name, QLRLinear(in_f, out_f, entry["spec"], bias=entry["bias"]))
    return built


def place(model: torch.nn.Module, name: str, layer: QLRLinear) -> QLRLinear:
    """Put ``layer`` at ``name`` in ``model`` and attach it to that slot (:meth:`QLRLinear.attach`)."""
    set_module(model, name, layer)
    parent, _, child = name.rpartition(".")
    layer.attach(model.get_submodule(parent) if parent else model, child)
    return layer


def packed_keys(model: torch.nn.Module, manifest: dict[str, Any]) -> set[str]:
    """State-dict keys of the packed buffers (codes, fp16 scales and factors): stored as they are."""
    return {f"{n}.{b}" for n in manifest["modules"] for b, _ in model.get_submodule(n).named_buffers(recurse=False)}


def check_packed(model: torch.nn.Module, manifest: dict[str, Any], source: str | os.PathLike) -> None:
    """One-line IntegrityError unless every compressed module is a QLRLinear whose packed tensors
    were all loaded from ``source`` with the shapes and dtypes of its spec."""
    for name, entry in manifest["modules"].items():
        layer = model.get_submodule(name)
        if not isinstance(layer, QLRLinear):
            raise IntegrityError(f"{source}: {name} was not built as a QLRLinear; load the export with lqlr.load")
        out_f, in_f = entry["shape"]
        want = dict(QLRLinear(in_f, out_f, entry["spec"], bias=entry["bias"], device="meta").named_buffers(recurse=False))
        for key, buf in layer.named_buffers(recurse=False):
            if buf.is_meta or buf.shape != want[key].shape or buf.dtype != want[key].dtype:
                raise IntegrityError(f"{source}: {name}.{key} is missing or is not {want[key].dtype} "
                                     f"{tuple(want[key].shape)}: the file does not fit the manifest; re-export the model")


def untouched_dtype(packed: set[str], dtype: torch.dtype) -> Callable[[str, torch.dtype], torch.dtype]:
    """The dtype rule of an export's tensors: packed ones (codes, scales, factors) as stored, the
    untouched floating ones (embeddings, norms; stored in 16 bits) in ``dtype``."""
    return lambda key, stored: dtype if key not in packed and stored.is_floating_point else stored


def own_weights(model: torch.nn.Module, path: str | os.PathLike, dtype: Callable[[str, torch.dtype], torch.dtype]) -> None:
    """Replace every parameter and buffer of ``model`` that ``path`` (a safetensors file) stores by a
    fresh read of it in ``dtype(key, stored)`` (:func:`lqlr.io.weights.read_tensors`), tied tensors
    staying tied; one already on an accelerator is converted there instead.

    transformers' ``from_pretrained`` leaves the tensors as views of its memory mapping of the file,
    each page read staying resident on top of any converted copy. The views are dropped first (so the
    mapping goes), then each tensor is read once into memory the model owns: the peak is the model's
    tensor bytes plus one staging chunk.
    """
    stored, _ = read_header(path)
    places: dict[int, list[tuple[dict, str]]] = {}  # id(tensor) -> every (store, key) holding it (tied weights)
    first: dict[int, tuple[str, torch.Tensor, bool]] = {}  # id(tensor) -> (its first key, the tensor, is a parameter)
    for prefix, module in model.named_modules():
        for store, is_param in ((module._parameters, True), (module._buffers, False)):
            for key, tensor in store.items():
                full = f"{prefix}.{key}" if prefix else key
                if tensor is None or (id(tensor) not in first and full not in stored):
                    continue
                first.setdefault(id(tensor), (full, tensor, is_param))
                places.setdefault(id(tensor), []).append((store, key))
    fresh: dict[int, torch.Tensor] = {}
    cpu: dict[str, tuple[int, bool, bool]] = {}  # first key -> (id, is a parameter, requires_grad)
    for ident, (full, tensor, is_param) in first.items():
        if tensor.device.type == "cpu":
            cpu[full] = (ident, is_param, tensor.requires_grad)
        else:  # on an accelerator (device_map): only the dtype changes, there
            new = tensor.detach().to(dtype(full, tensor.dtype))
            fresh[ident] = torch.nn.Parameter(new, requires_grad=tensor.requires_grad) if is_param else new
    for ident, _, _ in cpu.values():  # let go of the mapped views before reading: no page of the mapping stays resident
        for store, key in places[ident]:
            store[key] = None
    tensor = None  # the loop's last view: one alive keeps the whole mapping
    first.clear()
    for full, tensor in read_tensors(path, dtype=dtype, names=set(cpu)).items():
        ident, is_param, requires_grad = cpu[full]
        fresh[ident] = torch.nn.Parameter(tensor, requires_grad=requires_grad) if is_param else tensor
    for ident, new in fresh.items():
        for store, key in places[ident]:
            store[key] = new


def load(path: str | os.PathLike, peft: bool = False, verify: bool = True, device: str | torch.device = "cpu",
         adapter: str | os.PathLike | None = None, kernel: str = "auto", lora_rank: int | None = None):
    """Load an export as a transformers model whose compressed linears are QLRLinear modules.

    ``peft=True`` returns a ``PeftModel`` instead: Q-only QLRLinear bases (kept packed and frozen)
    with the trainable LoRA adapter L, R from ``adapter/`` (or from ``adapter``, e.g. a fine-tuned
    one). A Q-only export (rank 0 everywhere, so no adapter/) needs ``lora_rank``: a zero-initialised
    LoRA of that rank on every compressed linear, QLoRA style (B = 0, so the model starts exactly at
    Q). ``lora_rank`` with an export that has L, R replaces them the same way. ``verify`` checks every file's sha256. ``kernel`` picks how the compressed linears
    compute (:mod:`lqlr.kernels`): ``"auto"`` (the compiled packed kernel where it is available,
    else ``"reference"``), ``"packed"``, ``"reference"``, or ``"dense-fp32"``/``"dense-fp16"``/
    ``"dense-bf16"`` (dequantize once, trading memory for speed).
    """
    from transformers import AutoConfig, AutoModelForCausalLM


    check_kernel(kernel)

    root = Path(path)
    manifest = read_manifest(root, verify=verify)
    config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    with parameters_on_meta():  # no dense weights are ever allocated: memory ≈ the packed file
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    with torch.device("meta"):  # the packed buffers too: assigned from the file below
        build_packed(model, manifest)
    packed = packed_keys(model, manifest)
    # read into owned memory (no file mapping stays resident); the untouched tensors may be stored in
    # 16 bits: they compute in float32 like the source model, converted a chunk at a time
    state = read_tensors(root / BASE_FILE, dtype=untouched_dtype(packed, torch.float32))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if any(p.device.type == "meta" for n, p in model.named_parameters() if n == k)]
    if missing or unexpected:
        raise IntegrityError(f"{root / BASE_FILE} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    check_packed(model, manifest, root / BASE_FILE)
    model.to(device).eval()
    if not peft:
        set_kernel(model, kernel)
        return model
    from peft import PeftModel

    if lora_rank is not None and (not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"lora_rank={lora_rank!r}: the rank of the zero-initialised LoRA must be an integer >= 1")
    has_factors = any(entry["spec"].get("rank", 0) > 0 for entry in manifest["modules"].values())
    if adapter is None and lora_rank is None and not has_factors:
        raise ValueError(f"{root} is a Q-only export (rank 0 everywhere, no L, R to train): pass lora_rank=N for a "
                         "zero-initialised LoRA of rank N on the packed base (QLoRA style), or adapter=<a PEFT adapter folder>")
    for name in manifest["modules"]:
        m = model.get_submodule(name)
        if m.rank > 0:
            place(model, name, m.without_factors())
    if adapter is None and lora_rank is not None:
        peft_model = zero_init_lora(model, lora_rank, sorted(manifest["modules"]))
        set_kernel(peft_model, kernel)
        return peft_model
    adapter = Path(adapter) if adapter is not None else root / ADAPTER_DIR
    check_adapter(adapter, manifest)
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
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
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
