"""Layer diagnostics: how many dimensions each block really uses.

* ``twonn_dimension``: the intrinsic dimension of a point cloud (Facco et al. 2017, "TwoNN"):
  for each point the ratio μ = r₂/r₁ of its second to first nearest-neighbour distance follows
  a Pareto law P(μ) = d μ^(−d−1) on a d-dimensional manifold, so −log(1 − F(μ)) = d·log μ; d is
  the slope of that line (least squares through the origin) over the smallest 90 % of the μ (the
  estimator's usual guard against noise at the largest scales).
* ``effective_rank``: exp of the entropy of the normalised spectrum (Roy & Vetterli 2007): k for
  a matrix with k equal singular values, between 1 and min(shape) otherwise.
* ``diagnose``: per block, the TwoNN dimension of its output hidden states on calibration text,
  and the effective rank of every target W and of its input second moment H.
The global allocator can use the block dimensions as a prior on ranks (``budget.prior``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lqlr.calibrate.capture import blockwise_hessians
from lqlr.core.arch import find_blocks, target_linears, weight_of


def twonn_dimension(X: torch.Tensor, discard: float = 0.1) -> float:
    """TwoNN intrinsic dimension of the rows of ``X`` (n, D); duplicate points are dropped first."""
    X = torch.unique(X.to(torch.float64), dim=0)
    n = X.shape[0]
    if n < 10:
        raise ValueError(f"TwoNN needs at least 10 distinct points, got {n}: give more calibration tokens")
    D = torch.cdist(X, X)  # (n, n)
    D.fill_diagonal_(math.inf)
    r = D.topk(2, dim=1, largest=False).values  # (n, 2): first and second neighbour distances
    mu = (r[:, 1] / r[:, 0].clamp_min(1e-300)).sort().values
    # empirical CDF F(μ_i) = i/n; on a d-manifold −log(1 − F) = d·log μ: a line through the origin
    m = max(2, int(math.floor(n * (1 - discard))))
    x = mu[:m].log()
    y = -torch.log1p(-torch.arange(1, m + 1, dtype=torch.float64) / n)
    return float((x * y).sum() / (x * x).sum())


def effective_rank(spectrum: torch.Tensor) -> float:
    """exp(−Σ p log p) with p = σ / Σ σ over the non-zero values of a spectrum."""
    s = spectrum.to(torch.float64).abs()
    s = s[s > s.max() * 1e-12] if s.numel() and s.max() > 0 else s[:0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def matrix_effective_rank(W: torch.Tensor) -> float:
    """Effective rank of W from its singular values."""
    return effective_rank(torch.linalg.svdvals(W.to(torch.float64)))


def hessian_effective_rank(H: torch.Tensor) -> float:
    """Effective rank of a PSD H from its eigenvalues (negative round-off clipped)."""
    return effective_rank(torch.linalg.eigvalsh(H.to(torch.float64)).clamp_min(0))


@dataclass
class BlockDiagnostics:
    """One decoder block: the TwoNN dimension of its outputs, and per target matrix (name → value)
    the effective rank of W and of its input H."""

    block: int
    hidden_size: int
    intrinsic_dimension: float
    w_effective_rank: dict[str, float]
    h_effective_rank: dict[str, float]


def block_hidden_states(model: nn.Module, ids: torch.Tensor, max_points: int = 2000, seed: int = 0) -> list[torch.Tensor]:
    """Per decoder block, ≤ ``max_points`` of its output hidden states (tokens after the first of each
    sequence, which is the same for every sequence), sampled with a fixed seed."""
    with torch.no_grad():
        out = model(ids.to(next(model.parameters()).device), output_hidden_states=True, use_cache=False)
    states = [h[:, 1:].reshape(-1, h.shape[-1]).float() for h in out.hidden_states[1:]]  # block outputs
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(states[0].shape[0], generator=g)[:max_points]
    return [s[idx] for s in states]


def diagnose(model: nn.Module, ids: torch.Tensor, targets=None, max_points: int = 2000,
             progress: bool = True) -> list[BlockDiagnostics]:
    """TwoNN dimension of every block's outputs and effective ranks of every target W and H."""

    path, blocks = find_blocks(model)
    names = list(target_linears(model, targets))
    h_rank = {n: hessian_effective_rank(H) for _, hess in blockwise_hessians(model, ids, names, progress=progress)
              for n, (H, _) in hess.items()}  # one block's Hessians in memory at a time
    states = block_hidden_states(model, ids, max_points)
    out = []
    for i in tqdm(range(len(blocks)), desc="diagnose", disable=not progress):
        prefix = f"{path}.{i}."
        mine = [n for n in names if n.startswith(prefix)]
        out.append(BlockDiagnostics(
            block=i, hidden_size=states[i].shape[1], intrinsic_dimension=twonn_dimension(states[i]),
            w_effective_rank={n[len(prefix):]: matrix_effective_rank(weight_of(model.get_submodule(n)).detach())
                              for n in mine},
            h_effective_rank={n[len(prefix):]: h_rank[n] for n in mine}))
    return out


def rank_ceilings(model: nn.Module, ids: torch.Tensor, names: list[str], scale: float = 2.0,
                  max_points: int = 2000) -> dict[str, int]:
    """The allocator's prior: a matrix in block i is offered ranks ≤ scale × the TwoNN dimension of
    block i's output hidden states (rank 0 is always offered)."""

    path, _ = find_blocks(model)
    dims = [twonn_dimension(s) for s in block_hidden_states(model, ids, max_points)]
    out = {}
    for n in names:
        i = int(n[len(path) + 1:].split(".")[0])
        out[n] = max(1, int(math.ceil(scale * dims[i])))
    return out


def table(diag: list[BlockDiagnostics]) -> str:
    """Markdown: one row per block."""
    kinds = sorted({k for d in diag for k in d.w_effective_rank})
    head = "| block | TwoNN dim. | " + " | ".join(f"eff. rank W {k.split('.')[-1]}" for k in kinds) + \
        " | " + " | ".join(f"eff. rank H {k.split('.')[-1]}" for k in kinds) + " |"
    lines = [head, "|" + "---:|" * (2 + 2 * len(kinds))]
    for d in diag:
        lines.append(f"| {d.block} | {d.intrinsic_dimension:.1f} | "
                     + " | ".join(f"{d.w_effective_rank.get(k, float('nan')):.0f}" for k in kinds) + " | "
                     + " | ".join(f"{d.h_effective_rank.get(k, float('nan')):.1f}" for k in kinds) + " |")
    return "\n".join(lines)


def plot(diag: list[BlockDiagnostics], path, title: str = "") -> None:
    """Intrinsic dimension and effective ranks per block (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [d.block for d in diag]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(blocks, [d.intrinsic_dimension for d in diag], marker="o")
    axes[0].set_title("TwoNN intrinsic dimension of block outputs")
    for ax, attr, name in ((axes[1], "w_effective_rank", "W"), (axes[2], "h_effective_rank", "H")):
        for k in sorted({k for d in diag for k in getattr(d, attr)}):
            ax.plot(blocks, [getattr(d, attr).get(k, float("nan")) for d in diag], marker=".", label=k)
        ax.set_title(f"effective rank of {name}")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


