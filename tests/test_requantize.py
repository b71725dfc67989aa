"""Requantizing a trained adapter onto the export's L, R grids: the H-aware rounding minimises the
layers' output error (checked on the layers' real inputs), reduces to the H = I rounding when H ∝ I,
and quantization-aware training is reproduced exactly by rounding to nearest."""
import pytest
import torch

import lqlr
from lqlr.config import CompressConfig
from lqlr.engine.blocks import compress_model
from lqlr.finetune.lora import lora_factors, prepare
from lqlr.finetune.qat import disable_qat, enable_qat
from lqlr.finetune.requantize import RequantizeConfig, requantize_adapter, requantize_factors
from lqlr.finetune.train import FinetuneConfig, train
from lqlr.io.export import read_manifest, save_compressed
from lqlr.io.load import load
from lqlr.nn.layer import QLRLinear

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj", "model.layers.4.self_attn.o_proj"]


def _windows(n, seq_len=32, seed=0):
    return torch.randint(3, 512, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from lqlr.engine.models import load_model

    model, tokenizer = load_model("stories260k")
    cfg = CompressConfig(qlr=lqlr.QLRConfig(bq=2, rank=8, bl=3, br=3, group_size=32, iters=2, incoherence=True))
    reports = compress_model(model, _windows(8, 64), cfg, progress=False)
    return save_compressed(model, tmp_path_factory.mktemp("rq") / "s", source={"model": "stories260k"},
                           reports=reports, tokenizer=tokenizer, untouched_dtype="float32")


@pytest.fixture(scope="module")
def trained(export, tmp_path_factory):
    model = prepare(export)
    train(model, _windows(16), FinetuneConfig(steps=8, batch_size=2, seq_len=32, lr=1e-2, warmup_steps=1),
          progress=False)
    adapter = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(adapter)
    return model, adapter


def _inputs(model, names, ids):
    """The real inputs X (tokens, in) of each named layer of a PeftModel on ``ids``."""
    got, hooks = {}, []
    inner = model.base_model.model
    for n in names:
        hooks.append(inner.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: got.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def _factors(module, packed):
    copy = QLRLinear(module.in_features, module.out_features, module.spec)
    copy.load_packed({**module.packed_tensors(), **packed})
    return copy.factors()  # (L, R) in the original basis


def test_hessian_requantization_has_the_lowest_output_error(export, trained):
    """On each layer's own inputs X: ‖X (L̂R̂ − BA)ᵀ‖² is lowest with method=hessian, and its recorded
    h_rel_error equals that brute-force ratio (the rotation of H into the stored basis is right)."""
    model, _ = trained
    base = load(export)
    X = _inputs(model, NAMES, _windows(8, 64, seed=3))
    factors = lora_factors(model)
    for name in NAMES:
        m, (B, A), x = base.get_submodule(name), factors[name], X[name]
        H = x.T.double() @ x.double() / x.shape[0]
        out_err = {}
        for method in ("hessian", "frobenius", "nearest"):
            packed, err = requantize_factors(B, A, m, H.float(), RequantizeConfig(method=method))
            L, R = _factors(m, packed)
            out_err[method] = float(((L @ R - B @ A) @ x.T).pow(2).sum() / ((B @ A) @ x.T).pow(2).sum())
            assert err["h_rel_error"] == pytest.approx(out_err[method], rel=1e-3)
        assert out_err["hessian"] < out_err["frobenius"] and out_err["hessian"] < out_err["nearest"], (name, out_err)


def test_hessian_method_with_identity_h_is_no_worse_than_frobenius(export, trained):
    """With H = I the objectives coincide; the hessian method also rounds L under R Rᵀ (its rows' inputs),
    which the H = I method skips (greedy LDLQ, so lower in total, not on every matrix)."""
    model, _ = trained
    base = load(export)
    total = {"hessian": 0.0, "frobenius": 0.0}
    for name, (B, A) in lora_factors(model).items():
        m = base.get_submodule(name)
        _, with_h = requantize_factors(B, A, m, torch.eye(m.in_features), RequantizeConfig(method="hessian", damp=0.0))
        _, plain = requantize_factors(B, A, m, None, RequantizeConfig(method="frobenius"))
        assert with_h["h_rel_error"] == pytest.approx(with_h["rel_error"] ** 2, rel=1e-4)  # tr(Δ Δᵀ)/tr(T Tᵀ)
        total["hessian"] += with_h["rel_error"] ** 2
        total["frobenius"] += plain["rel_error"] ** 2
    assert total["hessian"] < total["frobenius"], total


def test_requantize_adapter_hessian_writes_a_better_export(export, trained, tmp_path):
    model, adapter = trained
    recs = {}
    probe = _windows(4, 64, seed=9)
    with torch.no_grad():
        tuned = model(probe).logits.log_softmax(-1)
    kl = {}
    for method in ("hessian", "frobenius"):
        out = tmp_path / method
        cfg = RequantizeConfig(method=method, n_samples=8, seq_len=64)
        recs[method] = requantize_adapter(export, adapter, out, cfg=cfg, progress=False)
        new = read_manifest(out)
        assert new["summary"] == read_manifest(export)["summary"] and new["finetune"]["method"] == method
        assert f"`{method}` requantization" in (out / "README.md").read_text()  # the card says what was done
        with torch.no_grad():
            lp = load(out)(probe).logits.log_softmax(-1)
        kl[method] = float((tuned.exp() * (tuned - lp)).sum(-1).mean())  # KL(fine-tuned ‖ requantized)
    assert recs["hessian"]["h_rel_error_mean"] > 0 and "h_rel_error_mean" not in recs["frobenius"]
    assert kl["hessian"] < kl["frobenius"], kl
    with pytest.raises(FileExistsError):
        requantize_adapter(export, adapter, tmp_path / "hessian")


def test_qat_trains_through_the_grids_and_nearest_reproduces_it(export, tmp_path):
    model = prepare(export)
    assert enable_qat(model) == sum(1 for m in load(export).modules() if isinstance(m, QLRLinear) and m.rank)
    res = train(model, _windows(16), FinetuneConfig(steps=8, batch_size=2, seq_len=32, lr=1e-2, warmup_steps=1,
                                                    qat=True), progress=False)
    assert res.losses[-1] < res.losses[0]
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    out = tmp_path / "rq"
    requantize_adapter(export, adapter, out, cfg=RequantizeConfig(method="nearest"))
    probe = _windows(2, 48, seed=7)
    with torch.no_grad():
        qat_logits = model(probe).logits  # fake-quantized factors
        rq_logits = load(out)(probe).logits  # the packed export
        disable_qat(model)
        real_logits = model(probe).logits
    scale = float(qat_logits.abs().max())
    assert float((qat_logits - rq_logits).abs().max()) < 1e-4 * scale
    assert float((real_logits - rq_logits).abs().max()) > 1e-3 * scale  # the grids do change the function


def test_qat_needs_the_exports_ranks(export):
    model = prepare(export, init="zero", rank=4)  # the export's ranks are 8: its grids do not fit
    with pytest.raises(ValueError, match="rank 4 differs"):
        enable_qat(model)
    with pytest.raises(ValueError, match="method"):
        RequantizeConfig(method="closest")
