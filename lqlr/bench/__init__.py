"""`lqlr-bench`: benchmarks that write JSON records and a Markdown table under ``results/``.

    lqlr-bench distortion            # full run (see lqlr/bench/distortion.py); several minutes
    lqlr-bench distortion --quick    # a small run for a fresh install (about a minute)
    lqlr-bench quality               # ppl/KL vs bits against the peers (Hydra multirun sweeps); hours on 2 cores
    lqlr-bench quality --from-json results/quality.json   # table and plot again from the JSON
    lqlr-bench quality --from-json results/quality.json --add RUN_DIR...   # put finished runs in
    lqlr-bench proxy                 # does the allocator's cheap cost rank options like full decompositions?
    lqlr-bench scale                 # 7B/8B/70B shapes, lazily, block by block (synthetic checkpoints)
    lqlr-bench scale --quick         # a tiny shape for a fresh install (about a minute)
    lqlr-bench load --path EXPORT... # peak RSS and time of from_pretrained(export) vs lqlr.load, child processes
    lqlr-bench gguf --types q4_0 iq4_nl   # lqlr-GGUF (± LoRA) against llama.cpp's own quants, SmolLM2; see bench/gguf.py
    lqlr-bench gguf-speed            # their decode speed in llama.cpp (± lora.gguf) against its own quants; bench/gguf_speed.py
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from lqlr.bench.output import write_results


def _distortion(args: argparse.Namespace) -> None:
    from lqlr.bench import distortion as D

    t0 = time.perf_counter()
    sections = set(args.sections)
    records = D.gaussian_records(size=256 if args.quick else 1024) if "gaussian" in sections else []
    if "real" in sections:
        stories = dict(layers=None, ranks=(4, 8), n_samples=16 if args.quick else 64, seq_len=256)
        records += D.real_records("stories260k", iters=args.iters, **stories)
        if not args.quick and not args.skip_smollm2:
            records += D.real_records("smollm2-135m", layers=args.smollm2_layers, ranks=(32, 64),
                                      iters=args.iters, n_samples=32, seq_len=512)
    if "timing" in sections and not args.skip_timing:
        records.append(D.timing_record(size=1024 if args.quick else 4096, iters=args.iters))
    command = "lqlr-bench distortion " + " ".join(sys.argv[2:])
    meta = dict(command=command, quick=args.quick, iters=args.iters, torch=torch.__version__,
                threads=torch.get_num_threads(), machine=platform.machine(), wall_s=time.perf_counter() - t0)
    name = "distortion_quick" if args.quick else "distortion"
    records, meta = D.merge_sections(Path(args.out) / f"{name}.json", records, meta, sections)
    write_results(Path(args.out), name, records, D.markdown(records), meta)


def _inference(args: argparse.Namespace) -> None:
    from lqlr.bench import inference as I

    t0 = time.perf_counter()
    models = ("stories260k",) if args.quick else tuple(args.models)
    if args.path:
        try:
            records = I.run_paths(args.path, Path(args.work_dir), new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                                  repeats=args.repeats, threads=args.threads, kernel=args.kernel)
        except ValueError as err:
            raise SystemExit(f"lqlr-bench inference: {err}") from None
    else:
        records = I.run(models, tuple(args.bits), Path(args.work_dir), new_tokens=args.new_tokens,
                        prompt_len=args.prompt_len, repeats=args.repeats, threads=args.threads,
                        reference=not args.skip_reference)
    from lqlr.nn.kernels import extension

    ext = extension()
    meta = dict(command="lqlr-bench inference " + " ".join(sys.argv[2:]), torch=torch.__version__,
                threads=records[0]["threads"] if records else None, machine=platform.machine(),
                processor=platform.processor(), extension=getattr(ext, "simd", None), wall_s=time.perf_counter() - t0)
    name = args.name or ("inference_quick" if args.quick else "inference")
    write_results(Path(args.out), name, records, I.markdown(records), meta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lqlr-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("distortion", help="per-matrix error vs all-in bits (Gaussian, stories260K, SmolLM2)")
    p.add_argument("--quick", action="store_true", help="small sizes, stories260K only")
    p.add_argument("--iters", type=int, default=None, help="outer iterations T of Q+LR (default 20; 5 with --quick)")
    p.add_argument("--smollm2-layers", type=int, nargs="+", default=[0, 15, 29], help="SmolLM2 blocks to measure")
    p.add_argument("--skip-smollm2", action="store_true", help="leave out SmolLM2-135M")
    p.add_argument("--skip-timing", action="store_true", help="leave out the 4096×4096 timing")
    p.add_argument("--sections", nargs="+", choices=("gaussian", "real", "timing"), default=["gaussian", "real", "timing"],
                   help="run only these parts; the output file keeps its records of the others (default: all)")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    q = sub.add_parser("quality", help="perplexity and KL vs all-in bits, lqlr against RTN/NF/GPTQ/HQQ/NF4/LoftQ")
    q.add_argument("--models", nargs="+", default=["stories260k", "smollm2-135m"], help="model names (configs/model)")
    q.add_argument("--quick", action="store_true", help="4 methods × 2 budgets")
    q.add_argument("--work-dir", default="outputs/quality", help="where the sweeps' run folders go")
    q.add_argument("--sweeps", type=int, nargs="+", default=None, help="run only these sweeps (indices, see quality.sweeps)")
    q.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run every point once per seed (rotations and calibration sample); writes quality_seeds.*")
    q.add_argument("--collect-only", action="store_true", help="only gather the result.json files under --work-dir")
    q.add_argument("--from-json", default=None, help="rewrite the table and plot from a quality JSON")
    q.add_argument("--add", nargs="+", default=None,
                   help="with --from-json: put these finished runs (folders or result.json) into it, replacing the "
                        "same model, method and budget")
    q.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run, e.g. eval.max_windows=8")
    q.add_argument("--out", default="results", help="output folder (default: results)")
    p = sub.add_parser("inference", help="decode/prefill tokens/s, memory and load time: fp32 vs packed vs dense vs PEFT")
    p.add_argument("--models", nargs="+", default=["stories260k", "smollm2-135m"], help="models to measure")
    p.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0, 4.0], choices=[2.5, 3.0, 4.0],
                   help="all-in bit budgets of the packed exports")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy decode length")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill prompt length")
    p.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--skip-reference", action="store_true", help="leave out the (slow) pure-torch reference path")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "lqlr" / "bench-inference"),
                   help="where the fp32 copies and compressed exports are made once and reused")
    p.add_argument("--quick", action="store_true", help="stories260K only")
    p.add_argument("--path", nargs="+", default=None,
                   help="time these exports instead (against their source model in fp32); --models/--bits are ignored")
    p.add_argument("--kernel", default="auto", help="kernel of the --path exports (auto, packed, reference, dense-*)")
    p.add_argument("--name", default=None, help="results file name (default: inference, or inference_quick)")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p = sub.add_parser("proxy", help="Spearman of the allocator's cost proxy against full decompositions (SmolLM2)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29], help="decoder blocks whose matrices are measured")
    p.add_argument("--iters", type=int, default=5, help="outer iterations of the full decompositions")
    p.add_argument("--cost-rows", type=int, default=256, help="rows of the proxy's Q step")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p = sub.add_parser("scale", help="7B–70B shapes lazily: time and memory per block and stage, projections, resume")
    p.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3-8b", "llama2-70b"],
                   help="shapes of lqlr.bench.synthetic.SHAPES")
    p.add_argument("--methods", nargs="+", default=["gptq", "lqlr", "auto"], choices=["gptq", "lqlr", "auto"])
    p.add_argument("--blocks", type=int, default=2, help="decoder blocks written and compressed per shape")
    p.add_argument("--blocks-70b", type=int, default=1, help="blocks of the 70B shape")
    p.add_argument("--bits", type=float, default=3.0, help="all-in budget (bits per parameter)")
    p.add_argument("--n-samples", type=int, default=8, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--skip-resume-check", action="store_true", help="leave out the kill-after-one-block resume check")
    p.add_argument("--quick", action="store_true", help="the tiny shape only (a smoke test)")
    p.add_argument("--collect-only", action="store_true",
                   help="run nothing: gather the per-method records an earlier (interrupted) run left in --work-dir")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "lqlr" / "bench-scale"),
                   help="where the synthetic checkpoints and exports are written (tens of GB for the full run)")
    p.add_argument("--name", default=None, help="results file name (default: scale, or scale_quick)")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p = sub.add_parser("load", help="peak RSS and time of from_pretrained(export) against lqlr.load, in child processes")
    p.add_argument("--path", nargs="+", required=True, help="one or more lqlr exports")
    p.add_argument("--loaders", nargs="+", default=["from_pretrained", "lqlr.load"],
                   choices=["from_pretrained", "lqlr.load"], help="how each export is loaded (one child per loader)")
    p.add_argument("--dtypes", nargs="+", default=["default"], choices=["default", "float32", "float16", "bfloat16"],
                   help="from_pretrained's dtype= (default: none given, i.e. float32); one record per dtype")
    p.add_argument("--warmup", default="auto",
                   help="export each child loads first, outside the measurement: auto (a tiny stories260K export "
                        "made once under --work-dir), none, or a path")
    p.add_argument("--repeats", type=int, default=3, help="children per export and loader (best time, worst peak)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one child may take")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "lqlr" / "bench-load"),
                   help="where the warm-up export is made once")
    p.add_argument("--name", default="load", help="results file name (default: load)")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p = sub.add_parser("gguf-speed", help="decode speed in llama.cpp of lqlr-GGUF (± lora.gguf) against its own quants")
    p.add_argument("--model", default="smollm2-135m", help="model name (configs/model); llama.cpp rows: smollm2-135m")
    p.add_argument("--types", nargs="+", default=["q4_0"], help="GGUF types with lqlr-bench gguf rows in --work-dir")
    p.add_argument("--rank", type=int, default=16, help="rank of the lqlr-bench gguf rank rows to time")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp and torch threads")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated (timed)")
    p.add_argument("--repeats", type=int, default=3, help="runs per row (the fastest kept)")
    p.add_argument("--skip-llamacpp-quants", action="store_true", help="leave out llama.cpp's own F32 and quants")
    p.add_argument("--skip-python", action="store_true", help="leave out the transformers and lqlr kernel rows")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "lqlr" / "bench-gguf"),
                   help="lqlr-bench gguf's work folder (its GGUF files; llama.cpp's quants go to speed/)")
    p.add_argument("--name", default="gguf_speed", help="results file name (default: gguf_speed)")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p = sub.add_parser("gguf", help="lqlr-GGUF with and without its LoRA against llama-quantize (± imatrix), same eval")
    p.add_argument("--model", default="smollm2-135m", help="model name (configs/model); llama.cpp rows: smollm2-135m")
    p.add_argument("--types", nargs="+", default=["q4_0", "iq4_nl", "q5_0"],
                   help="GGUF types (q4_0 q4_1 q5_0 q5_1 q8_0 iq4_nl)")
    p.add_argument("--rank", type=int, default=8, help="rank of the lqlr-GGUF Q + L·R rows (f16 factors)")
    p.add_argument("--lqlr-types", nargs="*", default=None, help="types that get lqlr's rows (default: all --types)")
    p.add_argument("--lora-types", nargs="*", default=None,
                   help="types that get the rank rows (default: the --lqlr-types; none when given empty)")
    p.add_argument("--rank-iters", type=int, default=None, help="outer iterations of the rank rows (default: the preset's 5)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="lqlr's rows visit the input columns by decreasing diag H (method.act_order=true; default)")
    p.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    p.add_argument("--max-windows", type=int, default=4, help="WikiText-2 test windows")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    p.add_argument("--skip-llamacpp", action="store_true", help="leave out llama.cpp's rows")
    p.add_argument("--skip-lqlr", action="store_true", help="leave out lqlr's rows")
    p.add_argument("--llamacpp-rows", default=None, metavar="GGUF_JSON",
                   help="take llama.cpp's rows from this earlier results file (same model and windows) instead of "
                        "running llama-quantize")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "lqlr" / "bench-gguf"),
                   help="exports, GGUF files and finished rows (a rerun runs only the missing rows)")
    p.add_argument("--name", default="gguf", help="results file name (default: gguf)")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    torch.manual_seed(0)
    if getattr(args, "iters", 0) is None:
        args.iters = 5 if getattr(args, "quick", False) else 20
    if args.bench == "distortion":
        _distortion(args)
    elif args.bench == "inference":
        _inference(args)
    elif args.bench == "proxy":
        from lqlr.bench import proxy

        proxy.main(args)
    elif args.bench == "scale":
        from lqlr.bench import scale

        if args.quick:
            args.shapes, args.n_samples, args.seq_len = ["tiny"], 4, 64
        args.name = args.name or ("scale_quick" if args.quick else "scale")
        scale.main(args)
    elif args.bench == "load":
        from lqlr.bench import load

        if args.repeats < 1:
            parser.error(f"--repeats {args.repeats}: run each loader at least once")
        try:
            for path in args.path + ([] if args.warmup in ("auto", "none") else [args.warmup]):
                load.check_export(path)
        except ValueError as err:
            parser.error(str(err))
        load.main(args)
    elif args.bench == "gguf":
        from lqlr.bench import gguf

        try:
            gguf.main(args)
        except ValueError as err:
            parser.error(str(err))
    elif args.bench == "gguf-speed":
        from lqlr.bench import gguf_speed

        try:
            gguf_speed.main(args)
        except ValueError as err:
            parser.error(str(err))
    elif args.bench == "quality":
        from lqlr.bench.quality import main_args

        if args.add and not args.from_json:
            parser.error("--add puts runs into an existing results file: give it with --from-json")
        try:
            main_args(args)
        except ValueError as err:
            parser.error(str(err))


if __name__ == "__main__":
    main()
