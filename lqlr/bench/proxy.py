"""`lqlr-bench proxy`: does the allocator's cheap cost rank the menu's options like full decompositions?

On SmolLM2-135M (WikiText-2 calibration), for every matrix of the chosen blocks and every option of
the default menu, three costs Σ_r s_r (E H Eᵀ)_rr:

* ``proxy``: the allocator's default estimate (one pass, shared work, Q step on 256 sampled rows);
* ``one_pass``: the same one-pass decomposition on every row (exact for one pass);
* ``full``: the decomposition the compression would run (the method's outer iterations).

Spearman rank correlations (pooled over every (matrix, option) pair, which is what the MILP
compares, and the mean within a matrix) and the time of each.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from lqlr.calibrate.capture import blockwise_hessians
from lqlr.calibrate.sensitivity import output_sensitivity
from lqlr.calibrate.text import calibration_from
from lqlr.config import Menu, QLRConfig
from lqlr.core.arch import target_linears, weight_of
from lqlr.core.decompose import decompose
from lqlr.core.estimate import option_costs, sensitivity_weighted_error
from lqlr.engine.models import load_model


def measure(model_name: str = "smollm2-135m", blocks: tuple[int, ...] = (0, 15, 29), iters: int = 5,
            n_samples: int = 32, seq_len: int = 512, cost_rows: int = 256) -> tuple[list[dict], dict]:
    """(one record per (matrix, option), summary) for the lqlr method's menu on ``blocks``."""
    model, tok = load_model(model_name)
    ids = calibration_from("wikitext2", None, tok, n_samples, seq_len, seed=0, progress=False)
    base = QLRConfig(bq=3, rank=32, bl=4, br=4, group_size=64, iters=iters, lr_iters=3, incoherence=True)
    menu = Menu()
    names = [n for n in target_linears(model) if any(f".{b}." in n for b in blocks)]
    sens = output_sensitivity(model, ids, names)
    records, times = [], {"proxy": 0.0, "one_pass": 0.0, "full": 0.0}
    for _, hessians in blockwise_hessians(model, ids, names):
        for n, (H, _) in tqdm(hessians.items(), desc="matrices"):
            W = weight_of(model.get_submodule(n)).detach().float()
            opts = menu.options(base, *W.shape)
            t0 = time.perf_counter()
            proxy = option_costs(W, H, opts, sens[n], rows=cost_rows, seed=base.seed)
            t1 = time.perf_counter()
            one = option_costs(W, H, opts, sens[n], rows=None)
            t2 = time.perf_counter()
            full = [sensitivity_weighted_error(decompose(W, H, replace(o, iters=iters if o.rank else 1)).weight() - W,
                                               H, sens[n]) for o in opts]
            t3 = time.perf_counter()
            times["proxy"] += t1 - t0
            times["one_pass"] += t2 - t1
            times["full"] += t3 - t2
            for o, a, b, c in zip(opts, proxy, one, full):
                records.append(dict(matrix=n, shape=list(W.shape), bq=o.bq, rank=o.rank, group_size=o.group_size,
                                    proxy=a, one_pass=b, full=c))
    summary = dict(model=model_name, blocks=list(blocks), options_per_matrix=len(menu.options(base, 576, 576)),
                   matrices=len(names), iters=iters, cost_rows=cost_rows, seconds=times, **_correlations(records))
    return records, summary


def _correlations(records: list[dict]) -> dict:
    out = {}
    for a, b in (("proxy", "full"), ("one_pass", "full"), ("proxy", "one_pass")):
        pooled = spearmanr([r[a] for r in records], [r[b] for r in records])[0]
        per = []
        for m in sorted({r["matrix"] for r in records}):
            rs = [r for r in records if r["matrix"] == m]
            per.append(spearmanr([r[a] for r in rs], [r[b] for r in rs])[0])
        out[f"spearman_{a}_vs_{b}"] = float(pooled)
        out[f"spearman_{a}_vs_{b}_within_matrix_mean"] = float(sum(per) / len(per))
        out[f"spearman_{a}_vs_{b}_within_matrix_min"] = float(min(per))
    return out


def markdown(summary: dict) -> str:
    s = summary
    t = s["seconds"]
    lines = [f"# Allocator cost proxy on {s['model']} (blocks {s['blocks']}, {s['matrices']} matrices × "
             f"{s['options_per_matrix']} options)", "",
             "| cost | time (s) | Spearman vs full, pooled | within a matrix (mean / min) |", "|---|---:|---:|---:|"]
    for name, label in (("proxy", f"proxy (one pass, {s['cost_rows']} rows)"), ("one_pass", "one pass, all rows")):
        lines.append(f"| {label} | {t[name]:.0f} | {s[f'spearman_{name}_vs_full']:.4f} | "
                     f"{s[f'spearman_{name}_vs_full_within_matrix_mean']:.4f} / "
                     f"{s[f'spearman_{name}_vs_full_within_matrix_min']:.4f} |")
    lines.append(f"| full decomposition (T = {s['iters']}) | {t['full']:.0f} | 1 | 1 |")
    lines += ["", f"proxy vs one pass: pooled {s['spearman_proxy_vs_one_pass']:.4f}, within a matrix "
              f"{s['spearman_proxy_vs_one_pass_within_matrix_mean']:.4f} (mean).", ""]
    return "\n".join(lines)


def main(args) -> None:
    import platform
    import sys
    from pathlib import Path

    from lqlr.bench.output import write_results

    t0 = time.perf_counter()
    records, summary = measure(args.model, tuple(args.blocks), args.iters, cost_rows=args.cost_rows)
    meta = dict(command="lqlr-bench proxy " + " ".join(sys.argv[2:]), torch=torch.__version__,
                threads=torch.get_num_threads(), machine=platform.machine(), wall_s=time.perf_counter() - t0, **summary)
    write_results(Path(args.out), "proxy", records, markdown(summary), meta)
