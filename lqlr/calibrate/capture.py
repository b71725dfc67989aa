"""Hessian capture: the input second moment H = X Xᵀ / tokens of each linear layer.

For a layer y = x Wᵀ with inputs X (in × tokens), the output error of a weight perturbation E
is ||E X||_F² = tokens · tr(E H Eᵀ), so H (in × in) is the only statistic of the data the
compression steps need. Sums are kept in float64 and divided once at the end.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from lqlr.core.arch import find_blocks, is_linear, weight_of

__all__ = ["HessianAccumulator", "hessian_hooks", "capture_hessians", "blockwise_hessians", "block_inputs", "run_block"]


class HessianAccumulator:
    """Running second moment of a layer's inputs: H = Σ xᵀx / n over all tokens seen.

    Activations of any leading shape ``(..., in)`` are flattened to ``(tokens, in)``; the sum
    of ``xᵀx`` is accumulated in float64 on the activations' device, so the result does not
    depend on how the tokens were split into batches.
    """

    def __init__(self, in_features: int) -> None:
        """Start an empty accumulator for inputs of width ``in_features``."""
        if in_features < 1:
            raise ValueError(f"in_features={in_features} must be >= 1")
        self.in_features = in_features
        self._sum: torch.Tensor | None = None  # (in, in) float64, allocated on first batch
        self.n_tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add activations ``x`` of shape ``(..., in)`` to the running sum."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"activation width {x.shape[-1]} != in_features {self.in_features}; "
                "pass the layer's input, shape (..., in_features)"
            )
        x = x.detach().reshape(-1, self.in_features).to(torch.float64)  # (tokens, in)
        if self._sum is None:
            self._sum = torch.zeros(
                self.in_features, self.in_features, dtype=torch.float64, device=x.device
            )
        self._sum.addmm_(x.T, x)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """Return H = Σ xᵀx / n as float32, shape ``(in, in)``.

        Raises:
            RuntimeError: if no tokens were added.
        """
        if self._sum is None or self.n_tokens == 0:
            raise RuntimeError(
                "no activations were added; run the model on calibration data before hessian()"
            )
        H = self._sum / self.n_tokens  # (in, in) float64
        H = (H + H.T) / 2  # exact symmetry despite summation order
        return H.to(torch.float32)


def _in_features(module: nn.Module) -> int:
    """Input width of a linear-like module, read without touching its weight when it says it (a packed
    QLRLinear, or a PEFT layer around one, would otherwise build its dense weight)."""
    n = getattr(module, "in_features", None)
    return n if isinstance(n, int) else weight_of(module).shape[1]


def hessian_hooks(modules: Mapping[str, nn.Module]) -> "HessianHooks":
    """Context manager: inside, every forward of each module adds its input to a
    :class:`HessianAccumulator`; the hooks are removed on exit, also on error. Modules that read the
    very same input tensor (q/k/v of an attention block, gate/up of a SwiGLU MLP) share one
    accumulator, so their H is summed once and stored once (``hooks.shared[name]``: the module whose
    accumulator ``name`` uses). The one way lqlr captures H: the block loop and the allocator run one
    block inside it, :func:`capture_hessians` a whole model."""
    return HessianHooks(modules)


class HessianHooks:
    """See :func:`hessian_hooks`."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        if not modules:
            raise ValueError("no module to capture the Hessian of: check the names or targets")
        self.modules = dict(modules)
        self.in_features = {n: _in_features(m) for n, m in self.modules.items()}
        self.accumulators: dict[str, HessianAccumulator] = {}
        self.shared: dict[str, str] = {}  # module name -> the module that owns its accumulator
        self._last: tuple[weakref.ref, str] | None = None  # the most recent input and who accumulated it
        self._handles: list = []
        self.seconds = 0.0  # time spent accumulating (the calibration forward's Hessian share)

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            last = self._last
            if last is not None and last[0]() is x:
                owner = last[1]  # the same tensor as the previous module's input: its H is already counted
            else:
                owner = name
                if name not in self.accumulators:
                    self.accumulators[name] = HessianAccumulator(self.in_features[name])
                t0 = _synced_clock(x)
                self.accumulators[name].add_batch(x)
                self.seconds += _synced_clock(x) - t0
                self._last = (weakref.ref(x), name)
            if self.shared.setdefault(name, owner) != owner:
                raise RuntimeError(f"{name} shared its input with {self.shared[name]} in one forward and with "
                                   f"{owner} in another: capture it on its own")
        return hook

    def __enter__(self) -> "HessianHooks":
        for n, m in self.modules.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(n)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def hessians(self) -> dict[str, tuple[torch.Tensor, int]]:
        """``{name: (H (in, in) float32, n_tokens)}``; modules sharing an input share one H tensor.

        Raises:
            RuntimeError: if a module never ran.
        """
        missing = [n for n in self.modules if n not in self.shared]
        if missing:
            raise RuntimeError(f"no activations reached {missing[:3]}: run the model on calibration data inside the hooks")
        own = {n: (a.hessian(), a.n_tokens) for n, a in self.accumulators.items()}
        return {n: own[self.shared[n]] for n in self.modules}


