import torch, copy, sys, time, lqlr
from lqlr.models import load_model
from lqlr.data import wikitext2_text, calibration_ids
from lqlr.compress import CompressConfig, compress_model
from lqlr.pipeline import budget_plan
from lqlr.eval import eval_windows, quality, dense_cache
ref, tok = load_model("smollm2-135m")
test = torch.tensor(tok(wikitext2_text("test"), add_special_tokens=False, verbose=False)["input_ids"])
win = eval_windows(test, 2048, 2)
wt = calibration_ids(tok, wikitext2_text("validation"), 32, 256, 0)
for label in sys.argv[1:]:
    m = copy.deepcopy(ref); t = time.time()
    if label == "rtn3": compress_model(m, wt, CompressConfig(qlr=lqlr.QLRConfig(bq=3, rank=0), use_hessian=False), progress=False)
    if label == "gptq3": compress_model(m, wt, CompressConfig(qlr=lqlr.QLRConfig(bq=3, rank=0)), progress=False)
    if label == "lqlr3":
        base = lqlr.QLRConfig(bq=2, rank=32, iters=5, incoherence=True)
        compress_model(m, wt, CompressConfig(qlr=base), plan=budget_plan(m, base, 3.0), progress=False)
    if label == "lqlr35":
        base = lqlr.QLRConfig(bq=3, rank=32, iters=5, incoherence=True)
        compress_model(m, wt, CompressConfig(qlr=base), plan=budget_plan(m, base, 3.5), progress=False)
    if label == "lqlr3sq":
        base = lqlr.QLRConfig(bq=2, rank=32, iters=5, incoherence=True, hessian_mode="independent") if False else lqlr.QLRConfig(bq=2, rank=32, iters=5, incoherence=True)
        compress_model(m, wt, CompressConfig(qlr=base, hessian_mode="independent"), plan=budget_plan(m, base, 3.0), progress=False)
    if label == "gptq3inc": compress_model(m, wt, CompressConfig(qlr=lqlr.QLRConfig(bq=3, rank=0, incoherence=True)), progress=False)
    if label == "gptq4": compress_model(m, wt, CompressConfig(qlr=lqlr.QLRConfig(bq=4, rank=0, group_size=128)), progress=False)
    with dense_cache(m):
        print(label, round(time.time()-t), {k: round(v, 4) for k, v in quality(m, ref, win).items()}, flush=True)
