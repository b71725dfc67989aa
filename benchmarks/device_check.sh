#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and no network (run from the repository root):
#   bash benchmarks/device_check.sh
# 1. every test marked `cuda` (tests/test_devices.py: decompose, the layer, the Hessian capture and a whole
#    stories260K compression on the GPU, each against the CPU result);
# 2. lqlr-bench scale on Llama-2-7B shapes (2 synthetic blocks, lazily; GPTQ, the default method and the
#    allocator on the GPU): per-block time per stage, peak GPU memory, whole-model projections;
# 3. the 4096 × 4096 decomposition timed on the GPU and on the CPU (lqlr/bench/distortion.py's timing record).
# Under 8 minutes on one H200-class GPU.
# It needs torch with CUDA, transformers, peft, safetensors, scipy, tqdm and pytest; not Hydra, gguf or
# bitsandbytes. Results go to ${OUT:-results/device}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/device}"
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch: this check is for a GPU machine"
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))
PY
python -c "import pytest" 2>/dev/null || { echo "pytest is missing: pip install --no-index <a carried pytest wheel>"; exit 2; }
timeout 150 python -m pytest -q -p no:cacheprovider -m cuda tests/test_devices.py 2>&1 | tee "$OUT/cuda_tests.txt"
timeout 270 python -c "from lqlr.bench import main; main()" scale --shapes llama2-7b --blocks 2 --device cuda \
  --skip-resume-check --work-dir "${TMPDIR:-/tmp}/lqlr-scale" --out "$OUT" 2>&1 | tail -n 20 | tee "$OUT/scale.txt" || true
timeout 150 python - "$OUT" <<'PY'
import json, sys, time
import torch
import lqlr

def timed(device):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4096, 4096, generator=gen)
    X = torch.randn(4096, 8192, generator=gen)
    H = X @ X.T / X.shape[1]
    W, H = W.to(device), H.to(device)
    cfg = lqlr.QLRConfig(bq=2, rank=64, bl=4, br=4, group_size=64, iters=5, incoherence=True)
    lqlr.decompose(W[:256, :256], H[:256, :256], cfg)  # warm up kernels and caches
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    d = lqlr.decompose(W, H, cfg)
    if device == "cuda":
        torch.cuda.synchronize()
    rec = {"device": device, "shape": [4096, 4096], "config": cfg.to_dict(), "seconds": time.perf_counter() - t0,
           "rel_h_error": d.error, "bits_per_param": d.bits_per_param}
    if device == "cuda":
        rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return rec

records = [timed("cuda"), timed("cpu")]
print(json.dumps(records, indent=1))
open(f"{sys.argv[1]}/decompose_4096.json", "w").write(json.dumps(records, indent=1))
PY