def _synced_clock(x: torch.Tensor) -> float:
    """perf_counter after the work queued on ``x``'s device has finished (GPU timings are asynchronous)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


class _StopForward(Exception):
    pass


def block_inputs(model: nn.Module, first_block: nn.Module, ids: torch.Tensor, batch_size: int) -> list[list]:
    """``[hidden_states, args, kwargs]`` that the first decoder block receives, one entry per batch of
    ``ids`` (the model stops there: nothing after the embeddings runs)."""
    captured = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append([hidden, args[1:], kwargs])
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                try:
                    model(batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: list[list]) -> list[torch.Tensor]:
    """The block's output hidden states for each entry of ``inputs`` (see :func:`block_inputs`)."""
    outs = []
    with torch.no_grad():
        for hidden, args, kwargs in inputs:
            out = block(hidden, *args, **kwargs)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def blockwise_hessians(model: nn.Module, ids: torch.Tensor, names: Iterable[str], batch_size: int = 8,
                       progress: bool = True, load_block: Callable[[nn.Module, str], None] | None = None,
                       release_block: Callable[[nn.Module], None] | None = None,
                       ) -> Iterator[tuple[int, dict[str, tuple[torch.Tensor, int]]]]:
    """``(block index, {name: (H, n_tokens)})`` for each decoder block of the (unchanged) model in
    turn, holding one block's Hessians and one hidden-state tensor per batch at a time: the same H as
    :func:`capture_hessians`, in memory bounded by one block. ``load_block(block, prefix)`` /
    ``release_block(block)`` read and drop each block's weights (lazy loading); the block stays
    loaded while the caller handles what was yielded for it."""
    names = list(names)
    path, blocks = find_blocks(model)
    inputs = block_inputs(model, blocks[0], ids, batch_size)
    for i in tqdm(range(len(blocks)), desc="Hessians (by block)", disable=not progress):
        prefix = f"{path}.{i}."
        if load_block is not None:
            load_block(blocks[i], prefix)
        mine = {n: model.get_submodule(n) for n in names if n.startswith(prefix)}
        if mine:
            with hessian_hooks(mine) as hooks:
                outputs = run_block(blocks[i], inputs)
            yield i, hooks.hessians()
            del hooks
        else:
            outputs = run_block(blocks[i], inputs)
        for entry, out in zip(inputs, outputs):
            entry[0] = out
        if release_block is not None:
            release_block(blocks[i])


def capture_hessians(model: nn.Module, input_ids: torch.LongTensor,
                     modules: Mapping[str, nn.Module] | Iterable[str] | None = None, batch_size: int = 8,
                     progress: bool = True) -> dict[str, tuple[torch.Tensor, int]]:
    """Run ``model`` on ``input_ids`` (n_samples, seq_len) and return each module's input second moment.

    ``modules``: ``{name: module}``, or names of submodules of ``model`` (None: every linear except
    the LM head). The model runs under ``torch.no_grad`` on the device of its first parameter,
    ``batch_size`` sequences at a time. Returns ``{name: (H float32 (in, in), n_tokens)}``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; pass (n_samples, seq_len)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if modules is None:
        modules = {n: m for n, m in model.named_modules() if is_linear(m) and n.split(".")[-1] != "lm_head"}
    elif not isinstance(modules, Mapping):
        modules = {n: model.get_submodule(n) for n in modules}
    param = next(model.parameters(), None)
    device = param.device if param is not None else input_ids.device
    with hessian_hooks(modules) as hooks, torch.no_grad():
        for batch in tqdm(input_ids.split(batch_size), desc="Hessians", disable=not progress):
            model(batch.to(device))
    return hooks.hessians()
