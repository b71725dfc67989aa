"""Output sensitivity of each linear: the diagonal empirical Fisher of its output, (∂loss/∂y_r)² averaged over tokens."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from lqlr.nn.loss import causal_lm_loss


def output_sensitivity(model: nn.Module, ids: torch.Tensor, names: Iterable[str], batch_size: int = 1,
                       progress: bool = True, loss_chunk: int = 256) -> dict[str, torch.Tensor]:
    """s (out,) per target: mean over tokens of (∂ loss / ∂ y_r)² with loss the summed next-token
    cross-entropy of the calibration sequences (the diagonal empirical Fisher of the layer output).

    Memory is one backward pass of ``batch_size`` sequences (every block's saved activations), with
    the LM head and the loss run ``loss_chunk`` tokens at a time (:func:`lqlr.nn.loss.causal_lm_loss`):
    the (tokens, vocab) logits are never held whole."""
    mods = {n: model.get_submodule(n) for n in names}
    sums: dict[str, torch.Tensor] = {}
    count = 0

    def hook(n):
        def fn(_m, _gin, gout):
            g = gout[0].detach().to(torch.float64)  # (batch, seq, out)
            s = g.pow(2).reshape(-1, g.shape[-1]).sum(0)
            sums[n] = sums[n] + s if n in sums else s
        return fn

    was_training = model.training
    model.eval()
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [m.register_full_backward_hook(hook(n)) for n, m in mods.items()]
    device = next(model.parameters()).device
    try:
        for batch in tqdm(ids.split(batch_size), desc="sensitivity", disable=not progress):
            batch = batch.to(device)
            emb = model.get_input_embeddings()(batch).detach().requires_grad_(True)  # gradients flow without weight grads
            causal_lm_loss(model, batch, loss_chunk, reduction="sum", inputs_embeds=emb).backward()
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        model.train(was_training)
    return {n: (s / count).to(torch.float32) for n, s in sums.items()}
