"""transformers-only loading: import lqlr; AutoModelForCausalLM.from_pretrained(export); PeftModel.from_pretrained(...)."""
import json
import subprocess
import sys

import pytest
import torch

import lqlr
from lqlr.config import CompressConfig
from lqlr.engine.blocks import compress_model
from lqlr.io.export import IntegrityError, save_compressed
from lqlr.nn.layer import DenseWeight, QLRLinear


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _tiny(arch):
    """A tiny randomly initialised model of each family lqlr supports (lqlr/core/arch.py), built locally."""
    import transformers as T

    torch.manual_seed(0)
    common = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300,
              "max_position_embeddings": 128}
    cfg = {
        "llama": lambda: T.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common),
        "qwen2": lambda: T.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common),
        "qwen3": lambda: T.Qwen3Config(intermediate_size=128, num_key_value_heads=2, head_dim=16, **common),
        "mistral": lambda: T.MistralConfig(intermediate_size=128, num_key_value_heads=2, **common),
        "gemma": lambda: T.GemmaConfig(intermediate_size=128, num_key_value_heads=2, head_dim=16, **common),
        "gemma2": lambda: T.Gemma2Config(intermediate_size=128, num_key_value_heads=2, head_dim=16, **common),
        "phi": lambda: T.PhiConfig(intermediate_size=128, **common),
        "phi3": lambda: T.Phi3Config(intermediate_size=128, num_key_value_heads=2, pad_token_id=0, **common),
        "opt": lambda: T.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **common),
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=64),
        "gpt_neox": lambda: T.GPTNeoXConfig(intermediate_size=128, **common),
    }[arch]()
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def _export(model, out, untouched_dtype="float32"):
    vocab = model.config.vocab_size
    calib = torch.randint(3, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(qlr=lqlr.QLRConfig(bq=2, rank=4, bl=4, br=4, group_size=32, iters=1, incoherence=True))
    reports = compress_model(model, calib, cfg, progress=False)
    return save_compressed(model, out, source={"model": "tiny"}, reports=reports, untouched_dtype=untouched_dtype)


@pytest.fixture(scope="module")
def export(stories_export):
    """The session's shared stories260K export (tests/conftest.py): read only."""
    return stories_export


PROBE = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1))


def _packed(model):
    return {f"{n}.{b}": t.clone() for n, m in model.named_modules() if isinstance(m, QLRLinear)
            for b, t in m.named_buffers(recurse=False)}


def test_config_json_names_the_quant_method_and_the_manifest(export):
    config = json.loads((export / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "lqlr", "format_version": 1, "manifest": "manifest.json"}
    assert "import lqlr" in config["transformers_weights"]


def test_from_pretrained_matches_lqlr_load(export):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(export)
    ours = lqlr.load(export)
    layers = {n: m for n, m in hf.named_modules() if isinstance(m, QLRLinear)}
    assert len(layers) == 35 and all(m.rank == 4 for m in layers.values())
    with torch.no_grad():
        assert _rel(hf(PROBE).logits, ours(PROBE).logits) <= 1e-6
    packed, again = _packed(hf), _packed(ours)
    assert packed.keys() == again.keys() and all(torch.equal(packed[k], again[k]) for k in packed)
    assert all(packed[k].dtype == again[k].dtype for k in packed)  # uint8 codes, fp16 scales: as stored
    assert not any(f"{n}.weight" in hf.state_dict() for n in layers)  # no dense weight anywhere
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in hf.parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi", "phi3", "opt",
                                  "gpt2", "gpt_neox"])
