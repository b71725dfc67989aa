"""QLRLinear: a linear layer stored as packed Q codes plus packed (or fp16) L and R.

forward(x) = x Qᵀ + (x Rᵀ) Lᵀ + b in the original basis. With incoherence, the stored Q', L', R'
live in the rotated basis (W' = U W Vᵀ), so forward rotates the input once (x Vᵀ) and the
output once (y U). The dense weight is built only when asked (``dequantize()``, or a use of
``weight`` beyond its shape, device and dtype) and transiently inside the reference ``forward``;
the packed kernel (lqlr.kernels) never builds it.

It subclasses ``nn.Linear`` so that stock PEFT wraps it as a LoRA base layer. ``weight`` is a
:class:`DenseWeight`: ``.device``/``.dtype``/``.shape`` are free (PEFT reads them), anything else
materialises the dense weight once, and writing ``weight.data`` (PEFT's merge) keeps that dense
weight on the layer. A layer that a PEFT LoRA layer has replaced in its parent (see
:meth:`QLRLinear.attach`) computes Q only: the adapter is its low-rank part, as in
``lqlr.load(peft=True)``.

How forward computes is the layer's ``kernel`` (see :mod:`lqlr.kernels`): ``"reference"`` (the
default here, pure torch, dequantizes on each call), ``"packed"`` (compiled kernel on the packed
codes) or ``"dense-*"`` (weight dequantized once); ``lqlr.load`` sets it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lqlr.core.gguf_grids import GGUF_GRIDS
from lqlr.core.grids import QuantizedTensor, make_grid, n_groups
from lqlr.core.incoherence import Incoherence, Rotation
from lqlr.core.packing import packed_nbytes
from lqlr.nn.kernels import check_kernel, make_fast, resolve

FP16 = "fp16"


def _grid(spec: dict):
    return make_grid(spec["kind"], spec["bits"], spec["group_size"], clip_search=False, state_bits=spec.get("state_bits"))


def _buffer_shapes(prefix: str, spec: dict, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the stored tensors of one (rows, cols) matrix."""
    if spec["kind"] == FP16:
        return {f"{prefix}_weight": ((rows, cols), torch.float16)}
    per_group = _grid(spec).params_per_group  # k-quants: d and the sub-scales; E8P with a residual: s₁, s₂
    params = n_groups(cols, spec["group_size"]) * per_group
    out = {f"{prefix}_codes": ((packed_nbytes(rows * cols, _grid(spec).code_bits),), torch.uint8),
           f"{prefix}_scale": ((rows, params), torch.float16)}
    if spec["kind"] == "uniform":
        out[f"{prefix}_zero"] = ((packed_nbytes(rows * n_groups(cols, spec["group_size"]), spec["bits"]),), torch.uint8)
    elif _grid(spec).float_zero:  # GGUF Q4_1/Q5_1: the block offsets m; Q4_K/Q5_K: dmin and the min codes; fp16
        out[f"{prefix}_zero"] = ((rows, params), torch.float16)
    return out


def _materialize(obj):
    if isinstance(obj, DenseWeight):
        return obj.materialize()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    return obj


