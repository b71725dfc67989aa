"""`lqlr-bench quality`: perplexity and KL against all-in bits, lqlr against its peers, one harness.

Every point is one ``lqlr-compress`` run with ``experiment=quality`` (WikiText-2 calibration,
WikiText-2 test evaluation, the budget fitted per method); the benchmark launches them as Hydra
multirun sweeps (so the cluster launchers apply unchanged), then gathers each run's
``result.json`` into ``results/quality.json``, a Markdown table and a Pareto plot.

Methods (``configs/method``): ``rtn``, ``nf`` (round-to-nearest, uniform and NormalFloat grids),
``gptq`` (LDLQ, k = 0), ``hqq`` (the ``hqq`` package), ``bnb_nf4`` (``bitsandbytes``), ``loftq``
(lqlr's LoftQ preset: peft's ``loftq_init`` computes on CUDA only), and the lqlr presets
``caldera`` (2-bit Q + rank-32 4-bit factors, T = 20), ``lqlr`` (Q + L·R with incoherence) and
``lqlr_q`` (k = 0 with incoherence).
Q-only methods and peers cannot hit every budget: they run at the setting whose all-in bits are
nearest to it (``budget.fit=nearest``) and are plotted at their real bits.

A run that already has its ``result.json`` (same config) is skipped, so rerunning the command after
an interruption only runs the missing points. ``--seeds 0 1 2 3`` runs every point once per seed
(rotations and calibration sample) into ``<work-dir>/<model>/seeds/`` and writes
``quality_seeds.*``: seed means, and the spread of each point's perplexity and KL.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

Record = dict[str, Any]

BUDGETS = (2.25, 2.5, 3.0, 4.0)
# cheap methods get extra budgets so their curves show their natural settings (e.g. 3- and 4-bit with groups)
DENSE_BUDGETS = (2.25, 2.5, 3.0, 3.25, 4.0, 4.25)
SEEDS_DIR = "seeds"  # runs of `--seeds` live in <work-dir>/<model>/seeds/, apart from the single-seed sweep
OURS = ("lqlr", "lqlr-auto", "lqlr-auto-id", "lqlr_q", "lqlr_e8p", "lqlr_trellis", "caldera")  # lqlr's presets; the rest are baselines

LABELS = {
    "rtn": "RTN (uniform, groups)", "nf": "RTN (NormalFloat grid)", "gptq": "GPTQ/LDLQ (k = 0)",
    "hqq": "HQQ (hqq package)", "bnb_nf4": "NF4 (bitsandbytes)",
    "loftq": "LoftQ (lqlr preset: H = I, NF Q, fp16 factors)", "caldera": "lqlr caldera (2-bit Q + L·R, T = 20)",
    "lqlr": "lqlr (Q + L·R, incoherence)", "lqlr-auto": "lqlr, allocator (budget=auto)",
    "lqlr-auto-id": "lqlr, allocator + TwoNN rank prior",
    "lqlr-auto-rot": "lqlr, allocator (budget=auto), rotation chosen per matrix", "lqlr_q": "lqlr Q-only (k = 0) + incoherence", "reference": "fp32 reference",
    "lqlr_e8p": "lqlr E8P (E8P lattice Q + 4-bit L·R, incoherence)",
    "lqlr_trellis": "lqlr trellis (QTIP bitshift-trellis Q + 4-bit L·R, incoherence)",
}


def is_ours(method: str) -> bool:
    """lqlr's own points (presets, and the allocator with any menu) as opposed to the baselines."""
    return method in OURS or method.startswith("lqlr-auto")


def sweeps(quick: bool = False) -> list[tuple]:
    """(methods, budgets[, extra overrides]) of each Hydra multirun of the benchmark; the last three run
    lqlr's global allocator (budget=auto): default menu, TwoNN rank prior, rotation chosen per matrix."""
    if quick:
        return [(("rtn", "gptq", "hqq", "lqlr"), (2.5, 4.0))]
    return [(("lqlr", "lqlr_q", "caldera", "loftq"), BUDGETS), (("gptq", "rtn", "nf", "hqq"), DENSE_BUDGETS),
            (("bnb_nf4",), (4.0,)), (("lqlr",), BUDGETS, ["budget=auto"]),
            (("lqlr",), (2.5, 3.0), ["budget=auto", "budget.prior=intrinsic_dimension"]),
            (("lqlr",), BUDGETS, ["budget=auto", "budget.menu.incoherence=[false,true]"]),
            (("lqlr_e8p", "lqlr_trellis"), (2.25, 2.5, 3.0))]


