"""Hessian capture: the input second moment H = X Xᵀ / tokens of each linear layer.

For a layer y = x Wᵀ with inputs X (in × tokens), the output error of a weight perturbation E
is ||E X||_F² = tokens · tr(E H Eᵀ), so H (in × in) is the only statistic of the data the
compression steps need. Sums are kept in float64 and divided once at the end.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from lqlr.core.arch import is_linear, weight_of

__all__ = ["HessianAccumulator", "hessian_hooks", "capture_hessians"]


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


def hessian_hooks(modules: Mapping[str, nn.Module]) -> "HessianHooks":
    """Context manager: inside, every forward of each module adds its input to its own
    :class:`HessianAccumulator` (``hooks.accumulators[name]``); the hooks are removed on exit, also
    on error. The one way lqlr captures H: the block loop runs one block inside it, the allocator and
    :func:`capture_hessians` a whole model."""
    return HessianHooks(modules)


class HessianHooks:
    """See :func:`hessian_hooks`."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        if not modules:
            raise ValueError("no module to capture the Hessian of: check the names or targets")
        self.modules = dict(modules)
        self.accumulators = {n: HessianAccumulator(weight_of(m).shape[1]) for n, m in self.modules.items()}
        self._handles: list = []

    def __enter__(self) -> "HessianHooks":
        for n, m in self.modules.items():
            acc = self.accumulators[n]
            self._handles.append(m.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add_batch(args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def hessians(self) -> dict[str, tuple[torch.Tensor, int]]:
        """``{name: (H (in, in) float32, n_tokens)}``."""
        return {n: (a.hessian(), a.n_tokens) for n, a in self.accumulators.items()}


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
