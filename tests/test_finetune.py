"""Fine-tuning the exported adapter: gradients reach only LoRA weights and match stock PEFT on the
dense Q; the packed base stays packed; save → load is exact; requantization keeps the bits."""
import json
import math

import pytest
import torch
from safetensors import safe_open

import lqlr
from lqlr.config import CompressConfig
from lqlr.core.bits import SEED_BITS
from lqlr.engine.blocks import compress_model
from lqlr.finetune.lora import lora_factors, prepare
from lqlr.finetune.merge import merge_adapter
from lqlr.finetune.requantize import RequantizeConfig, requantize_adapter, requantize_factors
from lqlr.finetune.train import FinetuneConfig, lr_factor, train
from lqlr.io.export import read_manifest, save_compressed
from lqlr.io.load import load
from lqlr.nn.layer import QLRLinear


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from lqlr.engine.models import load_model

    model, tokenizer = load_model("stories260k")
    calib = torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(qlr=lqlr.QLRConfig(bq=2, rank=4, bl=4, br=4, group_size=32, iters=2, incoherence=True))
    reports = compress_model(model, calib, cfg, progress=False)
    return save_compressed(model, tmp_path_factory.mktemp("ft") / "s", source={"model": "stories260k"}, reports=reports,
                           tokenizer=tokenizer, dense_base=True, untouched_dtype="float32")


def _windows(n, seq_len=32, seed=0):
    return torch.randint(3, 512, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def _stock(export, adapter, trainable=False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export / "dense"), str(adapter),
                                     is_trainable=trainable)


@pytest.fixture(scope="module")
def trained(export, tmp_path_factory):
    model = prepare(export)
    res = train(model, _windows(12), FinetuneConfig(steps=6, batch_size=2, seq_len=32, lr=5e-3, warmup_steps=1),
                progress=False)
    adapter = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(adapter)
    return model, adapter, res


def test_gradients_reach_only_lora_and_match_stock_peft_on_dense_q(export):
    ours = prepare(export)
    stock = _stock(export, export / "adapter", trainable=True)
    batch = _windows(2, 24)
    for m in (ours, stock):
        m.train()
        m(input_ids=batch, labels=batch).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads and all(".lora_A." in n or ".lora_B." in n for n in grads)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)
    stock_grads = {n: p.grad for n, p in stock.named_parameters() if p.grad is not None}
    assert set(stock_grads) == set(grads)
    for n, g in grads.items():  # gradient through the packed, rotated Q' = gradient through the dense Q
        assert float(g.abs().max()) > 0, n
        assert _rel(g, stock_grads[n]) < 1e-4, n


def test_autograd_never_keeps_a_dense_q(export):
    from lqlr.core.incoherence import hadamard

    ours = prepare(export)
    q_shapes = {(m.out_features, m.in_features) for m in ours.modules() if isinstance(m, QLRLinear)}

    def is_hadamard(t):  # the shared, cached H_p of the incoherence rotation (p × p), not a weight
        return t.ndim == 2 and t.shape[0] == t.shape[1] and t.data_ptr() == hadamard(t.shape[0]).data_ptr()

    def saved_q(model):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            batch = _windows(3, 7)  # 21 tokens: no activation shape equals a weight shape
            model(input_ids=batch, labels=batch).loss.backward()
        return [tuple(t.shape) for t in seen if tuple(t.shape) in q_shapes and not is_hadamard(t)]

    assert saved_q(ours) == []
    dense = _stock(export, export / "adapter", trainable=True)  # control: a dense base does save its weights
    assert len(saved_q(dense)) > 0


def test_training_moves_only_the_adapter_and_lowers_the_loss(export, trained):
    model, _, res = trained
    base = load(export)
    packed = {n: m.q_codes for n, m in base.named_modules() if isinstance(m, QLRLinear)}
    for name, m in model.named_modules():
        if isinstance(m, QLRLinear):
            assert torch.equal(m.q_codes, packed[name.removeprefix("base_model.model.").removesuffix(".base_layer")])
    start = lora_factors(prepare(export))
    moved = [n for n, (B, A) in lora_factors(model).items() if not torch.equal(B, start[n][0])]
    assert len(moved) == len(start)
    assert len(res.losses) == 6 and all(math.isfinite(x) for x in res.losses)
    assert res.losses[-1] < res.losses[0]


def test_gradient_checkpointing_gives_the_same_training(export):
    def checkpointing(model):
        base = model.get_base_model()
        flag = getattr(base, "is_activation_checkpointing", None)  # transformers 5; 4: is_gradient_checkpointing
        return base.is_gradient_checkpointing if flag is None else flag

    cfg = dict(steps=3, batch_size=2, seq_len=32, lr=5e-3, warmup_steps=0)
    plain = train(prepare(export), _windows(6), FinetuneConfig(**cfg), progress=False)
    model, seen = prepare(export), []
    ckpt = train(model, _windows(6), FinetuneConfig(**cfg, gradient_checkpointing=True),
                 on_step=lambda step, loss: seen.append(checkpointing(model)), progress=False)
    assert seen == [True] * 3 and not checkpointing(model)  # on while training, off again after
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)