def sweep_command(model: str, methods: tuple[str, ...], budgets: tuple[float, ...], sweep_dir: Path,
                  extra: list[str] | None = None) -> list[str]:
    """The ``lqlr-compress -m`` command line of one sweep."""
    return [sys.executable, "-m", "lqlr.cli", "-m", "experiment=quality", f"model={model}", "method=" + ",".join(methods),
            "budget.bits=" + ",".join(f"{b:g}" for b in budgets), f"hydra.sweep.dir={sweep_dir}", *(extra or [])]


def run_sweeps(model: str, work_dir: Path, quick: bool = False, extra: list[str] | None = None,
               only: list[int] | None = None, seeds: list[int] | None = None) -> None:
    """Launch the sweeps (``only``: their indices, in that order), one subprocess each, so a crash in one
    does not lose the others. ``seeds``: every point once per seed (rotations and the calibration sample
    both follow it), in ``work_dir/seeds/``."""
    every = sweeps(quick)
    base = work_dir / SEEDS_DIR if seeds else work_dir
    per_seed = [f"seed={','.join(str(s) for s in seeds)}", "data.seed=${seed}"] if seeds else []
    for i in (range(len(every)) if only is None else only):
        methods, budgets, *more = every[i]
        cmd = sweep_command(model, methods, budgets, base / f"sweep{i}",
                            [*(more[0] if more else []), *per_seed, *(extra or [])])
        print("+ lqlr-compress", " ".join(cmd[3:]), flush=True)
        rc = subprocess.run(cmd, env={**os.environ, "HYDRA_FULL_ERROR": "1"}).returncode
        if rc:  # the finished runs of this sweep are kept; the others still run
            print(f"sweep {i} of {model} failed (exit {rc}); its finished runs are kept", file=sys.stderr, flush=True)


def record_of(result: dict) -> Record:
    """One benchmark record from a run's result.json."""
    keys = ("model", "method", "backend", "budget_bits", "bits_per_param", "q_bits_per_param", "ppl", "ppl_reference",
            "kl", "size_on_disk_bytes", "size_is", "compress_s", "wall_s", "peak_rss_mb", "eval_seq_len",
            "eval_tokens", "settings", "mean_h_error", "n_matrices")
    rec = {k: result.get(k) for k in keys if k in result}
    rec["backend"] = rec.get("backend") or "lqlr"
    rec["seed"] = result.get("config", {}).get("seed")
    label = None
    if result.get("budget_mode") == "auto":
        rec["method"] += "-auto" + ("-id" if result.get("budget_prior", "none") != "none" else "")
        from lqlr.config import DEFAULT_GROUPS

        menu = result.get("config", {}).get("budget", {}).get("menu") or {}
        groups = menu.get("group_size") or DEFAULT_GROUPS
        rotations = menu.get("incoherence")
        extras = []  # a menu other than the default is its own line
        if tuple(groups) != DEFAULT_GROUPS:
            extras.append((f"menu groups {', '.join(str(g) for g in groups)}", "-g" + "+".join(str(g) for g in groups)))
        if rotations is not None and len(set(rotations)) > 1:
            extras.append(("rotation chosen per matrix", "-rot"))
        if extras:
            label = ", ".join([LABELS[rec["method"]], *(e[0] for e in extras)])
            rec["method"] += "".join(e[1] for e in extras)
    rec["label"] = label or LABELS.get(rec["method"], rec["method"])
    cfg = result.get("config", {}).get("method", {})
    if rec["backend"] == "lqlr":
        rec["method_config"] = {k: cfg.get(k) for k in ("bq", "rank", "bl", "br", "group_size", "iters", "grid",
                                                         "incoherence", "use_hessian", "hessian_mode")}
    return rec


