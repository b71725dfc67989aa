"""Configuration dataclasses for the Q + L·R decomposition.

Plain dataclasses, validated in ``__post_init__``; Hydra builds the same classes from YAML
(``lqlr.cli`` registers them), and library code never imports Hydra.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GRIDS = ("uniform", "nf")
ORDERS = ("lr_first", "q_first")
SVD_METHODS = ("auto", "exact", "randomized")
FLOAT_BITS = 16  # a factor kept as 16-bit floats instead of a low-bit grid


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass
class QLRConfig:
    """How to decompose one weight matrix W (out × in) as Q + L·R.

    Notation follows DESIGN.md: Q has ``bq`` bits per entry on a grid with groups of
    ``group_size`` input columns; L (out × k) and R (k × in) have ``bl`` and ``br`` bits, with
    k = ``rank``. ``rank=0`` is Q only (LDLQ/GPTQ with a Hessian, round-to-nearest without);
    ``bl = br = 16`` keeps the factors as 16-bit floats (LoftQ / LQ-LoRA style).
    """

    bq: int = 2
    rank: int = 32
    bl: int = 4
    br: int = 4
    group_size: int = 64
    iters: int = 20
    seed: int = 0
    grid: str = "uniform"  # grid of Q: "uniform" (asymmetric, scale + zero) or "nf" (NormalFloat)
    factor_grid: str = "uniform"  # grid of L and R when bl/br < 16
    lr_iters: int = 3  # inner alternations of the low-bit L, R fit (stops early when it stalls)
    order: str = "lr_first"  # each outer iteration: LR step then Q step, or Q step then LR step
    act_order: bool = False  # LDLQ visits input columns by decreasing diag(H)
    block_size: int = 128  # lazy-update block of LDLQ (rounded up to a multiple of group_size)
    damp: float = 0.01  # ridge δ: H + δ·mean(diag H)·I before factorising
    clip_search: bool = True  # uniform grid: pick each group's range by a small MSE search
    incoherence: bool = False  # random-sign Hadamard on both sides (QuIP/QuIP#)
    q2n: bool = False  # Q2N per-row rescale of Q toward its target under H (seed 003)
    q2n_rho: float = 0.2  # Q2N regulariser λ_i = ρ · q_i H q_iᵀ (pulls α_i toward 1)
    svd: str = "auto"  # rank-k fit: exact SVD, randomized range finder, or auto by size

    def __post_init__(self) -> None:
        _check(isinstance(self.bq, int) and 2 <= self.bq <= 8,
               f"bq={self.bq!r}: Q needs an integer bit width from 2 to 8")
        for name in ("bl", "br"):
            b = getattr(self, name)
            _check(isinstance(b, int) and (2 <= b <= 8 or b == FLOAT_BITS),
                   f"{name}={b!r}: factor bits must be an integer from 2 to 8, or 16 for 16-bit floats")
        _check(isinstance(self.rank, int) and self.rank >= 0,
               f"rank={self.rank!r}: the rank k must be an integer >= 0 (0 means Q only)")
        _check(isinstance(self.group_size, int) and self.group_size >= 1,
               f"group_size={self.group_size!r}: must be a positive integer such as 32, 64 or 128")
        _check(isinstance(self.iters, int) and self.iters >= 1,
               f"iters={self.iters!r}: need at least one outer iteration")
        _check(isinstance(self.lr_iters, int) and self.lr_iters >= 0,
               f"lr_iters={self.lr_iters!r}: must be an integer >= 0")
        _check(self.grid in GRIDS, f"grid={self.grid!r}: choose one of {GRIDS}")
        _check(self.factor_grid in GRIDS, f"factor_grid={self.factor_grid!r}: choose one of {GRIDS}")
        _check(self.order in ORDERS, f"order={self.order!r}: choose one of {ORDERS}")
        _check(self.svd in SVD_METHODS, f"svd={self.svd!r}: choose one of {SVD_METHODS}")
        _check(isinstance(self.block_size, int) and self.block_size >= 1,
               f"block_size={self.block_size!r}: must be a positive integer")
        _check(self.damp >= 0, f"damp={self.damp!r}: the ridge must be >= 0 (0.01 is typical)")
        _check(self.q2n_rho >= 0, f"q2n_rho={self.q2n_rho!r}: must be >= 0")
        _check(self.grid != "nf" or self.bq <= 4, f"grid='nf' supports bq 2-4, got bq={self.bq}")
        _check(self.factor_grid != "nf" or self.rank == 0 or all(b <= 4 or b == FLOAT_BITS for b in (self.bl, self.br)),
               f"factor_grid='nf' supports 2-4 bits, got bl={self.bl}, br={self.br}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored in manifests and result files)."""
        return asdict(self)