class DenseWeight:
    """``QLRLinear.weight``: a stand-in for the dense (out, in) weight that does not build it.

    ``shape``, ``device``, ``dtype``, ``ndim``, ``size()``, ``dim()`` and ``numel()`` come from the
    packed buffers. Any other use — a tensor attribute or method (``.T``, ``.detach()``, ``.to()``),
    an operator, a torch function (``F.linear(x, w)``, ``torch.allclose(w, ...)``) or ``.data`` —
    materialises it (:meth:`materialize`, a fresh tensor each time, not kept). Assigning ``.data``
    (what PEFT's merge does) stores that dense weight on the layer, which forward then uses.
    """

    _is_hf_initialized = True  # transformers' weight init skips it: the values are the packed buffers'
    requires_grad = False
    is_leaf = True
    grad = None

    def __init__(self, layer: QLRLinear) -> None:
        object.__setattr__(self, "_layer", layer)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._layer.out_features, self._layer.in_features))

    @property
    def device(self) -> torch.device:
        return self._layer.q_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self._layer.compute_dtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def is_meta(self) -> bool:
        return self.device.type == "meta"

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape.numel()

    def materialize(self) -> torch.Tensor:
        """The dense (out, in) weight the layer computes with now, in :attr:`dtype` (built now)."""
        return self._layer.effective_weight().to(self.dtype)

    @property
    def data(self) -> torch.Tensor:
        return self.materialize()

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        self._layer.set_dense_weight(value)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_materialize(args), **_materialize(kwargs or {}))

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_layer":
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __setattr__(self, name: str, value) -> None:
        if name == "data":
            object.__setattr__(self, name, value)  # the property's setter
            return
        raise AttributeError(f"QLRLinear.weight is computed from packed buffers: cannot set {name!r}")

    def __repr__(self) -> str:
        return f"DenseWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __matmul__(self, other):
        return self.materialize() @ other

    def __rmatmul__(self, other):
        return other @ self.materialize()

    def __add__(self, other):
        return self.materialize() + other

    __radd__ = __add__

    def __sub__(self, other):
        return self.materialize() - other

    def __rsub__(self, other):
        return other - self.materialize()

    def __mul__(self, other):
        return self.materialize() * other

    __rmul__ = __mul__

    def __neg__(self):
        return -self.materialize()

    def __getitem__(self, index):
        return self.materialize()[index]

    def __len__(self) -> int:
        return self._layer.out_features

    def __array__(self, dtype=None):
        a = self.materialize().detach().cpu().numpy()
        return a if dtype is None else a.astype(dtype)


