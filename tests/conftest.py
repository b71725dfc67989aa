"""Shared test helpers: small matrices and anisotropic, correlated Hessians."""
import pytest
import torch


def correlated_hessian(n: int, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """H = X Xᵀ / tokens for inputs with uneven scales and correlated channels (like real LLM inputs)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 0.7, n)[torch.randperm(n, generator=gen)]
    mix = torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / n**0.5
    X = mix @ (torch.randn(n, tokens, generator=gen) * scales[:, None])
    return X @ X.T / tokens


@pytest.fixture
def W_H():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(96, 128, generator=gen)
    return W, correlated_hessian(128, seed=2)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA GPU: skipped cleanly without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
