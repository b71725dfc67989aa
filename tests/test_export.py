"""Compress → export → load: lqlr.load, lqlr.load(peft=True) and stock PEFT on dense/ agree."""
import json

import pytest
import torch

import lqlr
from lqlr.config import CompressConfig
from lqlr.engine.blocks import compress_model
from lqlr.io.export import IntegrityError, read_manifest, save_compressed
from lqlr.io.load import load


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _tiny(arch):
    """A tiny randomly initialised model of each supported family, built locally (no download)."""
    import transformers as T

    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300, max_position_embeddings=128)
    cfg = {
        "qwen2": lambda: T.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common),
        "mistral": lambda: T.MistralConfig(intermediate_size=128, num_key_value_heads=2, **common),
        "gemma": lambda: T.GemmaConfig(intermediate_size=128, num_key_value_heads=2, head_dim=16, **common),
        "phi": lambda: T.PhiConfig(intermediate_size=128, **common),
        "opt": lambda: T.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **common),
    }[arch]()
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def _stories():
    from lqlr.engine.models import load_model

    return load_model("stories260k")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


ARCHS = ["stories260k", "gpt2", "qwen2", "mistral", "gemma", "phi", "opt"]


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, tmp_path_factory):
    tokenizer = None
    if request.param == "stories260k":
        model, tokenizer = _stories()
    else:
        model = _tiny_gpt2() if request.param == "gpt2" else _tiny(request.param)
    vocab = model.config.vocab_size
    calib = torch.randint(3, vocab, (8, 48), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(qlr=lqlr.QLRConfig(bq=2, rank=4, bl=4, br=4, group_size=32, iters=2, incoherence=True))
    reports = compress_model(model, calib, cfg, progress=False)
    out = save_compressed(model, tmp_path_factory.mktemp(request.param), source={"model": request.param},
                          reports=reports, tokenizer=tokenizer, dense_base=True, untouched_dtype="float32")
    probe = torch.randint(3, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(probe).logits
    return request.param, model, reports, out, probe, logits


def test_reload_reproduces_the_compressed_model(exported):
    from lqlr.core.arch import find_blocks, is_linear
    from lqlr.nn.layer import QLRLinear

    _, model, reports, out, probe, logits = exported
    path, blocks = find_blocks(model)
    dense_left = [n for n, m in blocks.named_modules() if is_linear(m) and not isinstance(m, QLRLinear)]
    assert not dense_left and len(reports) > 0  # every linear inside the blocks was compressed
    loaded = load(out)
    with torch.no_grad():
        assert _rel(loaded(probe).logits, logits) < 1e-5
    assert len(reports) == len(read_manifest(out)["modules"])


def test_peft_paths_agree(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, _, out, probe, logits = exported
    ours = load(out, peft=True)
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "dense"), out / "adapter")
    with torch.no_grad():
        assert _rel(ours(probe).logits, logits) < 1e-5
        assert _rel(stock(probe).logits, logits) < 1e-5
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_adapter_config_gives_scale_one(exported):
    _, _, reports, out, _, _ = exported
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and not cfg["use_rslora"] and cfg["lora_dropout"] == 0
    assert set(cfg["target_modules"]) == {r.name for r in reports}


def test_manifest_checksums_catch_corruption(exported, tmp_path):
    import shutil

    _, _, _, out, _, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors does not match its sha256"):
        load(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["../outside.bin"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="outside"):
        read_manifest(copy, verify=False)


def test_targets_select_a_subset(tmp_path):
    from lqlr.nn.layer import QLRLinear

    model = _tiny("qwen2")
    calib = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(qlr=lqlr.QLRConfig(bq=4, rank=0, group_size=32), targets=["q_proj", "down_proj"])
    reports = compress_model(model, calib, cfg, progress=False)
    assert sorted({r.name.split(".")[-1] for r in reports}) == ["down_proj", "q_proj"]
    assert isinstance(model.model.layers[1].mlp.down_proj, QLRLinear)
    assert not isinstance(model.model.layers[1].mlp.up_proj, QLRLinear)
    with pytest.raises(ValueError, match="match no linear"):
        compress_model(_tiny("qwen2"), calib, CompressConfig(targets=["nothing_like_this"]), progress=False)


def test_evaluate_an_export(exported):
    name, _, _, out, _, _ = exported
    if name != "stories260k":
        pytest.skip("WikiText-2 perplexity needs the stories260K tokenizer")
    result = lqlr.evaluate(out, seq_len=128, max_windows=2)
    assert result["ppl"] > 1 and result["kl"] > 0 and result["eval_tokens"] == 256
    assert result["bits_per_param"] == pytest.approx(read_manifest(out)["summary"]["bits_per_param"])


def test_default_export_stores_untouched_tensors_in_16_bits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lqlr.eval.metrics import size_on_disk

    model = _tiny("qwen2")
    calib = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    compress_model(model, calib, CompressConfig(qlr=lqlr.QLRConfig(bq=3, rank=4, group_size=32, iters=1)), progress=False)
    half = save_compressed(model, tmp_path / "half", source={"model": "qwen2"}, dense_base=True)
    full = save_compressed(model, tmp_path / "full", source={"model": "qwen2"}, untouched_dtype="float32")
    assert (half / "model.safetensors").stat().st_size < 0.75 * (full / "model.safetensors").stat().st_size
    probe = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(probe).logits
        ours = load(half)(probe).logits
        stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(half / "dense"), half / "adapter")(probe).logits
    assert _rel(stock, ours) < 1e-5  # both read the same rounded tensors
    assert 0 < _rel(ours, ref) < 1e-2  # 16-bit embeddings: close, not identical
    loaded = load(half)
    stored = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
    dense_fp32 = sum(p.numel() * 4 for p in _tiny("qwen2").parameters())
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert stored < 0.5 * dense_fp32  # compressed linears stay packed in memory
    assert size_on_disk(half) > 0


def test_lm_head_can_be_compressed_and_untied(tmp_path):
    from lqlr.nn.layer import QLRLinear

    model, tok = _stories()
    assert model.config.tie_word_embeddings
    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(qlr=lqlr.QLRConfig(bq=4, rank=0, group_size=32), targets=["q_proj"], lm_head=True)
    reports = compress_model(model, calib, cfg, progress=False)
    assert reports[-1].name == "lm_head" and reports[-1].shape == (512, 64)
    assert isinstance(model.lm_head, QLRLinear) and not isinstance(model.model.embed_tokens, QLRLinear)
    out = save_compressed(model, tmp_path / "x", source={"model": "stories260k"}, untouched_dtype="float32")
    probe = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(load(out)(probe).logits, model(probe).logits) < 1e-5
