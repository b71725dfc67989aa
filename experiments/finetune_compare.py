"""Compare adapter initialisations under the same fine-tuning (steps, data, lr, seed), one model at a time.

    # three exports at the same all-in bits (see docs/finetuning.md)
    python experiments/finetune_compare.py --label stories260k --lqlr OUT/st-lqlr --qonly OUT/st-gptq \
        --loftq OUT/st-loftq --steps 100 --batch-size 8 --seq-len 256 --lr 2e-3 --eval-seq-len 512 --eval-windows 16

Runs ``lqlr-finetune`` once per row, each in its own process (so each peak RSS is its own):
(a) ``lqlr``: LoRA = the decomposition's L, R on the packed Q (then L, R requantized to their grids under each
layer's H; ``--requant-methods frobenius,nearest`` also puts the same adapter back with those methods);
(a+qat) ``lqlr+qat`` (``--qat``): (a) trained through its L, R grids (``train.qat=true``), requantized to nearest;
(b) ``qonly+zero``: QLoRA-style B = 0 LoRA, same ranks as (a), on a Q-only export;
(b') ``lqlrQ+zero`` (``--zero-on-lqlr-q``): the same zero-init LoRA on (a)'s own Q;
(c) ``loftq``: the LoftQ-style export's fp16 factors as LoRA init;
(fp) ``fp32+zero``: zero-init LoRA of the same ranks on the uncompressed model (memory and quality reference).
Merges the figures into ``results/finetune.json``, rewrites ``results/finetune.md`` and the
loss-curve plot ``results/finetune_loss.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ["-m", "lqlr.cli.finetune"]  # lqlr-finetune, run in its own process
RESULTS = ROOT / "results"

ROWS = {
    "lqlr": "(a) lqlr init: L, R from the decomposition",
    "lqlr+qat": "(a) with quantization-aware training (train.qat)",
    "qonly+zero": "(b) Q-only base (GPTQ/LDLQ), zero-init LoRA, same ranks",
    "lqlrQ+zero": "(b') lqlr's own Q, zero-init LoRA, same ranks",
    "loftq": "(c) LoftQ-style init (lqlr loftq preset)",
    "fp32+zero": "full-precision model, zero-init LoRA, same ranks",
}


def run_one(name: str, path: str, work: Path, common: list[str], extra: list[str]) -> dict:
    out = work / name
    if (out / "finetune.json").is_file():  # done before: keep (delete the folder to rerun)
        return json.loads((out / "finetune.json").read_text())
    cmd = [sys.executable, *APP, f"path={path}", f"output_dir={out}", "progress=false", *common, *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads((out / "finetune.json").read_text())


def requant_variants(name: str, export: str, work: Path, methods: list[str], record: dict, eval_windows: int,
                     eval_seq_len: int | None) -> dict:
    """ppl of the run's trained adapter put back on its grids by each of ``methods`` (no retraining)."""
    from transformers import AutoTokenizer

    from lqlr.calibrate.text import wikitext2_text
    from lqlr.eval.metrics import perplexity, wikitext2_windows
    from lqlr.finetune.requantize import RequantizeConfig, requantize_adapter
    from lqlr.io.load import load

    out: dict = dict(record.get("requant_variants") or {})
    tokenizer = AutoTokenizer.from_pretrained(export)
    for method in methods:
        if method in out:
            continue
        dest = work / name / f"requantized-{method}"
        if not (dest / "manifest.json").is_file():
            print(f"$ requantize {name} with method={method}", flush=True)
            rec = requantize_adapter(export, work / name / "adapter", dest, cfg=RequantizeConfig(method=method),
                                     text=wikitext2_text("validation"), progress=False)
        else:
            rec = json.loads((dest / "manifest.json").read_text())["finetune"]
        model = load(dest, verify=False)
        test = wikitext2_windows(model, tokenizer, eval_seq_len, eval_windows)
        out[method] = {"ppl": perplexity(model, test, 1, False), "requantize_s": rec.get("requantize_s"),
                       "rel_error_mean": rec.get("rel_error_mean")}
    return out


def gain_kept(r: dict) -> float | None:
    """Share of the fine-tuning perplexity gain left after requantizing: (before − requantized) / (before − after)."""
    if r.get("ppl_requantized") is None or r.get("ppl_after") is None or r["ppl_before"] == r["ppl_after"]:
        return None
    return (r["ppl_before"] - r["ppl_requantized"]) / (r["ppl_before"] - r["ppl_after"])


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def _requantized(r: dict) -> str:
    if r.get("ppl_requantized") is None:
        return "—"
    return f"{r['ppl_requantized']:.2f} ({r.get('requant_method') or 'frobenius refit, v0.2'})"


