"""Layer diagnostics against ground truth: known intrinsic dimensions and closed-form effective ranks."""
import math

import pytest
import torch

from lqlr.calibrate.diagnostics import (
    effective_rank,
    hessian_effective_rank,
    matrix_effective_rank,
    twonn_dimension,
)
from lqlr.cli.diagnose import main


@pytest.mark.parametrize("d", [2, 5, 10])
def test_twonn_recovers_the_dimension_of_a_linear_subspace(d):
    g = torch.Generator().manual_seed(d)
    basis = torch.linalg.qr(torch.randn(60, d, generator=g)).Q  # (D, d) orthonormal
    X = torch.randn(3000, d, generator=g) @ basis.T  # points on a d-dim subspace of R^60
    assert twonn_dimension(X) == pytest.approx(d, rel=0.15)


def test_twonn_on_a_curved_manifold():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(3000, 2, generator=g) * 2 * math.pi  # a torus: 2-dimensional, embedded in R^4
    X = torch.cat([t.cos(), t.sin()], dim=1)
    assert twonn_dimension(X) == pytest.approx(2, rel=0.15)


def test_twonn_drops_duplicates_and_refuses_too_few_points():
    X = torch.randn(500, 3)
    assert twonn_dimension(torch.cat([X, X[:100]])) == pytest.approx(twonn_dimension(X))
    with pytest.raises(ValueError, match="at least 10"):
        twonn_dimension(torch.randn(5, 3))


def test_effective_rank_closed_forms():
    assert effective_rank(torch.tensor([3.0, 3.0, 3.0, 0.0])) == pytest.approx(3.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert effective_rank(p * 7) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    U = torch.linalg.qr(torch.randn(20, 20)).Q
    W = U[:, :4] @ torch.diag(torch.full((4,), 2.0)) @ U[:, 4:8].T  # rank 4, equal singular values
    assert matrix_effective_rank(W) == pytest.approx(4.0, rel=1e-6)
    X = torch.randn(30, 6) @ torch.randn(6, 10)
    assert hessian_effective_rank(X.T @ X) <= 6 + 1e-6


def test_lqlr_diagnose_on_stories260k_writes_table_json_and_plot(tmp_path, capsys):
    main(["stories260k", "--n-samples", "8", "--seq-len", "128", "--out", str(tmp_path)])
    import json

    data = json.loads((tmp_path / "diagnostics_stories260k.json").read_text())
    assert len(data["blocks"]) == 5
    for b in data["blocks"]:
        assert 1 < b["intrinsic_dimension"] < b["hidden_size"]
        assert all(1 <= v <= 172 for v in b["w_effective_rank"].values())
    assert (tmp_path / "diagnostics_stories260k.png").stat().st_size > 10_000
    assert "TwoNN" in capsys.readouterr().out


def test_allocator_prior_caps_the_ranks_offered():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lqlr.budget.allocator import auto_plan
    from lqlr.calibrate.diagnostics import rank_ceilings
    from lqlr.config import Menu, QLRConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=97)).eval()
    ids = torch.randint(0, 97, (4, 64))
    _, table = auto_plan(model, ids, QLRConfig(group_size=32), 3.5, Menu(bq=[2, 3], rank=[0, 4, 64], group_size=[32]),
                         progress=False, prior="intrinsic_dimension")
    ceil = rank_ceilings(model, ids, table.names)
    for n, opts in zip(table.names, table.options):
        assert all(o.rank <= ceil[n] or o.rank == 0 for o in opts) and any(o.rank == 0 for o in opts)
    with pytest.raises(ValueError, match="budget.prior"):
        auto_plan(model, ids, QLRConfig(), 3.0, prior="magic", progress=False)
