"""The evaluation's chunked LM head gives the numbers of a plain full-logits computation."""
import math

import pytest
import torch

from lqlr.eval.metrics import quality


def _full_logits_reference(model, reference, windows):
    """ppl and KL from whole (n, T, vocab) logits, the straightforward way."""
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits.float(), -1)
        logq = torch.log_softmax(reference(windows).logits.float(), -1)
    target = windows[:, 1:, None]
    nll = -logp[:, :-1].gather(-1, target).sum()
    nll_ref = -logq[:, :-1].gather(-1, target).sum()
    kl = (logq.exp() * (logq - logp)).sum()
    n = target.numel()
    return math.exp(nll / n), math.exp(nll_ref / n), float(kl) / windows.numel()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_quality_equals_full_logits(arch, monkeypatch):
    import lqlr.eval.metrics as M
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        make = lambda: LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,  # noqa: E731
                                                    num_attention_heads=4, vocab_size=101)).eval()
    else:
        make = lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101)).eval()  # noqa: E731
    model, reference = make(), make()
    windows = torch.randint(0, 101, (3, 45), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(M, "EVAL_CHUNK", 16)  # 45 positions: chunks of 16, 16 and 13
    got = quality(model, reference, windows, batch_size=2)
    ppl, ppl_ref, kl = _full_logits_reference(model, reference, windows)
    assert got["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert got["ppl_reference"] == pytest.approx(ppl_ref, rel=1e-5)
    assert got["kl"] == pytest.approx(kl, rel=1e-4)
    assert quality(model, None, windows)["ppl"] == pytest.approx(ppl, rel=1e-5)
