"""A Q-only export (rank 0 everywhere) is still fine-tunable: a zero-initialised LoRA on the packed base."""
import json

import pytest
import torch

import lqlr
from lqlr.finetune.lora import QONLY_RANK, prepare
from lqlr.finetune.train import FinetuneConfig, train
from lqlr.io.export import save_adapter
from lqlr.nn.layer import QLRLinear


@pytest.fixture(scope="module")
def qonly(tmp_path_factory):
    out = tmp_path_factory.mktemp("qonly") / "q3"
    cfg = lqlr.CompressConfig(qlr=lqlr.QLRConfig(bq=3, rank=0, group_size=32, iters=1),
                              calibration=lqlr.CalibrationConfig(source="wikitext2", n_samples=4, seq_len=64))
    lqlr.compress("stories260k", cfg, output_dir=out, progress=False)
    return out


def test_a_q_only_export_writes_no_empty_adapter(qonly):
    assert not (qonly / "adapter").exists()  # PEFT cannot load an adapter that targets nothing
    manifest = json.loads((qonly / "manifest.json").read_text())
    assert all(m["spec"]["rank"] == 0 for m in manifest["modules"].values())
    assert not any(f.startswith("adapter/") for f in manifest["files"])


def test_peft_load_of_a_q_only_export_says_what_to_do(qonly):
    with pytest.raises(ValueError, match="Q-only export.*lora_rank=N"):
        lqlr.load(qonly, peft=True)
    with pytest.raises(ValueError, match="lora_rank=0"):
        lqlr.load(qonly, peft=True, lora_rank=0)


def test_zero_init_lora_starts_at_q_trains_and_reloads(qonly, tmp_path):
    from peft import PeftModel

    base = lqlr.load(qonly)
    model = lqlr.load(qonly, peft=True, lora_rank=4)
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)  # B = 0: exactly Q
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    layers = [m for m in model.modules() if isinstance(m, QLRLinear)]
    assert layers and all(m.rank == 0 for m in layers)
    codes = {id(m): m.q_codes.clone() for m in layers}
    windows = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    res = train(model, windows, FinetuneConfig(steps=4, batch_size=2, seq_len=32, lr=5e-3, warmup_steps=0,
                                               log_every=1), progress=False)
    assert res.losses[-1] < res.losses[0]
    assert all(torch.equal(codes[id(m)], m.q_codes) for m in layers)  # the packed Q codes are untouched
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        mine = model(ids).logits
        again = lqlr.load(qonly, peft=True, adapter=tmp_path / "adapter")(ids).logits
        stock = PeftModel.from_pretrained(lqlr.load(qonly), str(tmp_path / "adapter"))(ids).logits
    torch.testing.assert_close(again, mine, rtol=0, atol=0)
    torch.testing.assert_close(stock, mine, rtol=1e-6, atol=1e-6)


def test_finetune_prepare_defaults_to_a_zero_init_lora_on_a_q_only_export(qonly, caplog):
    with caplog.at_level("WARNING"):
        model = prepare(qonly)  # init=export: nothing to start from, so QLoRA style at the default rank
    assert "Q-only export" in caplog.text
    ranks = {m.lora_A["default"].weight.shape[0] for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert ranks == {QONLY_RANK}
    ranks = {m.lora_A["default"].weight.shape[0] for m in prepare(qonly, rank=3).modules()
             if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert ranks == {3}
    with pytest.raises(ValueError, match="Q-only export.*rank=<int>"):
        prepare(qonly, init="zero")


def test_save_adapter_refuses_a_model_without_factors(qonly, tmp_path):
    model = lqlr.load(qonly)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLRLinear)}
    with pytest.raises(ValueError, match="rank 0 everywhere"):
        save_adapter(layers, tmp_path / "adapter", base_name="x")
    assert not (tmp_path / "adapter").exists()
