import pytest
import torch
from conftest import correlated_hessian
from torch import nn

import lqlr
from lqlr.nn.layer import QLRLinear

CONFIGS = [
    dict(bq=2, rank=8, bl=4, br=4),
    dict(bq=3, rank=8, bl=4, br=4, incoherence=True),
    dict(bq=2, rank=4, bl=16, br=16, grid="nf"),
    dict(bq=4, rank=0),
    dict(bq=2, rank=8, bl=3, br=16, incoherence=True),
]


def _module(opts, bias=True):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(48, 96, generator=gen)
    b = torch.randn(48, generator=gen) if bias else None
    d = lqlr.decompose(W, correlated_hessian(96), lqlr.QLRConfig(group_size=32, iters=2, **opts))
    return d, b, QLRLinear.from_decomposition(d, b)


@pytest.mark.parametrize("opts", CONFIGS)
def test_forward_matches_dense_weight(opts):
    d, b, mod = _module(opts)
    x = torch.randn(3, 5, 96)
    ref = x @ d.weight().T + b
    assert torch.allclose(mod(x), ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(mod.dequantize(), d.weight(), atol=1e-5)
    assert torch.allclose(mod.weight, d.weight(), atol=1e-5)
    L, R = mod.factors()
    assert torch.allclose(L @ R, d.L @ d.R, atol=1e-5)
    assert torch.allclose(mod.q_weight(), d.Q, atol=1e-5)


@pytest.mark.parametrize("opts", CONFIGS)
def test_dense_cache_forward_is_the_decomposition(opts):
    # the evaluation's cache keeps Q, L, R in the original basis: no rotation per call, the same function
    d, b, mod = _module(opts)
    x = torch.randn(3, 5, 96)
    packed = mod.reference_forward(x)
    q_only = mod.reference_forward(x, factors=False)
    mod.cache_dense(True)
    assert torch.allclose(mod(x), x @ d.weight().T + b, atol=1e-4, rtol=1e-4)
    assert torch.allclose(mod(x), packed, atol=1e-4, rtol=1e-4)
    assert torch.allclose(mod.reference_forward(x, factors=False), q_only, atol=1e-4, rtol=1e-4)
    assert torch.allclose(q_only, x @ d.Q.T + b, atol=1e-4, rtol=1e-4)
    mod.cache_dense(False)
    assert torch.equal(mod.reference_forward(x), packed)


@pytest.mark.parametrize("opts", CONFIGS)
def test_packed_round_trip(opts):
    d, b, mod = _module(opts)
    clone = QLRLinear(96, 48, mod.spec, bias=True)
    clone.load_packed(mod.packed_tensors())
    clone.bias.data.copy_(mod.bias.data)
    x = torch.randn(4, 96)
    assert torch.equal(clone(x), mod(x))
    with pytest.raises(ValueError, match="shape"):
        bad = dict(mod.packed_tensors())
        bad["q_scale"] = bad["q_scale"][:, :1]
        clone.load_packed(bad)


@pytest.mark.parametrize("opts", CONFIGS)
def test_stored_bytes_equal_the_bit_accounting(opts):
    d, _, mod = _module(opts, bias=False)
    tensors = mod.packed_tensors()
    stored_bits = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    accounted = d.breakdown.total - d.breakdown.rotation  # seeds live in the manifest, not in tensors
    assert accounted <= stored_bits < accounted + 8 * len(tensors)  # only byte padding on top


def test_peft_wraps_the_q_base_and_reproduces_q_plus_lr():
    from peft import LoraConfig, get_peft_model

    d, b, full = _module(dict(bq=2, rank=8, bl=4, br=4, incoherence=True))

    class Tiny(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.proj = layer

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Tiny(full.without_factors()), LoraConfig(r=8, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0))
    L, R = full.factors()
    lora = model.base_model.model.proj
    lora.lora_A["default"].weight.data.copy_(R)
    lora.lora_B["default"].weight.data.copy_(L)
    x = torch.randn(6, 96)
    assert torch.allclose(model(x), full(x), atol=1e-4, rtol=1e-4)
    # the base stays packed and frozen: only LoRA weights train, gradients reach them
    model(x).sum().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert lora.lora_A["default"].weight.grad is not None
    assert not any(isinstance(v, nn.Parameter) and v.numel() == 48 * 96 for v in lora.base_layer.parameters())
