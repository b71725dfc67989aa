"""Fine-tuning with stock tools on the packed base: transformers' Trainer, a plain torch loop, gradient checkpointing.

Each test: from_pretrained(export) + PeftModel.from_pretrained(adapter), a few steps on CPU on a few
hundred tokens of the shipped WikiText-2; the loss falls, the packed Q codes are bit-identical after
training, and the saved adapter reloads onto a fresh packed base to the same logits.
"""
import pytest
import torch

from lqlr.nn.layer import QLRLinear

SEQ, WINDOWS = 32, 16  # 512 tokens


@pytest.fixture(scope="module")
def export(stories_export):
    """The session's shared stories260K export (tests/conftest.py): read only."""
    return stories_export


@pytest.fixture(scope="module")
def windows(export):
    from transformers import AutoTokenizer

    from lqlr.calibrate.text import wikitext2_text

    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer(wikitext2_text("validation")[:20000], return_tensors="pt").input_ids[0]
    assert ids.numel() >= SEQ * WINDOWS
    return ids[: SEQ * WINDOWS].view(WINDOWS, SEQ)  # (16, 32)


def _peft(export):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export), str(export / "adapter"),
                                     is_trainable=True)


def _codes(model):
    return {f"{n}.{b}": t.clone() for n, m in model.named_modules() if isinstance(m, QLRLinear)
            for b, t in m.named_buffers(recurse=False)}


def _loss(model, windows):
    with torch.no_grad():
        return float(model(input_ids=windows, labels=windows).loss)


def _check_after_training(model, export, windows, codes, before, tmp_path):
    after = _loss(model, windows)
    assert after < before - 0.01, (before, after)
    now = _codes(model)
    assert now.keys() == codes.keys() and all(torch.equal(now[k], codes[k]) for k in codes)  # Q codes untouched
    model.save_pretrained(tmp_path / "adapter")
    again = _peft_adapter(export, tmp_path / "adapter")
    probe = windows[:2]
    with torch.no_grad():
        torch.testing.assert_close(again(probe).logits, model(probe).logits, rtol=0, atol=0)


def _peft_adapter(export, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export), str(adapter)).eval()


def _trainer(model, windows, tmp_path, **args):
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": w, "labels": w} for w in windows]
    targs = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4,
                              learning_rate=1e-2, warmup_steps=0, lr_scheduler_type="constant", logging_steps=1,
                              save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                              disable_tqdm=True, **args)
    return Trainer(model=model, args=targs, train_dataset=data)


def test_trainer_fine_tunes_the_adapter_on_the_packed_base(export, windows, tmp_path):
    model = _peft(export)
    codes, before = _codes(model), _loss(model, windows)
    result = _trainer(model, windows, tmp_path).train()
    assert result.global_step == 8
    model.eval()
    _check_after_training(model, export, windows, codes, before, tmp_path)


def test_trainer_with_gradient_checkpointing(export, windows, tmp_path):
    model = _peft(export)
    codes, before = _codes(model), _loss(model, windows)
    trainer = _trainer(model, windows, tmp_path, gradient_checkpointing=True,
                       gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer.train()
    assert model.base_model.model.is_gradient_checkpointing
    model.eval()
    _check_after_training(model, export, windows, codes, before, tmp_path)


def test_a_plain_torch_loop_fine_tunes_the_adapter(export, windows, tmp_path):
    model = _peft(export)
    codes, before = _codes(model), _loss(model, windows)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        batch = windows[torch.randperm(WINDOWS, generator=gen)[:4]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    _check_after_training(model, export, windows, codes, before, tmp_path)


def test_gradient_checkpointing_gives_the_same_gradients(export, windows):
    grads = []
    for checkpointing in (False, True):
        model = _peft(export)
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=windows[:4], labels=windows[:4]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():  # equal up to float reassociation (the recomputed forward)
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