class QLRLinear(nn.Linear):
    """y = x (Q + L R)ᵀ + b from packed low-bit storage.

    ``spec`` describes the storage: ``{"q": grid spec, "rank": k, "l": spec, "r": spec,
    "rotation": {"u_seed", "v_seed"} or None}`` with grid spec ``{"kind", "bits", "group_size"}``
    (kind ``"fp16"`` for 16-bit factors). It is what the manifest stores per module.
    """

    def __init__(self, in_features: int, out_features: int, spec: dict[str, Any], bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        nn.Module.__init__(self)  # no dense weight: skip nn.Linear's allocation
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        k = int(spec.get("rank", 0))
        shapes = _buffer_shapes("q", spec["q"], out_features, in_features)
        if k > 0:
            shapes.update(_buffer_shapes("l", spec["l"], out_features, k))
            shapes.update(_buffer_shapes("r", spec["r"], k, in_features))
        for name, (shape, dtype) in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._dense_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # cache_dense(): Q, L, R
        self._merged: torch.Tensor | None = None  # a dense weight written through weight.data (PEFT merge)
        self.compute_dtype = torch.float32  # what weight.dtype reports; follows .to(dtype)/.half()
        object.__setattr__(self, "_parent", None)  # (parent module, name) from attach(); not a submodule
        self.kernel = "reference"  # concrete kernel in use (lqlr.kernels)
        self._kernel_request = "reference"  # what was asked for ("auto" is resolved per device)
        self._fast = None  # the kernel's forward function; rebuilt lazily after .to() / load_packed

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def from_decomposition(cls, d, bias: torch.Tensor | None = None) -> QLRLinear:
        """Pack a :class:`lqlr.Decomposition` into a module."""
        out_f, in_f = d.Q.shape
        cfg = d.config
        spec: dict[str, Any] = {"q": d.q_codes.grid.spec(), "rank": d.rank, "rotation": None}
        tensors = _tensors("q", d.q_codes, None)
        if d.rank > 0:
            spec["l"] = d.l_codes.grid.spec() if d.l_codes is not None else {"kind": FP16}
            spec["r"] = d.r_codes.grid.spec() if d.r_codes is not None else {"kind": FP16}
            tensors.update(_tensors("l", d.l_codes, d.L_stored))
            tensors.update(_tensors("r", d.r_codes, d.R_stored))
        if d.incoherence is not None:
            spec["rotation"] = {"u_seed": d.incoherence.U.seed, "v_seed": d.incoherence.V.seed}
        spec["config"] = cfg.to_dict()
        mod = cls(in_f, out_f, spec, bias=bias is not None, device=d.Q.device)
        mod.load_packed(tensors)
        if bias is not None:
            mod.bias.data.copy_(bias.detach().float())
        return mod

    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fill the stored buffers (names as in :meth:`packed_tensors`), checking their shapes."""
        for name, buf in self.named_buffers(recurse=False):
            if name not in tensors:
                raise KeyError(f"missing tensor {name!r} for a QLRLinear of spec {self.spec}")
            t = tensors[name]
            if tuple(t.shape) != tuple(buf.shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(buf.shape)}")
            buf.copy_(t.to(buf.dtype))
        self._dense_cache = None
        self._fast = None
        self.__dict__.pop("_twin", None)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors (packed codes, fp16 scales/factors), as written to disk."""
        out = {}
        for name, buf in self.named_buffers(recurse=False):
            out[name] = buf.to(torch.float16) if buf.is_floating_point() else buf
        return out

    # ----- dense views --------------------------------------------------------------------
    @property
    def incoherence(self) -> Incoherence | None:
        rot = self.spec.get("rotation")
        if not rot:
            return None
        return Incoherence(U=Rotation(self.out_features, int(rot["u_seed"])), V=Rotation(self.in_features, int(rot["v_seed"])))

    @property
    def rank(self) -> int:
        return int(self.spec.get("rank", 0))

    def quantized(self, prefix: str = "q") -> QuantizedTensor | None:
        """The stored Q' (``prefix="q"``), L' (``"l"``) or R' (``"r"``) on its grid: codes and group
        parameters, unpacked (None for a factor stored in fp16, or absent at rank 0)."""
        spec = self.spec.get(prefix)
        if spec is None or spec["kind"] == FP16:
            return None
        rows = self.out_features if prefix in ("q", "l") else self.rank
        cols = self.in_features if prefix in ("q", "r") else self.rank
        t = {"codes": getattr(self, f"{prefix}_codes"), "scale": getattr(self, f"{prefix}_scale")}
        if hasattr(self, f"{prefix}_zero"):
            t["zero"] = getattr(self, f"{prefix}_zero")
        return QuantizedTensor.from_packed(t, (rows, cols), _grid(spec))

    def _matrix(self, prefix: str) -> torch.Tensor:
        if self.spec[prefix]["kind"] == FP16:
            return getattr(self, f"{prefix}_weight").to(torch.float32)
        return self.quantized(prefix).dequantize()

    def stored_q(self) -> torch.Tensor:
        """Q' (out, in) as stored (rotated basis when incoherence is on)."""
        return self._matrix("q")

    def stored_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L', R') as stored: (out, k) and (k, in)."""
        k = self.rank
        if k == 0:
            dev = self.q_scale.device
            return torch.zeros(self.out_features, 0, device=dev), torch.zeros(0, self.in_features, device=dev)
        return self._matrix("l"), self._matrix("r")

    def q_weight(self) -> torch.Tensor:
        """Q in the original basis, (out, in) float32."""
        Q = self.stored_q()
        rot = self.incoherence
        return rot.unrotate_weight(Q) if rot else Q

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) in the original basis: the LoRA B and A of the exported adapter."""
        L, R = self.stored_factors()
        rot = self.incoherence
        return (rot.unrotate_left(L), rot.unrotate_right(R)) if rot else (L, R)

    def dequantize(self) -> torch.Tensor:
        """Dense Q + L R in the original basis, (out, in) float32."""
        L, R = self.factors()
        return self.q_weight() + L @ R

    @property
    def weight(self) -> DenseWeight:  # type: ignore[override]
        """The dense weight, built only on use: ``.device``/``.dtype``/``.shape`` read no tensor (:class:`DenseWeight`)."""
        return DenseWeight(self)

    def effective_weight(self) -> torch.Tensor:
        """The dense (out, in) float32 weight forward computes with now: a merged weight if one was
        written, else Q + L R, or Q alone while a PEFT layer wraps this one (:meth:`wrapped`)."""
        if self._merged is not None:
            return self._merged.float()
        return self.dequantize() if self.rank > 0 and not self.wrapped() else self.q_weight()

    def set_dense_weight(self, W: torch.Tensor) -> None:
        """Compute with the dense ``W`` (out, in) from now on instead of the packed buffers (PEFT's
        merge writes ``weight.data``); the packed buffers, and what is saved, stay as they were."""
        if tuple(W.shape) != (self.out_features, self.in_features):
            raise ValueError(f"a dense weight of shape {tuple(W.shape)} does not fit a QLRLinear of shape "
                             f"({self.out_features}, {self.in_features})")
        self._merged = W.detach().to(self.compute_dtype)
        self._fast = None

    @property
    def merged(self) -> bool:
        """Whether forward uses a dense weight written through ``weight.data`` rather than the packed buffers."""
        return self._merged is not None

    def attach(self, parent: nn.Module, name: str) -> None:
        """Record the slot ``parent.<name>`` this layer fills, so that :meth:`wrapped` can tell when a
        PEFT LoRA layer takes its place (``lqlr.load`` and ``from_pretrained`` call it)."""
        object.__setattr__(self, "_parent", (parent, name))

    def _q_only(self) -> QLRLinear:
        """The Q-only twin (shared buffers, same kernel) that computes while a PEFT layer wraps this one."""
        twin = self.__dict__.get("_twin")
        if twin is None:
            twin = self.without_factors()
            twin._kernel_request, twin.kernel = self._kernel_request, self.kernel  # built on its first forward
            self.__dict__["_twin"] = twin  # not a submodule: its tensors are this layer's
        return twin

    def wrapped(self) -> bool:
        """Whether another module (a PEFT LoRA layer) has replaced this one in the slot given to
        :meth:`attach`: the adapter then stands for L·R and this layer computes Q only."""
        slot = self.__dict__.get("_parent")
        return slot is not None and slot[0]._modules.get(slot[1]) is not self

    def cache_dense(self, enabled: bool = True) -> None:
        """Keep Q and L, R dense in the original basis between calls (trades memory for speed): forward is
        then x Qᵀ + (x Rᵀ) Lᵀ, with no dequantization and no rotation of x or y per call."""
        self._dense_cache = (self.q_weight(), *self.factors()) if enabled else None

    def without_factors(self) -> QLRLinear:
        """A Q-only copy sharing Q's buffers (the frozen base under a LoRA adapter)."""
        spec = {k: v for k, v in self.spec.items() if k not in ("l", "r")}
        spec["rank"] = 0
        mod = QLRLinear(self.in_features, self.out_features, spec, bias=self.bias is not None, device=self.q_scale.device)
        mod.compute_dtype = self.compute_dtype
        mod.factor_spec = {k: self.spec[k] for k in ("rank", "l", "r") if k in self.spec}  # what L, R were stored on
        for name, _ in mod.named_buffers(recurse=False):
            setattr(mod, name, getattr(self, name))
        if self.bias is not None:
            mod.bias = self.bias
        return mod

    # ----- kernels ------------------------------------------------------------------------
    def set_kernel(self, kind: str = "auto") -> None:
        """Compute forward with kernel ``kind`` (see :mod:`lqlr.kernels`); builds it now."""
        self.kernel = resolve(kind, self)
        self._kernel_request = kind
        self._fast = make_fast(self, self.kernel)
        self.__dict__.pop("_twin", None)

    def _apply(self, fn, *args, **kwargs):
        # the packed buffers only move: a dtype cast (model.to(torch.bfloat16), .half()) would round the
        # fp16 scales and factors; it sets the compute dtype (weight.dtype) instead
        probe = fn(torch.zeros((), dtype=self.compute_dtype, device=self.q_scale.device))
        buffers = self._buffers
        self._buffers = type(buffers)()
        try:
            out = super()._apply(fn, *args, **kwargs)
        finally:
            self._buffers = buffers
        for name, buf in buffers.items():
            if buf is not None and buf.device != probe.device:
                buffers[name] = torch.empty_like(buf, device=probe.device) if buf.is_meta else buf.to(probe.device)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        if self._merged is not None:
            self._merged = fn(self._merged)
        if self._dense_cache is not None:
            self._dense_cache = tuple(t.to(probe.device) for t in self._dense_cache)
        self._fast = None  # buffers may have moved: rebuild on the next forward
        self.__dict__.pop("_twin", None)
        return out

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_fast"] = None  # compiled plans are not copyable; rebuilt on the next forward
        state.pop("_twin", None)
        return state

    # ----- compute ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged is not None:
            return F.linear(x, self._merged.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.rank > 0 and self.wrapped():
            return self._q_only()(x)  # the PEFT adapter around it is L·R
        if self.kernel != "reference" and self._dense_cache is None and not (
                torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))):
            if self._fast is None:
                self.set_kernel(self._kernel_request)
            if self._fast is not None:
                return self._fast(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor, factors: bool = True) -> torch.Tensor:
        """The pure-torch forward: dequantize Q' (and L', R' unless ``factors=False``) now, then dense products
        (or, after :meth:`cache_dense`, the cached dense Q, L, R in the original basis)."""
        if self._dense_cache is not None:  # Q, L, R dense in the original basis (cache_dense)
            Q, L, R = self._dense_cache
            y = F.linear(x, Q.to(x.dtype))  # x Qᵀ
            if self.rank > 0 and factors:
                y = y + F.linear(F.linear(x, R.to(x.dtype)), L.to(x.dtype))  # (x Rᵀ) Lᵀ
            return y if self.bias is None else y + self.bias.to(y.dtype)
        rot = self.incoherence
        xr = rot.V.apply(x) if rot else x  # x Vᵀ
        if torch.is_grad_enabled() and xr.requires_grad:
            y = _PackedMatmul.apply(xr, self)  # x' Q'ᵀ; backward re-dequantizes, the dense Q' is not kept
        else:
            y = F.linear(xr, self.stored_q().to(x.dtype))  # x' Q'ᵀ
        if self.rank > 0 and factors:
            L, R = self.stored_factors()
            y = y + F.linear(F.linear(xr, R.to(x.dtype)), L.to(x.dtype))  # (x' R'ᵀ) L'ᵀ
        if rot:
            y = rot.U.apply_inverse(y)  # y U
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        q = self.spec["q"]
        qdesc = q["kind"] if q["kind"] in GGUF_GRIDS else f"{q['kind']}{q['bits']}/g{q['group_size']}"
        s = f"in_features={self.in_features}, out_features={self.out_features}, Q={qdesc}"
        if self.rank:
            s += f", rank={self.rank}, L={self.spec['l'].get('bits', 16)}b, R={self.spec['r'].get('bits', 16)}b"
        if self.spec.get("rotation"):
            s += ", incoherence"
        return s + f", bias={self.bias is not None}"