def add_runs(records: list[Record], runs: list[Path]) -> tuple[list[Record], list[str]]:
    """``records`` with the points of these runs (result.json files or run folders holding one) put in,
    each replacing a record of the same model, method and budget; ValueError, one line, for a path
    that is not a finished run."""
    added, out = [], list(records)
    for run in runs:
        path = run / "result.json" if run.is_dir() else run
        if not path.is_file():
            raise ValueError(f"{run}: no result.json (a finished lqlr-compress run folder or its result.json)")
        result = json.loads(path.read_text())
        if "infeasible" in result or "ppl" not in result:
            raise ValueError(f"{path} is not a finished, evaluated run (no ppl): run it with eval.enabled=true")
        rec = record_of(result)
        same = (rec["model"], rec["method"], rec.get("budget_bits"))
        out = [r for r in out if (r["model"], r["method"], r.get("budget_bits")) != same]
        out.append(rec)
        added.append(f"{rec['model']} {rec['method']} {rec.get('budget_bits')}")
    out.sort(key=lambda r: (r["model"], r["method"], r["bits_per_param"]))
    return out, added


def collect(work_dir: Path, seeded: bool = False) -> list[Record]:
    """Records of every finished run under ``work_dir`` (plus one fp32 reference per model); ``seeded``:
    those of the ``--seeds`` sweeps instead of the single-seed ones."""
    paths = [p for p in sorted(work_dir.rglob("result.json")) if (SEEDS_DIR in p.relative_to(work_dir).parts) == seeded]
    results = [json.loads(p.read_text()) for p in paths]
    records = [record_of(r) for r in results if "infeasible" not in r]
    records.sort(key=lambda r: (r["model"], r["method"], r["bits_per_param"]))
    for model in sorted({r["model"] for r in records}):
        refs = [r["ppl_reference"] for r in records if r["model"] == model and r.get("ppl_reference")]
        if refs:
            records.append(dict(model=model, method="reference", label=LABELS["reference"], backend="none",
                                bits_per_param=32.0, ppl=refs[0], kl=0.0))
    return records


