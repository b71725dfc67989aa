"""`lqlr-bench distortion`: how well each method reproduces a weight matrix, at its all-in bits.

Three parts, one JSON record per measurement (method, config, all-in bits, error):

* ``gaussian`` — iid N(0, 1) 1024×1024, H = I: relative MSE of each grid next to the
  rate–distortion limit 2^(−2R) and the scalar Lloyd–Max quantizer (computed here, not quoted).
* ``real`` — every linear of stories260K and the linears of a few SmolLM2-135M blocks, with H
  from WikiText-2 validation text: RTN, LDLQ, LoftQ-style (H = I, fp16 factors) and Q + LR,
  error tr(E H Eᵀ)/tr(W H Wᵀ) under the real H for all of them.
* ``timing`` — one 4096×4096 matrix, k = 64, T = 20, on this machine.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from lqlr.config import QLRConfig
from lqlr.core.decompose import decompose
from lqlr.core.grids import make_grid, quantize_rtn
from lqlr.core.hessian import h_weighted_error

Record = dict[str, Any]
SECTIONS = ("gaussian", "real", "timing")
TRELLIS_STATES = {2: (8, 10, 12, 16), 3: (12, 16), 4: (12,)}  # the trellis's state bits L measured at each bit width


def lloyd_max_mse(bits: int, iters: int = 2000) -> float:
    """MSE of the optimal scalar quantizer (Lloyd–Max) of N(0, 1) with 2^bits levels."""
    from scipy.stats import norm

    n = 2**bits
    c = torch.linspace(-2.5, 2.5, n, dtype=torch.float64).numpy()
    for _ in range(iters):
        t = (c[1:] + c[:-1]) / 2  # thresholds: midpoints (nearest-neighbour condition)
        a = [-math.inf, *t.tolist()]
        b = [*t.tolist(), math.inf]
        p = norm.cdf(b) - norm.cdf(a)
        c = (norm.pdf(a) - norm.pdf(b)) / p  # centroids (conditional means)
    return float(1.0 - (p * c**2).sum())  # E[x²] − Σ p_i c_i² at the centroid condition


def gaussian_records(size: int = 1024, seed: int = 0,
                     trellis_states: dict[int, tuple[int, ...]] | None = None) -> list[Record]:
    """Relative MSE of each grid on iid N(0, 1), H = I; the trellis at the state bits ``trellis_states[bits]``
    (default :data:`TRELLIS_STATES`)."""
    trellis_states = TRELLIS_STATES if trellis_states is None else trellis_states
    W = torch.randn(size, size, generator=torch.Generator().manual_seed(seed))
    out: list[Record] = []
    for bits in (2, 3, 4):
        grids = [("uniform", 64, True), ("uniform", 128, True), ("uniform", 64, False), ("nf", 64, False)]
        for kind, g, clip in grids:
            grid = make_grid(kind, bits, g, clip_search=clip)
            Q = quantize_rtn(W, grid).dequantize()
            name = f"{kind}{'' if kind == 'nf' else ('+clip' if clip else '')} g{g}"
            out.append(dict(section="gaussian", method=name, bq=bits, group_size=g,
                            bits_per_param=grid.storage_bits(size, size) / size**2,
                            error=float(((Q - W) ** 2).sum() / (W**2).sum())))
        # QuIP#'s E8P lattice codebook: 8 weights per 16-bit codeword, one fp16 scale per row or group; 3 and 4
        # bits add a residual codebook (RVQ) and a second scale
        for g, label in ((size, "per-row scale"), *(((128, "g128"),) if bits == 2 else ())):
            grid = make_grid("e8p", bits, g)
            Q = quantize_rtn(W, grid).dequantize()
            name = "e8p" if bits == 2 else f"e8p + {'E8 shell' if bits == 3 else 'e8p'} residual"
            out.append(dict(section="gaussian", method=f"{name} {label}", bq=bits, group_size=g,
                            bits_per_param=grid.storage_bits(size, size) / size**2,
                            error=float(((Q - W) ** 2).sum() / (W**2).sum())))
        # QTIP's bitshift trellis (1MAD code, tail-biting 16 × 16 tiles), one fp16 scale per row, by state bits L
        for L in trellis_states.get(bits, ()):
            grid = make_grid("trellis", bits, size, state_bits=L)
            t0 = time.perf_counter()
            Q = quantize_rtn(W, grid).dequantize()
            out.append(dict(section="gaussian", method=f"trellis L={L} per-row scale", bq=bits, group_size=size,
                            state_bits=L, time_s=time.perf_counter() - t0,
                            bits_per_param=grid.storage_bits(size, size) / size**2,
                            error=float(((Q - W) ** 2).sum() / (W**2).sum())))
        out.append(dict(section="gaussian", method="Lloyd–Max (scalar, optimal)", bq=bits,
                        bits_per_param=float(bits), error=lloyd_max_mse(bits)))
        out.append(dict(section="gaussian", method="limit 2^(-2R)", bq=bits,
                        bits_per_param=float(bits), error=2.0 ** (-2 * bits)))
    return out


def method_grid(ranks: tuple[int, int], iters: int, group_size: int = 64) -> list[tuple[str, QLRConfig, bool]]:
    """(method name, config, use H in the decomposition) for the real-matrix comparison."""
    k1, k2 = ranks
    base = QLRConfig(group_size=group_size, iters=iters, rank=0)
    rows: list[tuple[str, QLRConfig, bool]] = []
    for b in (2, 3, 4):
        rows.append((f"RTN {b}-bit", replace(base, bq=b), False))
        rows.append((f"LDLQ {b}-bit", replace(base, bq=b), True))
    rows.append(("LDLQ 2-bit + incoherence", replace(base, bq=2, incoherence=True), True))
    e8p = replace(base, grid="e8p", bq=2, group_size=4096, incoherence=True)  # one fp16 scale per row
    rows.append(("LDLQ E8P + incoherence", e8p, True))
    trellis = replace(base, grid="trellis", bq=2, group_size=4096, incoherence=True)  # L = 12, one scale per row
    rows.append(("LDLQ trellis L=12 + incoherence", trellis, True))
    for k in (k1, k2):
        rows.append((f"LoftQ-style 2-bit k={k} fp16 (H=I)",
                     replace(base, bq=2, rank=k, bl=16, br=16, order="q_first", iters=min(iters, 5)), False))
        rows.append((f"Q+LR 2-bit k={k} L,R 4-bit", replace(base, bq=2, rank=k, bl=4, br=4), True))
    rows.append((f"Q+LR 2-bit k={k1} L,R 4-bit + incoherence",
                 replace(base, bq=2, rank=k1, bl=4, br=4, incoherence=True), True))
    rows.append((f"Q+LR E8P k={k1} L,R 4-bit + incoherence", replace(e8p, rank=k1, bl=4, br=4), True))
    rows.append((f"Q+LR trellis k={k1} L,R 4-bit + incoherence, T≤5",
                 replace(trellis, rank=k1, bl=4, br=4, iters=min(iters, 5)), True))
    rows.append((f"Q+LR 2-bit k={k1} fp16 factors", replace(base, bq=2, rank=k1, bl=16, br=16), True))
    rows.append((f"Q+LR 3-bit k={k1} L,R 4-bit", replace(base, bq=3, rank=k1, bl=4, br=4), True))
    return rows


def real_records(model_name: str, layers: Iterable[int] | None, ranks: tuple[int, int], iters: int,
                 n_samples: int, seq_len: int, seed: int = 0, progress: bool = True) -> list[Record]:
    """H-weighted error of every method on the linears of ``model_name`` (selected blocks)."""
    from lqlr.calibrate.capture import capture_hessians
    from lqlr.calibrate.text import calibration_ids, wikitext2_text
    from lqlr.engine.models import load_model

    model, tok = load_model(model_name)
    wanted = None if layers is None else {int(i) for i in layers}

    def include(name: str, module: torch.nn.Module) -> bool:
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            return False
        parts = name.split(".")
        return wanted is None or ("layers" in parts and int(parts[parts.index("layers") + 1]) in wanted)

    ids = calibration_ids(tok, wikitext2_text("validation"), n_samples, seq_len, seed)
    names = [n for n, m in model.named_modules() if include(n, m)]
    hessians = capture_hessians(model, ids, names, progress=progress)
    weights = {n: m.weight.detach().float() for n, m in model.named_modules() if n in hessians}
    out: list[Record] = []
    methods = method_grid(ranks, iters)
    bar = tqdm(total=len(weights) * len(methods), desc=f"{model_name} matrices×methods", disable=not progress)
    for name, W in weights.items():
        H = hessians[name][0]
        norm = h_weighted_error(W, H)
        for method, cfg, use_h in methods:
            t0 = time.perf_counter()
            d = decompose(W, H if use_h else None, cfg)
            seconds = time.perf_counter() - t0
            out.append(dict(section="real", model=model_name, matrix=name, shape=list(W.shape), method=method,
                            config=cfg.to_dict(), uses_hessian=use_h, bits_per_param=d.bits_per_param,
                            error=h_weighted_error(d.weight() - W, H) / norm, time_s=seconds))
            bar.update(1)
            bar.set_postfix(err=f"{out[-1]['error']:.4f}")
    bar.close()
    return out


def timing_record(size: int = 4096, rank: int = 64, iters: int = 20, seed: int = 0) -> Record:
    """Wall time of one size × size decomposition (k = rank, T = iters) under a correlated H."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(size, size, generator=gen)
    X = torch.randn(size, 2 * size, generator=gen) * torch.logspace(-1, 0.5, size)[:, None]
    H = X @ X.T / X.shape[1]
    del X
    cfg = QLRConfig(bq=2, rank=rank, bl=4, br=4, group_size=64, iters=iters, seed=seed)
    t0 = time.perf_counter()
    d = decompose(W, H, cfg)
    seconds = time.perf_counter() - t0
    return dict(section="timing", method=f"Q+LR 2-bit k={rank} L,R 4-bit, T={iters}", shape=[size, size],
                config=cfg.to_dict(), bits_per_param=d.bits_per_param, error=d.error, time_s=seconds,
                threads=torch.get_num_threads())