def test_saved_adapter_reloads_to_identical_logits(export, trained):
    model, adapter, _ = trained
    probe = _windows(2, 40, seed=3)
    with torch.no_grad():
        ref = model(probe).logits
        assert torch.equal(load(export, peft=True, adapter=adapter)(probe).logits, ref)
        assert _rel(_stock(export, adapter)(probe).logits, ref) < 1e-5


def test_zero_init_starts_at_the_q_only_model(export):
    model = prepare(export, init="zero")
    cfg = json.loads((export / "adapter" / "adapter_config.json").read_text())
    B = {n: b for n, (b, a) in lora_factors(model).items()}
    assert set(B) == set(cfg["target_modules"]) and all(float(b.abs().max()) == 0 for b in B.values())
    q_only = load(export)
    for name, m in list(q_only.named_modules()):
        if isinstance(m, QLRLinear) and m.rank > 0:
            from lqlr.core.arch import set_module

            set_module(q_only, name, m.without_factors())
    probe = _windows(2, 20)
    with torch.no_grad():
        assert torch.equal(model(probe).logits, q_only(probe).logits)
    with pytest.raises(ValueError, match="init=zero"):
        prepare(export, init="export", base="fp32")


def test_requantize_keeps_bits_and_matches_its_adapter(export, trained, tmp_path):
    model, adapter, _ = trained
    out = tmp_path / "rq"
    record = requantize_adapter(export, adapter, out, info={"steps": 6})
    old, new = read_manifest(export), read_manifest(out)  # verifies every new sha256
    assert new["summary"] == old["summary"] and new["finetune"]["steps"] == 6
    shapes = {}
    for path in (export, out):
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            shapes[path] = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    assert shapes[export] == shapes[out]  # same packed sizes: same all-in bits on disk
    # independent count: stored bits of Q, L, R (codes, scales, zeros) over the parameters ≈ manifest bits
    stored = 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            if k.rsplit(".", 1)[0] in new["modules"] and k.rsplit(".", 1)[1][:2] in ("q_", "l_", "r_"):
                t = f.get_tensor(k)
                stored += t.numel() * t.element_size() * 8
    stored += SEED_BITS * sum(1 for e in new["modules"].values() if e["spec"].get("rotation"))  # seeds: in the JSON
    params = new["summary"]["compressed_params"]
    assert stored / params == pytest.approx(new["summary"]["bits_per_param"], abs=2e-3)  # byte padding
    changed = sum(not torch.equal(a, b) for a, b in zip(
        [m.l_codes for m in load(export).modules() if isinstance(m, QLRLinear) and m.rank],
        [m.l_codes for m in load(out).modules() if isinstance(m, QLRLinear) and m.rank]))
    assert changed > 0
    trained_f = lora_factors(model)
    probe = _windows(2, 40, seed=4)
    with torch.no_grad():
        packed = load(out)(probe).logits  # Q + requantized L R from the packed base
        assert _rel(load(out, peft=True)(probe).logits, packed) < 1e-5  # adapter/ = the packed factors
        tuned, before = model(probe).logits, load(export)(probe).logits
    # on their 4-bit grids the trained factors keep most of what training changed
    assert _rel(packed, tuned) < 0.5 * _rel(before, tuned)
    assert record["rel_error_max"] < 0.5 and len(new["modules"]) >= len(trained_f)


def test_requantized_factors_beat_rounding_each_factor(export, trained):
    """The H = I alternation (method=frobenius) is never worse than rounding L' and R' independently."""
    from lqlr.core.grids import make_grid, quantize_rtn

    base = load(export)
    ours = naive = 0.0
    for name, (B, A) in lora_factors(trained[0]).items():
        m = base.get_submodule(name)
        copy = QLRLinear(m.in_features, m.out_features, m.spec)
        copy.load_packed({**m.packed_tensors(), **requantize_factors(B, A, m, cfg=RequantizeConfig(method="frobenius"))[0]})
        L, R = copy.factors()
        rot = m.incoherence
        Ls, Rs = rot.U.apply(B.T).T, rot.V.apply(A)  # the stored basis
        grid = lambda s: make_grid(s["kind"], s["bits"], s["group_size"])  # noqa: E731
        Ln = quantize_rtn(Ls, grid(m.spec["l"])).dequantize()
        Rn = quantize_rtn(Rs, grid(m.spec["r"])).dequantize()
        ours += float(torch.linalg.norm(L @ R - B @ A) ** 2)
        naive += float(torch.linalg.norm(Ln @ Rn - Ls @ Rs) ** 2)
    assert ours < naive
    with pytest.raises(ValueError, match="rank"):
        requantize_factors(B[:, :1], A[:1], m, cfg=RequantizeConfig(method="frobenius"))
    with pytest.raises(ValueError, match="needs the layer's H"):
        requantize_factors(B, A, m)


