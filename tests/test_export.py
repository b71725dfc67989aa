"""Compress → export → load: lqlr.load, lqlr.load(peft=True) and stock PEFT on dense/ agree."""
import json

import pytest
import torch

import lqlr
from lqlr.compress import CompressConfig, compress_model
from lqlr.export import IntegrityError, load, read_manifest, save_compressed


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _stories():
    from lqlr.models import load_model

    return load_model("stories260k")[0]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=["stories260k", "gpt2"])
def exported(request, tmp_path_factory):
    model = _stories() if request.param == "stories260k" else _tiny_gpt2()
    vocab = model.config.vocab_size
    calib = torch.randint(3, vocab, (8, 48), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(qlr=lqlr.QLRConfig(bq=2, rank=4, bl=4, br=4, group_size=32, iters=2, incoherence=True))
    reports = compress_model(model, calib, cfg, progress=False)
    out = save_compressed(model, tmp_path_factory.mktemp(request.param), source={"model": request.param},
                          reports=reports, dense_base=True)
    probe = torch.randint(3, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(probe).logits
    return request.param, model, reports, out, probe, logits


def test_reload_reproduces_the_compressed_model(exported):
    _, model, reports, out, probe, logits = exported
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