def summarize_real(records: list[Record]) -> list[Record]:
    """Per (model, method): parameter-weighted all-in bits and mean relative H-error over matrices."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        if r["section"] == "real":
            groups.setdefault((r["model"], r["method"]), []).append(r)
    rows = []
    for (model, method), rs in groups.items():
        params = [r["shape"][0] * r["shape"][1] for r in rs]
        bits = sum(r["bits_per_param"] * p for r, p in zip(rs, params)) / sum(params)
        rows.append(dict(model=model, method=method, matrices=len(rs), bits_per_param=bits,
                         mean_error=sum(r["error"] for r in rs) / len(rs),
                         time_s=sum(r["time_s"] for r in rs)))
    return sorted(rows, key=lambda r: (r["model"], r["bits_per_param"]))


def merge_sections(path: Path, records: list[Record], meta: dict, sections: set[str]) -> tuple[list[Record], dict]:
    """A run of some ``sections`` merged into the results already at ``path``: their records replaced,
    the other sections' kept; ``meta["sections"]`` says which command (and when) made each section."""
    import json

    done = {s: {"command": meta["command"], "wall_s": meta["wall_s"]} for s in sections}
    if sections >= set(SECTIONS) or not path.exists():
        return records, {**meta, "sections": done}
    old = json.loads(path.read_text())
    kept = [r for r in old["records"] if r["section"] not in sections]
    before = old["meta"].get("sections") or {s: {"command": old["meta"].get("command"), "wall_s": old["meta"].get("wall_s")}
                                             for s in SECTIONS}
    merged = [r for s in SECTIONS for r in (records if s in sections else kept) if r["section"] == s]
    return merged, {**meta, "sections": {**before, **done}}


