"""Hessian capture: the input second moment H = X Xᵀ / tokens of each linear layer.

For a layer y = x Wᵀ with inputs X (in × tokens), the output error of a weight perturbation E
is ||E X||_F² = tokens · tr(E H Eᵀ), so H (in × in) is the only statistic of the data the
compression steps need. Sums are kept in float64 and divided once at the end.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["HessianAccumulator", "capture_hessians", "default_include"]


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


def default_include(name: str, module: nn.Module) -> bool:
    """Select every ``nn.Linear`` except the LM head (``lm_head``)."""
    return isinstance(module, nn.Linear) and name.split(".")[-1] != "lm_head"


def capture_hessians(
    model: nn.Module,
    input_ids: torch.LongTensor,
    include: Callable[[str, nn.Module], bool] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, tuple[torch.Tensor, int]]:
    """Run ``model`` on ``input_ids`` and return each selected Linear's input second moment.

    A forward pre-hook on every selected ``nn.Linear`` feeds a ``HessianAccumulator``; the hooks
    are removed when the pass ends, also on error. The model runs under ``torch.no_grad`` on
    the device of its first parameter, ``batch_size`` sequences at a time.

    Args:
        model: a causal LM called as ``model(input_ids)``.
        input_ids: ``(n_samples, seq_len)`` token ids (see ``lqlr.data.calibration_ids``).
        include: ``(name, module) -> bool`` choosing layers among ``model.named_modules()``;
            only ``nn.Linear`` modules are ever hooked. Default: all except ``lm_head``.
        batch_size: sequences per forward pass.
        progress: show a tqdm bar over batches.

    Returns:
        ``{module_name: (H, n_tokens)}`` with ``H`` float32 of shape ``(in, in)``.

    Raises:
        ValueError: on bad ``input_ids``/``batch_size`` or when no layer is selected.
    """
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)}; pass (n_samples, seq_len)"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    include = include or default_include
    targets = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and include(name, module)
    }
    if not targets:
        raise ValueError("no nn.Linear module matched `include`; check the filter")

    accumulators = {name: HessianAccumulator(m.in_features) for name, m in targets.items()}

    def make_hook(acc: HessianAccumulator) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            acc.add_batch(args[0])

        return hook

    param = next(model.parameters(), None)
    device = param.device if param is not None else input_ids.device
    handles = [m.register_forward_pre_hook(make_hook(accumulators[n])) for n, m in targets.items()]
    try:
        starts = range(0, input_ids.shape[0], batch_size)
        with torch.no_grad():
            for start in tqdm(starts, desc="calibration", disable=not progress):
                model(input_ids[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()

    return {name: (acc.hessian(), acc.n_tokens) for name, acc in accumulators.items()}