def seed_means(records: list[Record]) -> list[Record]:
    """One record per (model, method, budget): with several seeds, their mean bits and KL, the perplexity
    of their mean log-likelihood (geometric mean), each metric's [min, max] and the seeds."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r["model"], r["method"], r.get("budget_bits")), []).append(r)
    out = []
    for rs in groups.values():
        if len(rs) == 1:
            out.append(rs[0])
            continue
        m = {k: v for k, v in rs[0].items() if k != "seed"}
        m["seeds"] = sorted(r.get("seed") for r in rs)
        for key in ("bits_per_param", "ppl", "kl", "compress_s", "wall_s", "peak_rss_mb", "size_on_disk_bytes"):
            vals = [r[key] for r in rs if finite(r.get(key))]
            if not vals:
                continue
            mean = (math.exp(sum(math.log(v) for v in vals) / len(vals)) if key == "ppl" and min(vals) > 0
                    else sum(vals) / len(vals))
            m[key], m[key + "_range"] = mean, [min(vals), max(vals)]
        out.append(m)
    return out


def spread(records: list[Record]) -> str:
    """Per point with several seeds: the range of its perplexity and KL (how far apart two methods must be
    before the difference means something)."""
    rows = [r for r in seed_means(records) if r.get("seeds")]
    lines = ["| model | method | budget | seeds | all-in bits | ppl (geo. mean) | ppl min–max | KL mean | KL min–max |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["model"], r.get("budget_bits") or 0, r["bits_per_param"])):
        lo, hi = r["ppl_range"]
        klo, khi = r["kl_range"]
        lines.append(f"| {r['model']} | {r['label']} | {r.get('budget_bits'):g} | {', '.join(str(s) for s in r['seeds'])} | "
                     f"{r['bits_per_param']:.3f} | {r['ppl']:.2f} | {lo:.2f}–{hi:.2f} ({100 * (hi - lo) / r['ppl']:.0f} %) | "
                     f"{r['kl']:.3f} | {klo:.3f}–{khi:.3f} |")
    return "\n".join(lines)


def losses(records: list[Record]) -> list[dict]:
    """For each budget B: lqlr's best point (lowest ppl) at ≤ B bits, and the baseline points of the same
    budget — run at B, or with bits between that point's and B — that have at least as many bits
    and a perplexity or KL at least as low (the target says there should be none)."""
    out = []
    for model in sorted({r["model"] for r in records}):
        rows = [r for r in records if r["model"] == model and r.get("ppl") is not None and r["method"] != "reference"]
        for budget in BUDGETS:
            ours = [r for r in rows if is_ours(r["method"]) and r["bits_per_param"] <= budget + 1e-9]
            if not ours:
                continue
            best = min(ours, key=lambda r: r["ppl"])
            same_budget = [r for r in rows if not is_ours(r["method"]) and r["bits_per_param"] >= best["bits_per_param"]
                           and (r.get("budget_bits") == budget or r["bits_per_param"] <= budget + 1e-9)]
            beaten_by = [r for r in same_budget
                         if r["ppl"] <= best["ppl"] or (r.get("kl") is not None and r["kl"] <= best["kl"])]
            out.append(dict(model=model, budget=budget, best=best, beaten_by=beaten_by, compared=len(same_budget)))
    return out


def summary(records: list[Record], model: str) -> str:
    """Compact table: one row per method, one column per budget of BUDGETS, cells "bits · ppl · KL"."""
    rows = [r for r in records if r["model"] == model and r["method"] != "reference" and r.get("ppl") is not None]
    order = [m for m in LABELS if any(r["method"] == m for r in rows)]
    order += sorted({r["method"] for r in rows} - set(order))
    label = {r["method"]: r["label"] for r in rows}
    lines = ["| method | " + " | ".join(f"budget {b:g}: bits · ppl · KL" for b in BUDGETS) + " |",
             "|---|" + "---:|" * len(BUDGETS)]
    for m in order:
        cells = []
        for b in BUDGETS:
            r = next((r for r in rows if r["method"] == m and r.get("budget_bits") == b), None)
            cells.append("–" if r is None else f"{r['bits_per_param']:.2f} · {r['ppl']:.2f} · {r['kl']:.3f}")
        lines.append(f"| {label[m]} | " + " | ".join(cells) + " |")
    ref = next((r for r in records if r["model"] == model and r["method"] == "reference"), None)
    if ref:
        lines.append(f"| fp32 reference | ppl {ref['ppl']:.2f} | | | |")
    return "\n".join(lines)


def markdown(records: list[Record], command: str = "") -> str:
    """Tables per model (a summary by budget, every point sorted by bits) and the per-budget verdict;
    points run with several seeds enter as their seed means, and their spread gets its own table."""
    records = seed_means(records)
    lines = []
    if any(r.get("seeds") for r in records):
        lines += ["Points run with several seeds (`seed` and `data.seed`: rotations and calibration sample) are their",
                  "means below (bits and KL: mean; ppl: of the mean log-likelihood).", "", "### Spread over seeds", "",
                  spread(records), ""]
    for model in sorted({r["model"] for r in records}):
        rows = sorted((r for r in records if r["model"] == model), key=lambda r: (r["bits_per_param"], r["method"]))
        ctx = next((r.get("eval_seq_len") for r in rows if r.get("eval_seq_len")), None)
        toks = next((r.get("eval_tokens") for r in rows if r.get("eval_tokens")), None)
        lines += [f"### {model}: WikiText-2 test, {toks} tokens in windows of {ctx}", "", summary(records, model), "",
                  "Every point:", "",
                  "| method | budget | all-in bits | ppl | KL (nats/token) | size on disk (MB) | compress (s) | wall (s) | peak RSS (GB) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            def f(key: str, fmt: str, scale: float = 1.0) -> str:
                v = r.get(key)
                return "–" if v is None else format(v * scale, fmt)
            size = f("size_on_disk_bytes", ".1f", 1e-6) + ("*" if r.get("size_is") else "")
            lines.append(f"| {r['label']} | {f('budget_bits', 'g')} | {r['bits_per_param']:.3f} | {f('ppl', '.2f')} | "
                         f"{f('kl', '.3f')} | {size} | {f('compress_s', '.0f')} | {f('wall_s', '.0f')} | "
                         f"{f('peak_rss_mb', '.2f', 1e-3)} |")
        lines.append("")
    lines += ["`*` size computed from the peer's stored bits plus the untouched tensors in 16 bits (no lqlr export).", "",
              "### Does lqlr's best point beat every baseline at equal or higher bits?", "",
              "Per budget B: lqlr's best point at ≤ B bits against the baselines' points of that budget (run at B,",
              "or between that point's bits and B) that have at least as many bits.", "",
              "| model | budget | lqlr's best (bits, ppl, KL) | baselines compared | of those, with lower or equal ppl or KL |",
              "|---|---:|---|---:|---|"]
    for v in losses(records):
        b = v["best"]
        who = "; ".join(f"{r['label']} {r['bits_per_param']:.2f} b: ppl {r['ppl']:.2f}, KL {r['kl']:.3f}"
                        for r in v["beaten_by"]) or "none"
        lines.append(f"| {v['model']} | {v['budget']:g} | {b['label']} {b['bits_per_param']:.3f} b, ppl {b['ppl']:.2f}, "
                     f"KL {b['kl']:.3f} | {v['compared']} | {who} |")
    if command:
        lines += ["", f"Produced by `{command}`."]
    return "\n".join(lines) + "\n"


def plot(records: list[Record], path: Path) -> None:
    """Perplexity and KL against all-in bits, one line per method, one row of panels per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = seed_means(records)
    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        rows = [r for r in records if r["model"] == model and r["method"] != "reference" and r.get("ppl") is not None]
        ref = next((r["ppl"] for r in records if r["model"] == model and r["method"] == "reference"), None)
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bits_per_param"])
            color = plt.cm.tab20(list(LABELS).index(method) % 20 if method in LABELS else 19)  # one colour per method
            style = dict(marker="o", lw=2.5, color=color) if is_ours(method) else dict(marker=".", lw=1, ls="--", color=color)
            x = [r["bits_per_param"] for r in pts]
            row[0].plot(x, [r["ppl"] for r in pts], label=pts[0]["label"], **style)
            row[1].plot(x, [r["kl"] for r in pts], label=pts[0]["label"], **style)
        if ref:
            row[0].axhline(ref, color="k", lw=0.8, ls=":", label=f"fp32 reference ({ref:.2f})")
        for ax, name in zip(row, ("WikiText-2 perplexity", "KL to fp32 (nats/token)")):
            ax.set_yscale("log")
            ax.set_xlabel("all-in bits per parameter (block linears)")
            ax.set_title(f"{model}: {name}")
            ax.grid(alpha=0.3, which="both")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(records: list[Record], out_dir: Path, name: str, meta: dict) -> None:
    """results/<name>.json, .md and .png from the records."""
    from lqlr.bench.output import write_results

    write_results(out_dir, name, records, markdown(records, meta.get("command", "")), meta)
    plot(records, out_dir / f"{name}.png")
    print(f"wrote {out_dir / (name + '.png')}")


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def main_args(args) -> None:
    """Entry of ``lqlr-bench quality`` (see lqlr/bench/__init__.py for the flags)."""
    import platform
    import time

    out = Path(args.out)
    seeds = getattr(args, "seeds", None)
    name = ("quality_quick" if args.quick else "quality") + ("_seeds" if seeds else "")
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        records, meta = data["records"], data["meta"]
        if getattr(args, "add", None):
            records, added = add_runs(records, [Path(p) for p in args.add])
            # the runs by what they are (model, method, budget), not by where they were on this machine
            meta.setdefault("added", []).append(dict(
                command=f"lqlr-bench quality --from-json {Path(args.from_json).name} --add RUN...", runs=added))
        write(records, out, Path(args.from_json).stem, meta)
        return
    work = Path(args.work_dir)
    t0 = time.perf_counter()
    if not args.collect_only:
        for model in args.models:
            run_sweeps(model, work / model, args.quick, args.override, args.sweeps, seeds)
    records = collect(work, seeded=bool(seeds))
    if not records:
        sys.exit(f"no result.json under {work}: run without --collect-only first")
    meta = dict(command="lqlr-bench " + " ".join(getattr(args, "argv", sys.argv[1:])), models=args.models, quick=args.quick,
                sweeps=[dict(methods=m, budgets=b, overrides=(x[0] if x else [])) for m, b, *x in sweeps(args.quick)], machine=platform.machine(),
                cpus=os.cpu_count(), wall_s=time.perf_counter() - t0)
    write(records, out, name, meta)
