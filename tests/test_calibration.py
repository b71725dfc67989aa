"""Hessian capture: accumulator arithmetic, hook wiring, and the stories260K model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lqlr.calibrate.capture import HessianAccumulator, capture_hessians
from lqlr.engine.models import load_model


def _second_moment(x: torch.Tensor) -> torch.Tensor:
    """Float64 reference H = XᵀX / n for x of shape (..., in)."""
    x = x.reshape(-1, x.shape[-1]).double()  # (tokens, in)
    return x.T @ x / x.shape[0]


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _tiny_lm(vocab: int = 11, dim: int = 6, hidden: int = 5, out: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(vocab, dim),
        nn.Linear(dim, hidden),
        nn.ReLU(),
        nn.Linear(hidden, out),
    )


def test_incremental_equals_batch_second_moment() -> None:
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(7, 7, generator=gen)  # correlated, anisotropic inputs
    batches = [
        torch.randn(3, 5, 7, generator=gen) @ mix + 0.5,  # (batch, seq, in)
        torch.randn(11, 7, generator=gen) @ mix,  # (tokens, in)
        torch.randn(2, 1, 4, 7, generator=gen) @ mix,  # extra leading dims
    ]
    acc = HessianAccumulator(7)
    for x in batches:
        acc.add_batch(x)
    X = torch.cat([x.reshape(-1, 7) for x in batches])  # (34, 7)
    H = acc.hessian()
    assert acc.n_tokens == 15 + 11 + 8
    assert H.dtype == torch.float32 and H.shape == (7, 7)
    torch.testing.assert_close(H.double(), _second_moment(X), rtol=1e-6, atol=1e-6)
    # not the trivial answer: inputs are correlated, so H is far from diagonal
    assert H.triu(1).abs().max() > 0.1 * H.diagonal().max()


def test_accumulator_errors() -> None:
    acc = HessianAccumulator(4)
    with pytest.raises(RuntimeError, match="no activations"):
        acc.hessian()
    with pytest.raises(ValueError, match="in_features 4"):
        acc.add_batch(torch.zeros(2, 5))


def test_hooks_match_manual_input_moments() -> None:
    model = _tiny_lm()
    ids = torch.randint(0, 11, (5, 9), generator=torch.Generator().manual_seed(1))
    hess = capture_hessians(model, ids, batch_size=2, progress=False)
    assert set(hess) == {"1", "3"}
    with torch.no_grad():
        x1 = model[0](ids)  # (5, 9, 6) input of Linear "1"
        x3 = model[2](model[1](x1))  # (5, 9, 5) input of Linear "3"
    for name, x in (("1", x1), ("3", x3)):
        H, n = hess[name]
        assert n == 45
        torch.testing.assert_close(H.double(), _second_moment(x), rtol=1e-5, atol=1e-6)
    assert _hook_count(model) == 0


def test_module_selection_and_errors() -> None:
    model = _tiny_lm()
    ids = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(2))
    hess = capture_hessians(model, ids, ["3"], progress=False)
    assert list(hess) == ["3"]
    with pytest.raises(ValueError, match="no module to capture"):
        capture_hessians(model, ids, [], progress=False)
    with pytest.raises(ValueError, match="n_samples, seq_len"):
        capture_hessians(model, ids[0], progress=False)
    assert _hook_count(model) == 0


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom inside forward")


def test_hooks_removed_after_exception() -> None:
    model = _tiny_lm()
    model.append(_Boom())
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="boom inside forward"):
        capture_hessians(model, ids, progress=False)
    assert _hook_count(model) == 0


@pytest.fixture(scope="module")
def stories():
    model, tokenizer = load_model("stories260k")
    return model, tokenizer


def test_capture_on_stories260k(stories) -> None:
    model, _ = stories
    ids = torch.randint(3, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    hess = capture_hessians(model, ids, batch_size=4, progress=False)
    linears = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not n.endswith("lm_head")
    }
    assert len(hess) == 35 == len(linears)
    assert set(hess) == set(linears)
    assert "lm_head" not in hess
    for name, (H, n) in hess.items():
        d = linears[name].in_features
        assert H.shape == (d, d) and H.dtype == torch.float32, name
        assert n == 6 * 32, name
        torch.testing.assert_close(H, H.T, rtol=0, atol=0)
        eig = torch.linalg.eigvalsh(H.double())
        assert eig.min() >= -1e-6 * eig.max(), name
        assert eig.max() > 0, name
    assert _hook_count(model) == 0


def test_blockwise_hessians_equal_the_whole_model_capture_and_free_each_block(stories) -> None:
    import gc
    import weakref

    from lqlr.calibrate.capture import blockwise_hessians
    from lqlr.core.arch import target_linears

    model, _ = stories
    ids = torch.randint(3, 512, (6, 32), generator=torch.Generator().manual_seed(3))
    names = list(target_linears(model))
    whole = capture_hessians(model, ids, names, batch_size=4, progress=False)
    seen, previous = {}, []
    for i, hess in blockwise_hessians(model, ids, names, batch_size=4, progress=False):
        gc.collect()
        assert all(r() is None for r in previous), "the previous block's Hessians are still alive"
        assert all(n.startswith(f"model.layers.{i}.") for n in hess)
        for n, (H, count) in hess.items():
            torch.testing.assert_close(H, whole[n][0], rtol=1e-5, atol=1e-7)
            assert count == whole[n][1] == 6 * 32
            seen[n] = True
        previous = [weakref.ref(H) for H, _ in hess.values()]
        del hess, H
    assert set(seen) == set(names)


def test_layers_reading_one_input_share_one_accumulator(stories) -> None:
    from lqlr.calibrate.capture import hessian_hooks
    from lqlr.core.arch import target_linears

    model, _ = stories
    ids = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(4))
    block = {n: m for n, m in target_linears(model).items() if n.startswith("model.layers.1.")}
    with hessian_hooks(block) as hooks, torch.no_grad():
        model(ids)
    hess = hooks.hessians()
    p = "model.layers.1."
    assert {hooks.shared[p + s] for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")} == {p + "self_attn.q_proj"}
    assert hooks.shared[p + "mlp.up_proj"] == p + "mlp.gate_proj" and hooks.shared[p + "mlp.down_proj"] == p + "mlp.down_proj"
    assert hooks.shared[p + "self_attn.o_proj"] == p + "self_attn.o_proj"
    assert len(hooks.accumulators) == 4  # q/k/v, o, gate/up, down: 4 Hessians held instead of 7
    assert hess[p + "self_attn.k_proj"][0] is hess[p + "self_attn.q_proj"][0]
    alone = capture_hessians(model, ids, [p + "self_attn.k_proj", p + "mlp.up_proj"], progress=False)  # no partner
    for n in alone:
        torch.testing.assert_close(hess[n][0], alone[n][0], rtol=1e-6, atol=1e-8)
