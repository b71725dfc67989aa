"""Incoherence processing (QuIP / QuIP#): seeded random-sign Hadamard rotations.

For a dimension n = m·p with p the largest power of two dividing n, the rotation is
V = (O_m ⊗ H_p/√p) · diag(s): random signs s, a normalised Sylvester Hadamard matrix H_p and,
for the odd part m, a seeded random orthogonal O_m (identity when m = 1). V is orthogonal and
is regenerated from (n, seed) alone, so only the seed is stored. Decomposing
W' = U W Vᵀ under H' = V H Vᵀ spreads outliers over all entries; tr(E H Eᵀ) is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def hadamard(p: int) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix (p × p, p a power of two): symmetric and orthogonal."""
    if p & (p - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {p}")
    Hm = torch.ones(1, 1, dtype=torch.float64, device="cpu")  # cached on the host, moved to the data's device on use
    while Hm.shape[0] < p:
        Hm = torch.cat([torch.cat([Hm, Hm], 1), torch.cat([Hm, -Hm], 1)], 0)
    return (Hm / Hm.shape[0] ** 0.5).to(torch.float32)


@lru_cache(maxsize=256)
def rotation_parts(n: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random signs (n,) and the odd-part orthogonal O_m of the rotation (n, seed)."""
    # drawn on the host from a CPU generator, so a seed gives the same rotation on every device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, device="cpu").to(torch.float32) * 2 - 1
    if m == 1:
        return signs, torch.ones(1, 1, device="cpu")
    G = torch.randn(m, m, generator=gen, dtype=torch.float64, device="cpu")
    Qm, Rm = torch.linalg.qr(G)
    Qm = Qm * torch.sign(torch.diagonal(Rm))[None, :]  # unique (Haar) orthogonal factor
    return signs, Qm.to(torch.float32)


@dataclass(frozen=True)
class Rotation:
    """The orthogonal V of one dimension, defined by (n, seed)."""

    n: int
    seed: int

    @property
    def p(self) -> int:
        return self.n & (-self.n)  # largest power of two dividing n

    @property
    def m(self) -> int:
        return self.n // self.p

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        return rotation_parts(self.n, self.m, int(self.seed))

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """Each row x of X (r, n) mapped to V x, i.e. X Vᵀ."""
        signs, Om = self._parts()
        Y = (X * signs.to(X)).reshape(-1, self.m, self.p)
        Y = Y @ hadamard(self.p).to(X)  # H_p is symmetric
        Y = torch.einsum("ij,rjp->rip", Om.to(X), Y)
        return Y.reshape(X.shape)

    def apply_inverse(self, X: torch.Tensor) -> torch.Tensor:
        """Each row x of X (r, n) mapped to Vᵀ x, i.e. X V."""
        signs, Om = self._parts()
        Y = X.reshape(-1, self.m, self.p)
        Y = torch.einsum("ji,rjp->rip", Om.to(X), Y)
        Y = Y @ hadamard(self.p).to(X)
        return (Y.reshape(X.shape)) * signs.to(X)

    def matrix(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Dense V (n, n), on ``device``."""
        return self.apply(torch.eye(self.n, device=device)).T


@dataclass(frozen=True)
class Incoherence:
    """U (out side) and V (in side) of one matrix: W' = U W Vᵀ, H' = V H Vᵀ."""

    U: Rotation
    V: Rotation

    @classmethod
    def for_shape(cls, out_features: int, in_features: int, seed: int) -> "Incoherence":
        return cls(U=Rotation(out_features, 2 * seed + 1), V=Rotation(in_features, 2 * seed + 2))

    def rotate_weight(self, W: torch.Tensor) -> torch.Tensor:
        """U W Vᵀ."""
        return self.U.apply(self.V.apply(W).T).T

    def unrotate_weight(self, Wr: torch.Tensor) -> torch.Tensor:
        """Uᵀ W' V (inverse of :meth:`rotate_weight`)."""
        return self.U.apply_inverse(self.V.apply_inverse(Wr).T).T

    def rotate_hessian(self, H: torch.Tensor) -> torch.Tensor:
        """V H Vᵀ."""
        return self.V.apply(self.V.apply(H).T)

    def unrotate_left(self, Lr: torch.Tensor) -> torch.Tensor:
        """Uᵀ L' for a left factor L' (out, k)."""
        return self.U.apply_inverse(Lr.T).T

    def unrotate_right(self, Rr: torch.Tensor) -> torch.Tensor:
        """R' V for a right factor R' (k, in)."""
        return self.V.apply_inverse(Rr)
