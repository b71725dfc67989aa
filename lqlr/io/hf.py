"""transformers integration: ``AutoModelForCausalLM.from_pretrained(export)`` loads an lqlr export packed.

``import lqlr`` calls :func:`register`, which registers ``quant_method="lqlr"`` with transformers'
public ``register_quantization_config`` / ``register_quantizer``. An export's config.json carries
``quantization_config = {"quant_method": "lqlr", "format_version": 1, "manifest": "manifest.json"}``
(:func:`lqlr.io.export.quantization_config`). transformers then builds the model on the meta
device and hands it to :class:`LqlrHfQuantizer`, which

* checks the manifest (format version, every file's sha256) before any weight is read,
* puts an empty QLRLinear of each module's spec in place of each compressed linear
  (:func:`lqlr.io.load.build_packed`, the same code as ``lqlr.load``), so that transformers assigns
  the packed codes, scales and factors as stored — no dense (out, in) weight is ever allocated,
* checks that every packed tensor arrived (:func:`lqlr.io.load.check_packed`) and sets the kernel.

``save_pretrained`` on such a model writes an lqlr export again (:func:`save_pretrained`), and
``PeftModel.from_pretrained(model, export + "/adapter")`` attaches the stock adapter: a QLRLinear
that a LoRA layer wraps computes Q only, the adapter being its L·R (see :mod:`lqlr.nn.layer`).

Without ``import lqlr``, transformers stops at config.json's ``transformers_weights`` guard
(:data:`lqlr.io.export.NEEDS_LQLR`) with an error that says to run ``import lqlr``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from lqlr.io.card import CARD
from lqlr.io.export import (
    BASE_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    NEEDS_LQLR,
    IntegrityError,
    qlr_modules,
    read_manifest,
    save_compressed,
)
from lqlr.io.load import build_packed, check_packed, own_weights, packed_keys, untouched_dtype
from lqlr.nn.layer import set_kernel
from lqlr.util.files import atomic_write

_MANIFEST_FIELDS = ("format", "format_version", "source", "modules", "untouched_dtype", "summary", "files")


class LqlrConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an lqlr export (config.json): where the per-module specs are.

    It only describes an export that exists; lqlr compresses with :func:`lqlr.compress`, not inside
    ``from_pretrained``.
    """

    def __init__(self, format_version: int = FORMAT_VERSION, manifest: str = MANIFEST, **kwargs: Any) -> None:
        self.quant_method = FORMAT
        self.format_version = format_version
        self.manifest = manifest
        if format_version != FORMAT_VERSION:
            raise ValueError(f"quantization_config format_version={format_version!r}: this lqlr reads format "
                             f"v{FORMAT_VERSION}; use the lqlr version that wrote the export")
        if manifest != MANIFEST:
            raise ValueError(f"quantization_config manifest={manifest!r}: an lqlr export's manifest is {MANIFEST!r}")

    def to_dict(self) -> dict[str, Any]:
        """What config.json stores."""
        return {"quant_method": self.quant_method, "format_version": self.format_version, "manifest": self.manifest}


def _unguard(config) -> None:
    if getattr(config, "transformers_weights", None) == NEEDS_LQLR:
        delattr(config, "transformers_weights")  # lqlr is here: transformers may read model.safetensors


