"""The alternating optimizer: W ≈ Q + L R under the layer Hessian H (CALDERA, docs/design.md §2).

    Q, L, R = 0
    repeat T times:  LR step (L, R ← low-bit rank-k fit of W − Q under H)
                     Q step  (Q ← LDLQ rounding of W − L R under H)
    return the iterate with the lowest tr(E H Eᵀ),  E = Q + L R − W

Everything runs in the incoherence basis when it is on; the returned dense Q, L, R are in the
original basis, and the stored codes (``q_codes``, ``l_codes``, ``r_codes``) in the rotated one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lqlr.config import QLRConfig
from lqlr.core.bits import BitBreakdown, bit_breakdown
from lqlr.core.grids import QuantizedTensor, make_grid
from lqlr.core.hessian import (
    DampedHessian,
    check_hessian,
    cholesky,
    h_weighted_error,
    regularize,
)
from lqlr.core.incoherence import Incoherence
from lqlr.core.ldlq import LDLQPlan, Rounded, ldlq_plan, ldlq_round
from lqlr.core.lowrank import Factors, lr_step
from lqlr.core.q2n import q2n_rescale


@dataclass
class Decomposition:
    """W ≈ Q + L R for one matrix, with its stored form, error and history."""

    Q: torch.Tensor  # (out, in) dequantized backbone, original basis
    L: torch.Tensor  # (out, k) dequantized left factor, original basis
    R: torch.Tensor  # (k, in) dequantized right factor, original basis
    q_codes: QuantizedTensor  # Q' on its grid (rotated basis if incoherence)
    l_codes: QuantizedTensor | None  # L' on its grid; None when kept in fp16 or k = 0
    r_codes: QuantizedTensor | None
    L_stored: torch.Tensor  # (out, k) L' values as stored (rotated basis), for export
    R_stored: torch.Tensor  # (k, in)
    incoherence: Incoherence | None
    config: QLRConfig
    error: float  # tr(E H Eᵀ) / tr(W H Wᵀ) with the raw H (Frobenius when H is None)
    history: list[float] = field(default_factory=list)  # relative objective per outer iteration
    best_iter: int = 0
    breakdown: BitBreakdown | None = None

    def weight(self) -> torch.Tensor:
        """Q + L R in the original basis, (out, in) float32."""
        return self.Q + self.L @ self.R

    @property
    def rank(self) -> int:
        return self.L.shape[1]

    @property
    def bits_per_param(self) -> float:
        """All-in bits per entry of W (codes, scales/zeros of Q, L, R and rotation seeds)."""
        assert self.breakdown is not None
        return self.breakdown.bits_per_param


def _check_weight(W: torch.Tensor) -> None:
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D (out, in) matrix, got shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError("W contains NaN or Inf: fix the checkpoint before compressing it")


@dataclass
class _Iterate:
    rounded: Rounded
    factors: Factors | None
    objective: float  # raw tr(E H Eᵀ)


PREPARE_FIELDS = ("incoherence", "seed", "damp", "act_order")


@dataclass
class Prepared:
    """What decomposing W under H needs whatever BQ, the rank and the group size are: the
    incoherence rotation, W and H in its basis, the damped H and its factorisations. Made once per
    matrix by :func:`prepare` and shared by every configuration with the same ``key``."""

    W: torch.Tensor  # (out, in) float32, original basis
    H: torch.Tensor | None  # (in, in) raw float32, original basis (None: H = I)
    rot: Incoherence | None
    Wr: torch.Tensor  # (out, in) W in the incoherence basis
    Hr: torch.Tensor | None  # (in, in) H in the incoherence basis
    Hd: DampedHessian | None  # damped Hr
    plan: LDLQPlan | None  # LDLQ's factor of Hd
    norm: float  # tr(W H Wᵀ), the same in either basis
    key: tuple
    _C: torch.Tensor | None = None

    @property
    def C(self) -> torch.Tensor | None:
        """Lower Cholesky factor of the damped H (the LR step's metric), computed on first use."""
        if self._C is None and self.Hd is not None:
            self._C = cholesky(self.Hd.H)
        return self._C


def prepare_key(cfg: QLRConfig) -> tuple:
    """The fields of a configuration that :func:`prepare` depends on."""
    return tuple(getattr(cfg, f) for f in PREPARE_FIELDS)


def prepare(W: torch.Tensor, H: torch.Tensor | None, cfg: QLRConfig) -> Prepared:
    """Check W and H, rotate them (incoherence) and factorise the damped H, once for ``cfg``'s ``key``."""
    _check_weight(W)
    W = W.to(torch.float32)
    out_f, in_f = W.shape
    if H is not None:
        check_hessian(H, in_f)
        H = H.to(device=W.device, dtype=torch.float32)
    rot = Incoherence.for_shape(out_f, in_f, cfg.seed) if cfg.incoherence else None
    Wr = rot.rotate_weight(W) if rot else W
    Hr = (rot.rotate_hessian(H) if rot else H) if H is not None else None
    Hd = regularize(Hr, cfg.damp) if Hr is not None else None
    plan = ldlq_plan(Hd, cfg.act_order) if Hd is not None else None
    return Prepared(W=W, H=H, rot=rot, Wr=Wr, Hr=Hr, Hd=Hd, plan=plan, norm=h_weighted_error(W, H) or 1.0,
                    key=prepare_key(cfg))


def round_q(prep: Prepared, T: torch.Tensor, cfg: QLRConfig) -> tuple[Rounded, float | None]:
    """Q ← argmin tr((T − Q) H (T − Q)ᵀ) on ``cfg``'s grid, T (rows, in) in the rotated basis.

    Rows are independent, so T may hold any subset (or a stack) of rows. Returns the rounding and
    its raw objective when that comes for free (None otherwise)."""
    qgrid = make_grid(cfg.grid, cfg.bq, cfg.group_size, cfg.clip_search, cfg.trellis_state_bits)
    r = ldlq_round(T, prep.plan, qgrid, cfg.block_size)
    Hd = prep.Hd
    if cfg.q2n:
        qt = q2n_rescale(T, r.qt, None if Hd is None else Hd.H, cfg.q2n_rho)
        return Rounded(qt=qt, Q=qt.dequantize(), damped_error=None), None
    if r.damped_error is None:  # H = I: ‖T − Q‖² is cheap
        return r, float((T - r.Q).double().pow(2).sum())
    # tr(E H Eᵀ) = tr(E H_d Eᵀ) − Σ_j d_j ‖E_j‖², E against T with dead inputs zeroed
    col_sq = (T - r.Q).pow(2).sum(dim=0)  # (in,)
    col_sq[Hd.dead] = r.Q[:, Hd.dead].pow(2).sum(dim=0)
    return r, r.damped_error - float((Hd.added.double() * col_sq.double()).sum())


def fit_factors(prep: Prepared, A: torch.Tensor, cfg: QLRConfig, it: int, start=None) -> Factors:
    """L, R ← argmin tr((A − L R) H (A − L R)ᵀ) on the factor grids, A (out, in) in the rotated basis.
    ``start``: A C's top singular triplets (:func:`lqlr.core.lowrank.weighted_svd`), shared across ranks."""
    return lr_step(A, prep.plan, prep.C, cfg.rank, cfg.bl, cfg.br, cfg.factor_groups, cfg.factor_grid, cfg.lr_iters,
                   cfg.damp, cfg.block_size, cfg.clip_search, cfg.svd, seed=cfg.seed * 1000 + it, start=start)


def decompose(W: torch.Tensor, H: torch.Tensor | None, cfg: QLRConfig | None = None,
              prepared: Prepared | None = None) -> Decomposition:
    """Decompose W (out, in) as Q + L R minimising tr((Q + L R − W) H (Q + L R − W)ᵀ).

    H (in, in) is the input second moment of the layer (None: identity, plain Frobenius error).
    ``cfg.rank = 0`` gives Q only: LDLQ/GPTQ with H, round-to-nearest without. ``prepared``:
    :func:`prepare`'s result for this W and H, reused across configurations of one matrix.
    """
    cfg = cfg or QLRConfig()
    if W.dim() == 2:  # (a wrong shape is reported by prepare) a codebook grid needs a width that is a multiple of its dim
        cfg = cfg.for_matrix(*W.shape)
    if prepared is None:
        prepared = prepare(W, H, cfg)
    elif prepared.key != prepare_key(cfg) or prepared.W.shape != W.shape:
        raise ValueError(f"decompose: `prepared` was made for {dict(zip(PREPARE_FIELDS, prepared.key))} and shape "
                         f"{tuple(prepared.W.shape)}; this call has {dict(zip(PREPARE_FIELDS, prepare_key(cfg)))}, "
                         f"{tuple(W.shape)}: prepare() again for it")
    prep = prepared
    W, H, rot, Wr, Hr, norm = prep.W, prep.H, prep.rot, prep.Wr, prep.Hr, prep.norm
    device = W.device
    out_f, in_f = W.shape
    if cfg.rank > min(out_f, in_f):
        raise ValueError(f"rank={cfg.rank} exceeds min(out, in) = {min(out_f, in_f)} of this {out_f}×{in_f} matrix: "
                         "use a rank up to that (a full-rank L·R stores more than W)")
    k = cfg.rank

    def q_step(T: torch.Tensor) -> tuple[Rounded, float | None]:
        return round_q(prep, T, cfg)

    def exact(Q: torch.Tensor, f: Factors | None) -> float:
        E = Q - Wr if f is None else Q + f.L @ f.R - Wr
        return h_weighted_error(E, Hr)

    def fit_lr(A: torch.Tensor, it: int) -> Factors:
        return fit_factors(prep, A, cfg, it)

    history: list[float] = []
    best: _Iterate | None = None
    best_iter = 0
    if k == 0:
        r, obj = q_step(Wr)
        best = _Iterate(r, None, obj if obj is not None else exact(r.Q, None))
        history.append(best.objective / norm)
    else:
        Q = torch.zeros_like(Wr)
        f: Factors | None = None
        for t in range(cfg.iters):
            if cfg.order == "lr_first":
                f = fit_lr(Wr - Q, t)  # L, R ← argmin ‖(W − Q − L R) H^½‖ on their grids
                r, obj = q_step(Wr - f.L @ f.R)  # Q ← argmin ‖(W − L R − Q) H^½‖ on its grid
                obj = obj if obj is not None else exact(r.Q, f)
            else:
                r, _ = q_step(Wr if f is None else Wr - f.L @ f.R)
                f = fit_lr(Wr - r.Q, t)
                obj = exact(r.Q, f)
            Q = r.Q
            history.append(obj / norm)
            if best is None or obj < best.objective:
                best, best_iter = _Iterate(r, f, obj), t

    assert best is not None
    fb = best.factors
    Lr = fb.L if fb is not None else torch.zeros(out_f, 0, device=device)
    Rr = fb.R if fb is not None else torch.zeros(0, in_f, device=device)
    Q_orig = rot.unrotate_weight(best.rounded.Q) if rot else best.rounded.Q
    L_orig = rot.unrotate_left(Lr) if rot else Lr
    R_orig = rot.unrotate_right(Rr) if rot else Rr
    E = Q_orig + L_orig @ R_orig - W
    error = h_weighted_error(E, H) / norm
    return Decomposition(
        Q=Q_orig, L=L_orig, R=R_orig,
        q_codes=best.rounded.qt,
        l_codes=fb.qL if fb is not None else None,
        r_codes=fb.qR if fb is not None else None,
        L_stored=Lr, R_stored=Rr,
        incoherence=rot, config=cfg, error=error, history=history, best_iter=best_iter,
        breakdown=bit_breakdown(out_f, in_f, cfg),
    )
