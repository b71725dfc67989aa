"""The peers run through their own packages; their bit counts and outputs are checked independently."""
import pytest
import torch

from lqlr.core.grids import normal_float_levels
from lqlr.eval.peers import (
    bnb_nf4_bits,
    bnb_nf4_quantize,
    fit_peer,
    hqq_bits,
    hqq_quantize,
    peer_options,
    quantize_with_peer,
)


def test_bnb_nf4_matches_an_independent_nf4_absmax_quantizer():
    bnb = pytest.importorskip("bitsandbytes")  # noqa: F841
    torch.manual_seed(0)
    W = torch.randn(64, 256)
    got = bnb_nf4_quantize(W, double_quant=False).weight
    # second implementation: QLoRA's NF4 table (lqlr's own), absmax per block of 64 consecutive weights
    blocks = W.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = normal_float_levels(4)
    idx = (blocks / absmax).unsqueeze(-1).sub(levels).abs().argmin(-1)
    ref = (levels[idx] * absmax).reshape(W.shape)
    assert (got - ref).abs().max() < 1e-5 * W.abs().max()


def test_bnb_bits_count_what_bitsandbytes_stores():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(96, 512)
    for dq in (True, False):
        q, st = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=dq)
        stored = q.numel() * 8 + st.absmax.numel() * st.absmax.element_size() * 8
        if dq:
            stored += st.state2.absmax.numel() * 32 + 32  # fp32 scales of the absmax codes + their offset
        assert bnb_nf4_bits(*W.shape, dq) == stored


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_is_a_b_bit_grid_per_group_and_counts_its_fp16_scale_and_zero(bits):
    pytest.importorskip("hqq")
    torch.manual_seed(1)
    W = torch.randn(32, 128)
    res = hqq_quantize(W, bits, group_size=64)
    groups = res.weight.reshape(-1, 64)
    assert max(len(torch.unique(g)) for g in groups) <= 2 ** bits  # at most 2^b levels per group
    assert res.stored_bits == W.numel() * bits + (W.numel() // 64) * 32
    assert hqq_bits(32, 128, bits, 64) / W.numel() == bits + 0.5


def test_hqq_error_falls_with_bits_and_beats_nothing_else():
    pytest.importorskip("hqq")
    torch.manual_seed(2)
    W = torch.randn(64, 256)
    errs = [float((hqq_quantize(W, b, 64).weight - W).pow(2).mean() / W.pow(2).mean()) for b in (2, 3, 4)]
    assert errs[0] > 2 * errs[1] > 4 * errs[2] > 0
    assert errs[1] < 0.06  # 3-bit g64 on a Gaussian: the Lloyd–Max bound is 0.035; RTN min-max ≈ 0.05


@pytest.mark.parametrize("budget", [2.25, 2.5, 3.0, 3.3, 4.0, 4.4])
def test_fit_peer_nearest_and_below_match_brute_force(budget):
    n = 576 * 576
    opts = peer_options("hqq")
    bits = [hqq_bits(576, 576, **o) / n for o in opts]
    near = fit_peer("hqq", 576, 576, budget, {}, "nearest")[0]
    assert abs(hqq_bits(576, 576, **near) / n - budget) == pytest.approx(min(abs(b - budget) for b in bits))
    below = fit_peer("hqq", 576, 576, budget, {}, "below")[0]
    assert hqq_bits(576, 576, **below) / n == max(b for b in bits if b <= budget)


def test_quantize_with_peer_replaces_every_target_weight():
    pytest.importorskip("hqq")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recs = quantize_with_peer(model, "hqq", budget=3.5, progress=False)
    assert len(recs) == sum(1 for n in before if "layers" in n and n.endswith("proj.weight"))
    for r in recs:
        W = model.get_submodule(r["name"]).weight
        assert not torch.equal(W, before[r["name"] + ".weight"]) and 0 < r["rel_error"] < 0.2
    assert torch.equal(model.get_input_embeddings().weight, before["model.embed_tokens.weight"])


def test_a_setting_hqq_cannot_pack_falls_back_to_the_next_nearest():
    pytest.importorskip("hqq")
    from torch import nn

    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Module()])
    model.model.layers[0].proj = nn.Linear(172, 64, bias=False)  # 64·172 / 256 = 43 groups: 2-bit packing refuses
    (rec,) = quantize_with_peer(model, "hqq", targets=["proj"], budget=2.125, progress=False)
    assert rec["options"] != {"bits": 2, "group_size": 256} and rec["rel_error"] < 0.5