class LqlrHfQuantizer(HfQuantizer):
    """Loads an lqlr export into QLRLinear modules inside transformers' ``from_pretrained``."""

    requires_calibration = True  # pre-quantized only: from_pretrained never compresses a dense model
    quantization_config: LqlrConfig

    def __init__(self, quantization_config: LqlrConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.manifest: dict[str, Any] | None = None
        self.root: Path | None = None
        self.dtype = torch.float32

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            raise ValueError("an lqlr export loads on one device: pass device_map=None or a single device, "
                             f"not {sorted(map(str, set(device_map.values())))}")

    # transformers reads config.transformers_weights after these hooks (update_attn_implementation in
    # recent 5.x, update_tp_plan/update_ep_plan in earlier 5.x): each lifts the guard
    def update_attn_implementation(self, config):
        _unguard(config)
        return config

    def update_tp_plan(self, config):
        _unguard(config)
        return config

    def update_ep_plan(self, config):
        _unguard(config)
        return config

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        self.dtype = dtype if dtype is not None else torch.float32
        return self.dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None, **kwargs: Any):
        if checkpoint_files:
            root = Path(checkpoint_files[0]).parent
            if Path(checkpoint_files[0]).name != BASE_FILE or len(checkpoint_files) > 1:
                raise IntegrityError(f"{root}: transformers would read {[Path(f).name for f in checkpoint_files]}, "
                                     f"an lqlr export stores its weights in {BASE_FILE} only")
        else:
            root = Path(model.config.name_or_path)
        self.root = root
        if not (root / MANIFEST).is_file() and (root / BASE_FILE).is_file():
            raise IntegrityError(f"{root} has {BASE_FILE} but no {MANIFEST}: from_pretrained of a hub id downloads only "
                                 "some files of an lqlr export; download the whole repository "
                                 "(huggingface_hub.snapshot_download(repo_id)) and load that folder")
        self.manifest = read_manifest(root, verify=True)  # format version and every sha256, before any weight
        build_packed(model, self.manifest)
        return model

    def get_new_dtype(self, converter, param, dtype: torch.dtype | None) -> torch.dtype | None:
        # no cast while transformers loads: its tensors stay views of its file mapping, unread;
        # _process_model_after_weight_loading reads each once into the model's own memory, in its dtype
        return None

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        own_weights(model, self.root / BASE_FILE, untouched_dtype(packed_keys(model, self.manifest), self.dtype))
        check_packed(model, self.manifest, self.root / BASE_FILE)
        for layer in qlr_modules(model).values():
            layer.compute_dtype = self.dtype
        set_kernel(model, "auto")  # as lqlr.load; lqlr.nn.layer.set_kernel(model, kind) picks another
        # an instance attribute, so that model.save_pretrained writes an lqlr export (manifest, checksums,
        # adapter/); transformers' own save would write a folder without them
        model.save_pretrained = save_pretrained.__get__(model)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # with a PEFT adapter on the packed base (the base itself stays frozen)

    def _dequantize(self, model, dtype: torch.dtype | None = None):
        """``model.dequantize()``: every QLRLinear becomes a dense linear holding its weight (Q + L R)."""
        from transformers.pytorch_utils import Conv1D

        from lqlr.core.arch import set_module

        for name, layer in qlr_modules(model).items():
            W = layer.effective_weight().to(dtype or layer.compute_dtype)  # (out, in)
            if layer.spec.get("layout") == "conv1d":
                dense = Conv1D(layer.out_features, layer.in_features)
                dense.weight = nn.Parameter(W.T.contiguous(), requires_grad=False)
            else:
                dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  device=W.device, dtype=W.dtype)
                dense.weight = nn.Parameter(W, requires_grad=False)
            if layer.bias is not None:
                dense.bias = nn.Parameter(layer.bias.detach().to(W.dtype))
            set_module(model, name, dense)
        if "save_pretrained" in model.__dict__:
            del model.save_pretrained  # a dense model again: transformers' own save
        return model


def save_pretrained(model, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """``save_pretrained`` of a model that ``from_pretrained`` loaded from an lqlr export: write an lqlr
    export (``lqlr.save_compressed``) with the same manifest entries, packed tensors, untouched-tensor
    dtype and adapter, so that it loads again to the same packed tensors and logits.

    transformers' keyword arguments (``safe_serialization``, ``max_shard_size``, ...) are accepted and
    ignored; ``state_dict`` and ``push_to_hub`` are refused.
    """
    if kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained(push_to_hub=True) is not supported for an lqlr export: save it to a "
                         "folder, then upload the folder with huggingface_hub")
    if kwargs.get("state_dict") is not None:
        raise ValueError("save_pretrained(state_dict=...) cannot write an lqlr export: the packed tensors come "
                         "from the model's QLRLinear modules; call it without state_dict")
    manifest = model.hf_quantizer.manifest
    merged = [n for n, m in qlr_modules(model).items() if m.merged]
    if merged:
        raise ValueError(f"{merged[0]} holds a merged dense weight (PEFT merge), which an lqlr export cannot store: "
                         "requantize the adapter (lqlr.finetune.requantize) or save model.dequantize() instead")
    extra = {k: v for k, v in manifest.items() if k not in _MANIFEST_FIELDS}
    out = save_compressed(model, save_directory, source=manifest["source"], reports=manifest["modules"],
                          untouched_dtype=manifest.get("untouched_dtype", "float16"), extra=extra)
    card = model.hf_quantizer.root / CARD
    if card.is_file() and card.resolve() != (out / CARD).resolve():  # keep the loaded export's card (and its numbers)
        atomic_write(out / CARD, lambda tmp: tmp.write_bytes(card.read_bytes()))
    return out


def register() -> None:
    """Register ``quant_method="lqlr"`` (:class:`LqlrConfig`, :class:`LqlrHfQuantizer`) with transformers.

    Called by ``import lqlr``; calling it again does nothing.
    """
    for registrar, cls in ((register_quantization_config, LqlrConfig), (register_quantizer, LqlrHfQuantizer)):
        try:
            registrar(FORMAT)(cls)
        except ValueError:  # already registered (lqlr imported before, or reloaded)
            pass
