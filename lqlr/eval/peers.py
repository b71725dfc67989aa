"""Baselines from other libraries, run through their own code: HQQ (``hqq``) and bitsandbytes NF4.

They are used by the quality benchmark to compare lqlr against the real implementations at
matched all-in bits. Each quantizer returns the dequantized weight Ŵ (what the peer's kernels
compute with) and the all-in bits of what the peer stores:

- HQQ: b-bit codes + a scale and a zero per group of ``group_size`` weights, both kept in 16 bits
  by HQQ's default (``quant_scale=quant_zero=False``): b + 32/g bits per weight.
- bitsandbytes NF4 (QLoRA): 4-bit codes + one absmax per block of 64. With double quantization
  (QLoRA's default) the absmax values are 8-bit codes with one fp32 scale per 256 blocks:
  4 + 8/64 + 32/(64·256) bits per weight; without it the absmax is fp32: 4 + 32/64.
The weights are replaced in the model by Ŵ (dense), so evaluation runs exactly what the peer's
dequantization gives; no lqlr export is written for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lqlr.core.arch import is_conv1d, target_linears, weight_of

PEERS = ("hqq", "bnb")
HQQ_META_BITS = 32  # fp16 scale + fp16 zero per group
BNB_BLOCK = 64


class PeerUnavailableError(RuntimeError):
    """The peer's package is not installed."""


@dataclass(frozen=True)
class PeerResult:
    """Ŵ (out, in) as the peer dequantizes it, and the peer's all-in stored bits for W."""

    weight: torch.Tensor
    stored_bits: int

    @property
    def bits_per_param(self) -> float:
        return self.stored_bits / self.weight.numel()


