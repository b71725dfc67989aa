import pytest
import torch
from conftest import correlated_hessian

from lqlr.core.hessian import h_weighted_error
from lqlr.core.incoherence import Incoherence, Rotation, hadamard


@pytest.mark.parametrize("p", [1, 2, 8, 64, 512])
def test_hadamard_is_orthogonal_with_equal_magnitudes(p):
    Hp = hadamard(p)
    assert torch.allclose(Hp @ Hp.T, torch.eye(p), atol=1e-5)
    assert torch.allclose(Hp.abs(), torch.full((p, p), p**-0.5))


@pytest.mark.parametrize("n", [64, 96, 172, 576, 1536, 7])
def test_rotation_is_orthogonal_and_invertible(n):
    rot = Rotation(n, seed=3)
    V = rot.matrix().double()
    assert torch.allclose(V @ V.T, torch.eye(n, dtype=torch.float64), atol=1e-5)
    X = torch.randn(5, n)
    assert torch.allclose(rot.apply(X), X @ V.float().T, atol=1e-5)
    assert torch.allclose(rot.apply_inverse(rot.apply(X)), X, atol=1e-5)


def test_seeded_and_seed_dependent():
    assert torch.equal(Rotation(96, 1).matrix(), Rotation(96, 1).matrix())
    assert not torch.allclose(Rotation(96, 1).matrix(), Rotation(96, 2).matrix())


def test_rotating_preserves_the_error_and_spreads_outliers():
    W = torch.randn(48, 64)
    W[3, 7] = 40.0  # an outlier
    H = correlated_hessian(64)
    inc = Incoherence.for_shape(48, 64, seed=0)
    Wr, Hr = inc.rotate_weight(W), inc.rotate_hessian(H)
    V = inc.V.matrix()
    assert torch.allclose(Hr, V @ H @ V.T, atol=1e-4)
    assert h_weighted_error(Wr, Hr) == pytest.approx(h_weighted_error(W, H), rel=1e-4)
    assert torch.allclose(inc.unrotate_weight(Wr), W, atol=1e-4)
    assert Wr.abs().max() < 0.5 * W.abs().max()
    L, R = torch.randn(48, 4), torch.randn(4, 64)
    assert torch.allclose(inc.unrotate_left(inc.U.apply(L.T).T) @ inc.unrotate_right(inc.V.apply(R)), L @ R, atol=1e-4)