def _weights_mb(r: dict) -> str:
    if r.get("weights_frozen_mb") is None:
        return "—"
    return f"{r['weights_frozen_mb'] + r['weights_trainable_mb']:.0f}"


def write_tables(results: dict) -> None:
    lines = ["# Fine-tuning the adapter (`experiments/finetune_compare.py`)", "",
             "WikiText-2 test perplexity before/after fine-tuning on WikiText-2 validation; same steps, data, lr and",
             "seed for every row of a model. Bits are all-in over the compressed linears (LoRA counted only after",
             "requantization onto the L, R grids: the `requantized` column). `weights` is what the model's tensors",
             "hold in memory (frozen + trainable, tied tensors once); peak RSS is the training loop's own (kernel",
             "high-water mark reset after loading: weights + activations + gradients + AdamW state + allocator).",
             "(b)'s bits are its Q alone: with its LoRA put on (a)'s 4-bit L, R grids it would store exactly (a)'s",
             "bits. (c) spends its budget on 16-bit factors, so it gets a lower rank at the same bits.", ""]
    for label, entry in results.items():
        s = entry["settings"]
        lines += [f"## {label}", "",
                  f"{s['steps']} steps × {s['batch_size']} × {s['seq_len']} tokens, lr {s['lr']} "
                  f"(warmup {s.get('warmup_steps', 10)}, cosine)"
                  f"{', gradient checkpointing' if s.get('gradient_checkpointing') else ''}, "
                  f"eval {s['eval_windows']} windows × {s['eval_seq_len']} tokens.", "",
                  "| run | bits (all-in) | trainable params | ppl before | ppl after | ppl requantized (method) | "
                  "gain kept | train s | weights (MB) | peak RSS train (MB) | RSS at start (MB) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in entry["runs"].items():
            bits = None if r["base"] == "fp32" else r["bits_per_param"]
            # QAT's own "after" is already on the grids: its gain is measured against (a)'s unconstrained training
            ref = entry["runs"].get("lqlr", r) if name == "lqlr+qat" else r
            lines.append(f"| {ROWS.get(name, name)} | {_fmt(bits, '.3f')} | {r['trainable_params']:,} | "
                         f"{_fmt(r.get('ppl_before'))} | {_fmt(r.get('ppl_after'))} | {_requantized(r)} | "
                         f"{_fmt(gain_kept({**ref, 'ppl_requantized': r.get('ppl_requantized')}), '.0%')} | {r['train_s']:.0f} | {_weights_mb(r)} | {r['peak_rss_train_mb']:.0f} | {r['rss_before_train_mb']:.0f} |")
        variants = entry["runs"].get("lqlr", {}).get("requant_variants") or {}
        if variants:
            r = entry["runs"]["lqlr"]
            lines += ["", "(a)'s trained adapter put back on its grids by each requantization method (same bits; `gain kept` ="
                      " (ppl before − ppl requantized) / (ppl before − ppl after); the (a+qat) row's is against (a)'s"
                      " ppl after):", "",
                      "| method | ppl requantized | gain kept | rel. Frobenius error of B·A (mean) | seconds |",
                      "|---|---:|---:|---:|---:|"]
            if r.get("ppl_requantized") is not None:
                own = r.get("requant_method") or "frobenius"
                rq = r.get("requantize") or {}
                variants = {own: {"ppl": r["ppl_requantized"], "requantize_s": rq.get("requantize_s"),
                                  "rel_error_mean": rq.get("rel_error_mean")}, **variants}
            for method, v in variants.items():
                kept = gain_kept({**r, "ppl_requantized": v["ppl"]})
                lines.append(f"| {method} | {v['ppl']:.2f} | {_fmt(kept, '.0%')} | {_fmt(v.get('rel_error_mean'), '.4f')} "
                             f"| {_fmt(v.get('requantize_s'), '.0f')} |")
        lines.append("")
    (RESULTS / "finetune.md").write_text("\n".join(lines))


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (label, entry) in zip(axes[0], results.items()):
        for name, r in entry["runs"].items():
            losses = r["losses"]
            w = max(1, len(losses) // 20)
            smooth = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1]) for i in range(len(losses))]
            ax.plot(range(1, len(losses) + 1), smooth, label=ROWS.get(name, name))
        ax.set_title(f"{label}: training loss (running mean of {w})")
        ax.set_xlabel("step")
        ax.set_ylabel("next-token loss (WikiText-2 validation)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "finetune_loss.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="model name for the tables (e.g. stories260k)")
    p.add_argument("--lqlr", required=True, help="export of (a): method=lqlr")
    p.add_argument("--qonly", help="export of (b): a Q-only method (e.g. method=gptq) at the same Q grid")
    p.add_argument("--loftq", help="export of (c): method=loftq at the same all-in bits")
    p.add_argument("--zero-on-lqlr-q", action="store_true",
                   help="(b'): zero-init LoRA on (a)'s own Q (same base as (a); that Q was fitted next to L R)")
    p.add_argument("--no-fp32", action="store_true", help="skip the full-precision LoRA reference")
    p.add_argument("--qat", action="store_true", help="(a+qat): (a) trained through its grids, requantized to nearest")
    p.add_argument("--requant-method", default="hessian", help="how (a) is requantized (requant.method)")
    p.add_argument("--requant-methods", default="",
                   help="comma list of further methods to requantize (a)'s trained adapter with (e.g. frobenius,nearest)")
    p.add_argument("--work", default=None, help="folder for the runs (default <lqlr export>.compare)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--eval-seq-len", type=int, default=None)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in backward")
    a = p.parse_args(argv)
    work = Path(a.work or a.lqlr.rstrip("/") + ".compare")
    common = [f"train.steps={a.steps}", f"train.batch_size={a.batch_size}", f"train.seq_len={a.seq_len}",
              f"train.lr={a.lr}", f"train.warmup_steps={a.warmup_steps}", f"train.seed={a.seed}",
              f"train.gradient_checkpointing={str(a.gradient_checkpointing).lower()}",
              f"eval.max_windows={a.eval_windows}", f"eval.seq_len={a.eval_seq_len if a.eval_seq_len else 'null'}"]
    like = f"lora_like={Path(a.lqlr) / 'adapter'}"
    runs = {"lqlr": run_one("lqlr", a.lqlr, work, common,
                            ["init=export", "requantize=true", f"requant.method={a.requant_method}"])}
    methods = [m for m in a.requant_methods.split(",") if m]
    if methods:
        runs["lqlr"]["requant_variants"] = requant_variants("lqlr", a.lqlr, work, methods, runs["lqlr"],
                                                           a.eval_windows, a.eval_seq_len)
    if a.qat:
        runs["lqlr+qat"] = run_one("lqlr+qat", a.lqlr, work, common,
                                   ["init=export", "train.qat=true", "requantize=true", "requant.method=nearest"])
    if a.qonly:
        runs["qonly+zero"] = run_one("qonly+zero", a.qonly, work, common, ["init=zero", like])
    if a.zero_on_lqlr_q:
        runs["lqlrQ+zero"] = run_one("lqlrQ+zero", a.lqlr, work, common, ["init=zero"])
    if a.loftq:
        runs["loftq"] = run_one("loftq", a.loftq, work, common, ["init=export"])
    if not a.no_fp32:
        runs["fp32+zero"] = run_one("fp32+zero", a.lqlr, work, common, ["init=zero", "base=fp32", like])
    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / "finetune.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    settings = {"steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len, "lr": a.lr,
                "warmup_steps": a.warmup_steps, "seed": a.seed, "gradient_checkpointing": a.gradient_checkpointing,
                "eval_windows": a.eval_windows, "eval_seq_len": runs["lqlr"]["eval_tokens"] // a.eval_windows}
    keep = ("init", "base", "bits_per_param", "trainable_params", "ppl_before", "ppl_after", "ppl_requantized",
            "train_s", "peak_rss_train_mb", "rss_before_train_mb", "weights_frozen_mb", "weights_trainable_mb",
            "reload_max_abs_diff", "losses", "train_tokens", "requant_method", "requant_variants", "requantize")
    rows = {n: {k: r.get(k) for k in keep} for n, r in runs.items()}
    for r in rows.values():  # no machine paths in the results
        if isinstance(r.get("requantize"), dict):
            r["requantize"] = {k: v for k, v in r["requantize"].items() if k != "adapter"}
    previous = results.get(a.label, {})
    if previous.get("settings") == settings:  # same training setup: rows not run this time are kept
        rows = {**previous["runs"], **rows}
    results[a.label] = {"settings": settings, "runs": rows}
    store.write_text(json.dumps(results, indent=1))
    write_tables(results)
    plot(results)
    print((RESULTS / "finetune.md").read_text())


if __name__ == "__main__":
    main()