class _PackedMatmul(torch.autograd.Function):
    """y = x Q'ᵀ with Q' dequantized from the packed buffers in forward and again in backward, so
    autograd saves only a reference to the module (packed codes), never a dense (out, in) Q'
    (QLoRA-style). Q' is frozen: only the input gets a gradient, ∂x = ∂y Q'."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QLRLinear) -> torch.Tensor:
        ctx.module = module
        return F.linear(x, module.stored_q().to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        Q = ctx.module.stored_q().to(grad_y.dtype)  # (out, in)
        return grad_y @ Q, None


def _tensors(prefix: str, qt: QuantizedTensor | None, dense: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if qt is None:
        return {f"{prefix}_weight": dense.to(torch.float16)}
    return {f"{prefix}_{k}": v for k, v in qt.packed().items()}


class dense_cache:
    """Context manager: every QLRLinear of ``model`` (a model or one block) keeps Q, L, R dense in the
    original basis while inside (faster forward passes at the cost of dense memory); packed-only again on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, QLRLinear)]

    def __enter__(self) -> "dense_cache":
        for m in self.layers:
            m.cache_dense(True)
        return self

    def __exit__(self, *exc) -> None:
        for m in self.layers:
            m.cache_dense(False)


def set_kernel(model: nn.Module, kind: str = "auto") -> dict[str, int]:
    """Set the kernel of every QLRLinear in ``model`` (built now, so memory is allocated here).

    Returns how many layers got each concrete kernel (``auto`` may differ per layer: a layer on a
    non-CPU device falls back to the reference path).
    """
    check_kernel(kind)
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QLRLinear):
            m.set_kernel(kind)
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return counts