def test_merge_gives_a_plain_model_with_the_adapter_logits(export, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    model, adapter, _ = trained
    merged = merge_adapter(export, adapter, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged)
    probe = _windows(2, 40, seed=5)
    with torch.no_grad():
        assert _rel(plain(probe).logits, model(probe).logits) < 1e-5


def test_schedule_and_config_checks():
    cfg = FinetuneConfig(steps=10, warmup_steps=2)
    assert [round(lr_factor(s, cfg), 6) for s in (0, 1)] == [round(1 / 3, 6), round(2 / 3, 6)]
    assert lr_factor(2, cfg) == 1.0 and lr_factor(6, cfg) == pytest.approx(0.5)
    assert lr_factor(5, FinetuneConfig(steps=10, warmup_steps=2, schedule="constant")) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        FinetuneConfig(schedule="linear-ish")
    with pytest.raises(ValueError, match="steps"):
        FinetuneConfig(steps=0)


def test_the_documented_command_writes_a_loadable_adapter(export, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lqlr.cli import finetune as app

    app.register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(app.CONFIG_DIR)):
        dcfg = compose("finetune", overrides=[f"path={export}", f"output_dir={tmp_path / 'ft'}", "train.steps=3",
                                              "train.batch_size=2", "train.seq_len=64", "train.lr=5e-3",
                                              "eval.seq_len=128", "eval.max_windows=1", "progress=false"])
    record = app.run(OmegaConf.to_object(dcfg))
    assert record["reload_max_abs_diff"] == 0.0 and record["ppl_before"] > 1 and record["ppl_after"] > 1
    saved = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert len(saved["losses"]) == 3 and saved["peak_rss_train_mb"] > 0
    load(export, peft=True, adapter=tmp_path / "ft" / "adapter")
    with pytest.raises(Exception, match="schedule"):
        with initialize_config_dir(version_base="1.3", config_dir=str(app.CONFIG_DIR)):
            OmegaConf.to_object(compose("finetune", overrides=[f"path={export}", "train.schedule=sideways"]))


@pytest.mark.parametrize("chunk", [7, 32, 10_000])
def test_chunked_loss_equals_the_stock_loss_and_its_gradients(export, chunk):
    from lqlr.finetune.train import causal_lm_loss, trainable_parameters

    model = prepare(export)
    model.train()
    batch = _windows(3, 24, seed=5)
    stock = model(input_ids=batch, labels=batch, use_cache=False).loss  # transformers' own shift + mean CE
    params = trainable_parameters(model)
    g_stock = torch.autograd.grad(stock, params)
    calls = []
    hook = model.get_base_model().get_output_embeddings().register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    ours = causal_lm_loss(model, batch, chunk)
    hook.remove()
    assert len(calls) == math.ceil(3 * 23 / chunk)  # the head saw the tokens chunk by chunk, never all at once
    g_ours = torch.autograd.grad(ours, params)
    assert float(ours) == pytest.approx(float(stock), rel=1e-6)
    for a, b in zip(g_ours, g_stock):  # fp32, summed in another order: equal to rounding
        assert float(torch.linalg.norm(a - b)) <= 1e-4 * float(torch.linalg.norm(b)) + 1e-9
    assert causal_lm_loss(model, batch, 0).item() == pytest.approx(stock.item(), rel=1e-7)


def test_negative_loss_chunk_or_mmap_threshold_is_refused():
    with pytest.raises(ValueError, match="loss_chunk"):
        FinetuneConfig(loss_chunk=-1)
    with pytest.raises(ValueError, match="mmap_threshold_kb"):
        FinetuneConfig(mmap_threshold_kb=-1)


@pytest.mark.slow
def test_compare_script_passes_gradient_checkpointing_to_its_runs(export, tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("ft_compare", root / "experiments" / "finetune_compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    compare.RESULTS = tmp_path / "results"  # never the repository's results/
    compare.main(["--label", "tiny", "--lqlr", str(export), "--no-fp32", "--work", str(tmp_path / "w"), "--steps", "2",
                  "--batch-size", "2", "--seq-len", "32", "--eval-seq-len", "64", "--eval-windows", "1",
                  "--gradient-checkpointing"])
    run = json.loads((tmp_path / "w" / "lqlr" / "finetune.json").read_text())
    assert run["config"]["train"]["gradient_checkpointing"] is True and len(run["losses"]) == 2
    stored = json.loads((tmp_path / "results" / "finetune.json").read_text())["tiny"]
    assert stored["settings"]["gradient_checkpointing"] is True
    assert "gradient checkpointing" in (tmp_path / "results" / "finetune.md").read_text()
