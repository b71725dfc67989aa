"""Build modules without allocating their weights (parameters on the meta device)."""
from __future__ import annotations

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
