"""Honest all-in bit accounting (docs/design.md §3).

bits/param of a matrix = (out·in·BQ + Q's scale/zero bits + k·(out + in)·B_LR + L, R scale bits
+ rotation seeds) / (out·in). The rotation seeds (two 64-bit integers) are counted when
incoherence is on, so nothing stored is left out.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from lqlr.config import FLOAT_BITS, QLRConfig
from lqlr.core.grids import make_grid

SEED_BITS = 2 * 64  # U and V seeds of an incoherence rotation


@dataclass(frozen=True)
class BitBreakdown:
    """Stored bits of one decomposed matrix, by tensor."""

    out_features: int
    in_features: int
    q_codes: int
    q_params: int
    l_bits: int
    r_bits: int
    rotation: int

    @property
    def total(self) -> int:
        return self.q_codes + self.q_params + self.l_bits + self.r_bits + self.rotation

    @property
    def bits_per_param(self) -> float:
        """All-in bits per entry of W."""
        return self.total / (self.out_features * self.in_features)

    @property
    def q_bits_per_param(self) -> float:
        """Bits per entry of Q alone (codes + scales/zeros)."""
        return (self.q_codes + self.q_params) / (self.out_features * self.in_features)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total=self.total, bits_per_param=self.bits_per_param, q_bits_per_param=self.q_bits_per_param)
        return d


def _factor_bits(rows: int, cols: int, bits: int, grid: str, group_size: int) -> int:
    if bits == FLOAT_BITS:
        return rows * cols * FLOAT_BITS
    return make_grid(grid, bits, group_size).storage_bits(rows, cols)


def bit_breakdown(out_features: int, in_features: int, cfg: QLRConfig) -> BitBreakdown:
    """Stored bits of an (out × in) matrix decomposed with ``cfg`` (rank clipped to min(out, in))."""
    qgrid = make_grid(cfg.grid, cfg.bq, cfg.group_size)
    n = out_features * in_features
    k = min(cfg.rank, out_features, in_features)
    l_bits = r_bits = 0
    if k > 0:
        # L is (out, k): its groups run along k; R is (k, in): groups along in
        l_bits = _factor_bits(out_features, k, cfg.bl, cfg.factor_grid, min(cfg.factor_groups, k))
        r_bits = _factor_bits(k, in_features, cfg.br, cfg.factor_grid, cfg.factor_groups)
    return BitBreakdown(
        out_features=out_features,
        in_features=in_features,
        q_codes=n * cfg.bq,
        q_params=qgrid.storage_bits(out_features, in_features) - n * cfg.bq,
        l_bits=l_bits,
        r_bits=r_bits,
        rotation=SEED_BITS if cfg.incoherence else 0,
    )


def bits_per_param(out_features: int, in_features: int, cfg: QLRConfig) -> float:
    """All-in bits per entry of W for ``cfg``."""
    return bit_breakdown(out_features, in_features, cfg).bits_per_param
