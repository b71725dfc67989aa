"""The optional C++ CPU kernels in ``qlr_cpu.cpp``, built once and cached by :mod:`lqlr.util.cpp`
(pure-torch path when there is no compiler or ninja, or with ``LQLR_NO_EXTENSION=1``)."""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from lqlr.util.cpp import DISABLE_ENV, compiled

SOURCE = Path(__file__).with_name("qlr_cpu.cpp")
__all__ = ["DISABLE_ENV", "SOURCE", "extension"]


def extension() -> ModuleType | None:
    """The compiled kernel module, building it on first call; None when unavailable or disabled."""
    return compiled(SOURCE, "lqlr_cpu")
