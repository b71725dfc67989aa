"""Output sensitivity of each linear: the diagonal empirical Fisher of its output, (∂loss/∂y_r)² averaged over tokens."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from lqlr.calibrate.capture import block_inputs
from lqlr.core.arch import find_blocks
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
    handles = [m.register_full_backward_hook(_squared_grad_hook(n, sums)) for n, m in mods.items()]
    device = next(model.parameters()).device
    try:
        with _frozen(model):
            for batch in tqdm(ids.split(batch_size), desc="sensitivity", disable=not progress):
                batch = batch.to(device)
                emb = model.get_input_embeddings()(batch).detach().requires_grad_(True)  # gradients flow without weight grads
                causal_lm_loss(model, batch, loss_chunk, reduction="sum", inputs_embeds=emb).backward()
                count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return {n: (s / count).to(torch.float32) for n, s in sums.items()}


def blockwise_sensitivity(model: nn.Module, ids: torch.Tensor, names: Iterable[str],
                          load_block: Callable[[nn.Module, str], None] | None = None,
                          release_block: Callable[[nn.Module], None] | None = None, batch_size: int = 1,
                          progress: bool = True, loss_chunk: int = 256) -> dict[str, torch.Tensor]:
    """The same s as :func:`output_sensitivity`, one decoder block in memory at a time.

    A forward pass keeps each block's input hidden states (n_blocks · tokens · hidden floats, the
    only thing that grows with depth); the loss's gradient at the last block's output then goes
    back block by block, each block's forward recomputed from its saved input. ``load_block(block,
    prefix)`` / ``release_block(block)`` read and drop a block's weights (lazy loading), so a model
    larger than RAM never has to be in memory whole."""
    names = list(names)
    path, blocks = find_blocks(model)
    load = load_block or (lambda _b, _p: None)
    release = release_block or (lambda _b: None)
    sums: dict[str, torch.Tensor] = {}
    with _frozen(model):
        inputs = block_inputs(model, blocks[0], ids, batch_size)  # [hidden, args, kwargs] per batch
        saved: list[list[torch.Tensor] | None] = []
        as_tuple = False
        for i in tqdm(range(len(blocks)), desc="sensitivity forward", disable=not progress):
            load(blocks[i], f"{path}.{i}.")
            _freeze(blocks[i])
            saved.append([entry[0] for entry in inputs])
            with torch.no_grad():
                for entry in inputs:
                    out = blocks[i](entry[0], *entry[1], **entry[2])
                    as_tuple = isinstance(out, (tuple, list))
                    entry[0] = out[0] if as_tuple else out
            release(blocks[i])
        device = inputs[0][0].device
        # ∂ loss / ∂ (last block's output) of each batch: the blocks stubbed out, the final norm, LM head and loss run
        grads = [_tail_gradient(model, blocks, entry[0], batch.to(device), as_tuple, loss_chunk)
                 for entry, batch in zip(inputs, ids.split(batch_size))]
        for i in tqdm(reversed(range(len(blocks))), total=len(blocks), desc="sensitivity backward", disable=not progress):
            prefix = f"{path}.{i}."
            load(blocks[i], prefix)
            _freeze(blocks[i])
            handles = [model.get_submodule(n).register_full_backward_hook(_squared_grad_hook(n, sums))
                       for n in names if n.startswith(prefix)]
            try:
                for j, (h_in, entry) in enumerate(zip(saved[i], inputs)):
                    h = h_in.detach().requires_grad_(True)
                    out = blocks[i](h, *entry[1], **entry[2])
                    torch.autograd.backward(out[0] if as_tuple else out, grads[j])
                    grads[j] = h.grad.detach()  # the gradient at this block's input: the previous block's output
            finally:
                for hd in handles:
                    hd.remove()
            saved[i] = None
            release(blocks[i])
    count = ids.numel()
    return {n: (sums[n] / count).to(torch.float32) for n in names}


class _Emit(nn.Module):
    """Stands in for a decoder block and returns the given hidden states, whatever it is fed."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


def _tail_gradient(model: nn.Module, blocks: nn.ModuleList, hidden: torch.Tensor, batch: torch.Tensor,
                   as_tuple: bool, loss_chunk: int) -> torch.Tensor:
    """∂ (summed next-token loss of ``batch``) / ∂ ``hidden``, the last block's output."""
    h = hidden.detach().requires_grad_(True)
    originals = list(blocks)
    stub = _Emit(h, as_tuple)
    for j in range(len(blocks)):
        blocks[j] = stub
    try:
        causal_lm_loss(model, batch, loss_chunk, reduction="sum").backward()
    finally:
        for j, b in enumerate(originals):
            blocks[j] = b
    return h.grad.detach()


def _squared_grad_hook(name: str, sums: dict[str, torch.Tensor]):
    """A backward hook adding Σ_tokens (∂ loss / ∂ y_r)² of the module's output into ``sums[name]``."""
    def fn(_m, _gin, gout):
        g = gout[0].detach().to(torch.float64)  # (batch, seq, out)
        s = g.pow(2).reshape(-1, g.shape[-1]).sum(0)
        sums[name] = sums[name] + s if name in sums else s
    return fn


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


@contextmanager
def _frozen(model: nn.Module):
    """Eval mode and no weight gradients inside; both restored after."""
    was_training = model.training
    model.eval()
    req = {name: p.requires_grad for name, p in model.named_parameters()}
    _freeze(model)
    try:
        yield
    finally:
        for name, p in model.named_parameters():  # (lazily loaded parameters are new objects: match by name)
            if name in req:
                p.requires_grad_(req[name])
        model.train(was_training)