def markdown(records: list[Record]) -> str:
    """Markdown tables of a distortion run."""
    lines = ["### iid Gaussian 1024×1024, H = I (relative MSE)", "",
             "| bits (codes) | method | all-in bits | rel. MSE | time (s) |", "|---:|---|---:|---:|---:|"]
    for r in records:
        if r["section"] == "gaussian":
            t = f"{r['time_s']:.1f}" if "time_s" in r else ""
            lines.append(f"| {r['bq']} | {r['method']} | {r['bits_per_param']:.3f} | {r['error']:.4f} | {t} |")
    for model in sorted({r["model"] for r in records if r["section"] == "real"}):
        rows = [s for s in summarize_real(records) if s["model"] == model]
        lines += ["", f"### {model}: mean tr(EHEᵀ)/tr(WHWᵀ) over {rows[0]['matrices']} matrices, H from WikiText-2 validation", "",
                  "| method | all-in bits | mean rel. H-error | time (s, all matrices) |", "|---|---:|---:|---:|"]
        for s in rows:
            lines.append(f"| {s['method']} | {s['bits_per_param']:.3f} | {s['mean_error']:.5f} | {s['time_s']:.1f} |")
    for r in records:
        if r["section"] == "timing":
            lines += ["", f"### Timing: {r['shape'][0]}×{r['shape'][1]}, {r['method']}", "",
                      f"{r['time_s']:.1f} s on {r['threads']} CPU threads (all-in {r['bits_per_param']:.3f} bits, "
                      f"rel. H-error {r['error']:.4f})"]
    return "\n".join(lines) + "\n"
