"""Build modules without allocating their weights (parameters on the meta device)."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from torch import nn


@contextmanager
def parameters_on_meta():
    """Inside: every parameter a module registers lands on the meta device (buffers do not)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def release_parameters(module: nn.Module) -> None:
    """Put every parameter of ``module`` back on the meta device (its memory is freed; shapes stay).
    The inverse of a lazy loader's ``materialize``: a block read for one pass can be dropped again."""
    for local, param in list(module.named_parameters()):
        if param.device.type == "meta":
            continue
        owner_name, _, attr = local.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[attr] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)


@contextmanager
def blocks_streamed(blocks: nn.ModuleList, prefix: str, load_block: Callable[[nn.Module, str], None],
                    release_block: Callable[[nn.Module], None]):
    """Inside: every forward of ``blocks[i]`` first reads its parameters (``load_block(block, f"{prefix}.{i}.")``)
    and drops them again afterwards (``release_block(block)``), so a whole-model pass such as ``generate`` runs
    with one block in memory at a time. Blocks already loaded when the context opens stay as they are."""
    streamed = [(i, b) for i, b in enumerate(blocks) if any(p.device.type == "meta" for p in b.parameters())]
    handles = []
    for i, block in streamed:
        name = f"{prefix}.{i}."
        handles.append(block.register_forward_pre_hook(lambda m, args, name=name: load_block(m, name)))
        handles.append(block.register_forward_hook(lambda m, args, out: release_block(m)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for _, block in streamed:  # a forward that raised leaves its block loaded: drop it
            release_block(block)