def test_from_pretrained_matches_lqlr_load_on_every_architecture(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny(arch)
    out = _export(model, tmp_path / arch)
    probe = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert any(isinstance(m, QLRLinear) for m in hf.modules())
    with torch.no_grad():
        ref = lqlr.load(out)(probe).logits
        assert _rel(hf(probe).logits, ref) <= 1e-6
        assert _rel(ref, model(probe).logits) <= 1e-5  # and both are the compressed model


def test_from_pretrained_never_builds_a_dense_weight(export, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lqlr.core.grids import QuantizedTensor

    calls = []
    original = QuantizedTensor.dequantize
    monkeypatch.setattr(QuantizedTensor, "dequantize", lambda self: calls.append(self.shape) or original(self))
    model = AutoModelForCausalLM.from_pretrained(export)
    assert calls == []
    with torch.no_grad():
        model(PROBE)  # the packed kernel (or the reference path, transiently) computes; nothing kept
    assert not any(isinstance(getattr(m, "_merged", None), torch.Tensor) for m in model.modules())


def test_from_pretrained_verifies_the_checksums(stories_export_copy):
    from transformers import AutoModelForCausalLM

    copy = stories_export_copy
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors does not match its sha256"):
        AutoModelForCausalLM.from_pretrained(copy)


def test_without_import_lqlr_transformers_refuses_the_export_and_says_what_to_do(export):
    code = ("import sys\n"
            "from transformers import AutoModelForCausalLM\n"
            f"try:\n    AutoModelForCausalLM.from_pretrained({str(export)!r})\n"
            "except Exception as err:\n"
            "    assert 'lqlr' not in sys.modules, 'lqlr was imported'\n"
            "    print('REFUSED', type(err).__name__, err)\n"
            "    sys.exit(3)\n"
            "print('LOADED')\n")
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stdout + run.stderr[-2000:]  # never a model with random weights
    assert "REFUSED" in run.stdout and "run `import lqlr` before from_pretrained" in run.stdout


def test_save_pretrained_writes_an_export_that_loads_to_the_same_model(export, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export)
    out = model.save_pretrained(tmp_path / "again")
    new, old = (json.loads((d / "manifest.json").read_text()) for d in (out, export))
    for name in ("model.safetensors", "config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).read_bytes() == (export / name).read_bytes(), name  # byte for byte
        assert new["files"][name] == old["files"][name]
    assert new["modules"] == old["modules"] and new["summary"] == old["summary"] and new["source"] == old["source"]
    again = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(again(PROBE).logits, model(PROBE).logits, rtol=0, atol=0)
    before, after = _packed(model), _packed(again)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_peft_from_pretrained_on_the_packed_base(export, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(export)
    with torch.no_grad():
        full = base(PROBE).logits  # Q + L R
    model = PeftModel.from_pretrained(base, str(export / "adapter"), is_trainable=True)
    ours = lqlr.load(export, peft=True)
    with torch.no_grad():
        logits = model(PROBE).logits
        assert _rel(logits, ours(PROBE).logits) <= 1e-6  # the adapter is L·R, the wrapped base Q alone
        assert _rel(logits, full) <= 1e-5
        with model.disable_adapter():  # the base without its adapter: Q only
            assert _rel(model(PROBE).logits, full) > 1e-3
        stock_on_ours = PeftModel.from_pretrained(lqlr.load(export), str(export / "adapter"))  # same rule there
        assert _rel(stock_on_ours(PROBE).logits, logits) <= 1e-6
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    merged = model.merge_and_unload()
    layers = [m for m in merged.modules() if isinstance(m, QLRLinear)]
    assert layers and all(m.merged for m in layers)
    with torch.no_grad():
        assert _rel(merged(PROBE).logits, full) <= 1e-5
    with pytest.raises(ValueError, match="merged dense weight"):
        merged.save_pretrained(tmp_path / "merged")


def test_weight_reads_no_dense_tensor_until_used(export, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export)
    layer = model.model.layers[0].mlp.down_proj
    expected = layer.dequantize()
    calls = []
    monkeypatch.setattr(QLRLinear, "effective_weight", lambda self: calls.append(1) or torch.zeros(0))
    monkeypatch.setattr(QLRLinear, "dequantize", lambda self: calls.append(1) or torch.zeros(0))
    monkeypatch.setattr(QLRLinear, "q_weight", lambda self: calls.append(1) or torch.zeros(0))
    w = layer.weight
    assert isinstance(w, DenseWeight)
    assert (w.shape, w.device, w.dtype, w.ndim, w.size(0)) == (torch.Size([64, 172]), torch.device("cpu"), torch.float32, 2, 64)
    peft_model = PeftModel.from_pretrained(model, str(export / "adapter"))  # PEFT reads weight.device/.dtype
    assert calls == [] and peft_model is not None
    monkeypatch.undo()
    torch.testing.assert_close(layer.weight @ torch.eye(172), layer.q_weight())  # explicit use: Q (wrapped now)
    torch.testing.assert_close(torch.as_tensor(layer.weight.detach()), layer.q_weight())
    assert expected.shape == (64, 172)


def test_dequantize_gives_a_dense_model_with_the_same_logits(export):
    from torch import nn
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export)
    with torch.no_grad():
        packed = model(PROBE).logits
    dense = model.dequantize()
    assert not any(isinstance(m, QLRLinear) for m in dense.modules())
    assert isinstance(dense.model.layers[0].mlp.down_proj, nn.Linear)
    with torch.no_grad():
        assert _rel(dense(PROBE).logits, packed) <= 1e-5
