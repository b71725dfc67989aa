"""Build (once, cached) and load lqlr's optional C++ CPU extensions.

Each extension is one C++ source compiled on first use with ``torch.utils.cpp_extension.load_inline``
(needs a C++ compiler and ninja) into torch's extension cache, keyed by a hash of the source, the flags
and the CPU's instruction sets, so a later process loads it in milliseconds. When it cannot be built
— no compiler, no ninja, a failed build, or ``LQLR_NO_EXTENSION=1`` in the environment — :func:`compiled`
returns None and the caller runs its pure-torch path instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from functools import lru_cache
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

DISABLE_ENV = "LQLR_NO_EXTENSION"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17")


def cpu_signature() -> str:
    """The CPU's model and instruction-set flags (a build for one CPU is not reused on another)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def disabled() -> bool:
    """Whether ``LQLR_NO_EXTENSION`` asks for the pure-torch paths."""
    return os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")


@lru_cache(maxsize=None)
def _build(source_path: str, name: str) -> ModuleType | None:
    from torch.utils import cpp_extension

    try:
        source = Path(source_path).read_text()
    except OSError as err:  # an install without the source (a trimmed wheel): the pure-torch path
        log.warning("lqlr: the C++ source of %s cannot be read (%s); using the pure-torch path", name, err)
        return None
    key = hashlib.sha256("\0".join([source, *CFLAGS, cpu_signature(), platform.machine()]).encode()).hexdigest()[:12]
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        log.info("lqlr: no C++ compiler (%s) found; using the pure-torch path", compiler)
        return None
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        log.info("lqlr: ninja not found (pip install ninja); using the pure-torch path")
        return None
    try:
        return cpp_extension.load_inline(name=f"{name}_{key}", cpp_sources=[source], extra_cflags=list(CFLAGS),
                                         extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # any build or load failure: fall back, never crash
        log.warning("lqlr: building the C++ extension %s failed (%s: %s); using the pure-torch path", name,
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None


def compiled(source: Path, name: str) -> ModuleType | None:
    """The extension built from ``source`` (module name ``name`` + a hash), building it on first call; None
    when it is unavailable or disabled."""
    if disabled():
        return None
    return _build(str(source), name)