def hqq_bits(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """All-in stored bits of an HQQ-quantized (out × in) matrix (groups along the input dimension)."""
    n = out_features * in_features
    groups = -(-n // group_size)
    return n * bits + groups * HQQ_META_BITS


def bnb_nf4_bits(out_features: int, in_features: int, double_quant: bool = True) -> int:
    """All-in stored bits of a bitsandbytes NF4 (out × in) matrix (blocks of 64 over the flattened W)."""
    n = out_features * in_features
    blocks = -(-n // BNB_BLOCK)
    if not double_quant:
        return n * 4 + blocks * 32
    return n * 4 + blocks * 8 + -(-blocks // 256) * 32 + 32  # + the fp32 offset of the absmax codes


def hqq_quantize(W: torch.Tensor, bits: int, group_size: int = 64) -> PeerResult:
    """Ŵ from HQQ's half-quadratic quantizer (``hqq.core.quantize.Quantizer``, optimize=True, axis=1)."""
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as err:
        raise PeerUnavailableError('method.backend=hqq needs the hqq package: pip install "lqlr[peers]"') from err
    if W.numel() % group_size:
        raise ValueError(f"HQQ group_size={group_size} must divide the matrix size {W.numel()}: pick a divisor")
    W32 = W.detach().to(torch.float32, copy=True)
    # groups of group_size consecutive weights of the row-major W (HQQ's axis=1 layout)
    Wq, meta = Quantizer.quantize(W32, nbits=bits, group_size=group_size, optimize=True, axis=1,
                                  compute_dtype=torch.float16, device="cpu")
    # HQQ keeps scale and zero in the compute dtype (fp16); dequantize with those stored values
    W_hat = Quantizer.dequantize(Wq, meta).to(torch.float32).reshape(W.shape)
    return PeerResult(W_hat, hqq_bits(*W.shape, bits, group_size))


def bnb_nf4_quantize(W: torch.Tensor, double_quant: bool = True) -> PeerResult:
    """Ŵ from bitsandbytes' NF4 (``quantize_4bit``/``dequantize_4bit``, blocksize 64, QLoRA's storage)."""
    try:
        import bitsandbytes.functional as bnbF
    except ImportError as err:
        raise PeerUnavailableError("method.backend=bnb needs bitsandbytes: pip install bitsandbytes") from err
    W32 = W.detach().to(torch.float32).contiguous()
    q, state = bnbF.quantize_4bit(W32, blocksize=BNB_BLOCK, quant_type="nf4", compress_statistics=double_quant)
    W_hat = bnbF.dequantize_4bit(q, state).to(torch.float32).reshape(W.shape)
    return PeerResult(W_hat, bnb_nf4_bits(*W.shape, double_quant))


def peer_options(backend: str) -> list[dict]:
    """The configurations a peer can be run at (for fitting a budget): dicts of quantize kwargs."""
    if backend == "hqq":
        return [dict(bits=b, group_size=g) for b in (2, 3, 4, 8) for g in (32, 64, 128, 256)]
    if backend == "bnb":
        return [dict(double_quant=True), dict(double_quant=False)]
    raise ValueError(f"unknown peer backend {backend!r}: choose one of {PEERS}")


def peer_bits(backend: str, out_features: int, in_features: int, **kw) -> int:
    return (hqq_bits(out_features, in_features, kw["bits"], kw["group_size"]) if backend == "hqq"
            else bnb_nf4_bits(out_features, in_features, kw["double_quant"]))


def fit_peer(backend: str, out_features: int, in_features: int, budget: float | None, default: dict,
             mode: str = "nearest") -> list[dict]:
    """Peer configurations for a budget, best first: ``nearest`` all-in bits (ties: the cheaper), or
    the most bits ``below`` it; ``[default]`` when there is no budget. The caller takes the first one
    the peer accepts (HQQ's bit packing needs the group count to fit its word layout). The real bits
    are always reported."""
    if budget is None:
        return [default]
    opts = [o for o in peer_options(backend) if "group_size" not in o or (out_features * in_features) % o["group_size"] == 0]
    n = out_features * in_features

    def bpp(o: dict) -> float:
        return peer_bits(backend, out_features, in_features, **o) / n

    if mode == "below":
        fitting = [o for o in opts if bpp(o) <= budget]
        if not fitting:
            raise ValueError(f"budget {budget} bits/param is below {min(map(bpp, opts)):.3f}, the cheapest {backend} "
                             "setting: raise budget.bits or use budget.fit=nearest")
        return sorted(fitting, key=lambda o: (-bpp(o), -o.get("bits", 0)))
    return sorted(opts, key=lambda o: (abs(bpp(o) - budget), bpp(o)))


def quantize_with_peer(model: nn.Module, backend: str, targets=None, budget: float | None = None,
                       default: dict | None = None, fit: str = "nearest", progress: bool = True) -> list[dict]:
    """Replace every target linear's weight by the peer's Ŵ, in place. Returns one record per matrix
    (name, shape, the options used, all-in bits, relative Frobenius error)."""
    from tqdm.auto import tqdm


    fn = {"hqq": hqq_quantize, "bnb": bnb_nf4_quantize}.get(backend)
    if fn is None:
        raise ValueError(f"unknown peer backend {backend!r}: choose one of {PEERS}")
    default = default or ({"bits": 4, "group_size": 64} if backend == "hqq" else {"double_quant": True})
    records = []
    mods = target_linears(model, targets)
    for name, module in tqdm(mods.items(), desc=f"{backend} quantize", disable=not progress):
        W = weight_of(module)  # (out, in)
        last: Exception | None = None
        for opts in fit_peer(backend, *W.shape, budget, default, fit):
            try:
                res = fn(W, **opts)
                break
            except RuntimeError as err:  # e.g. HQQ's 2-bit packing needs a multiple of 4 groups
                last = err
        else:
            raise ValueError(f"{backend} could not quantize {name} {tuple(W.shape)} at any setting near the budget: {last}")
        err = float((res.weight - W).pow(2).sum() / W.pow(2).sum())
        with torch.no_grad():
            target = res.weight.T if is_conv1d(module) else res.weight
            module.weight.copy_(target.to(module.weight.dtype))
        records.append(dict(name=name, shape=list(W.shape), options=opts, stored_bits=res.stored_bits,
                            bits_per_param=res.bits_per_param, rel_error=err))
    return records
