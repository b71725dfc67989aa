"""Build (once, cached) and load the optional C++ CPU kernels in ``qlr_cpu.cpp``.

The extension is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (needs a
C++ compiler and ninja) into torch's extension cache, keyed by a hash of the source, the flags and
the CPU's instruction sets, so a later process loads it in milliseconds. When it cannot be built
— no compiler, no ninja, a failed build, or ``LQLR_NO_EXTENSION=1`` in the environment — this
returns None and lqlr runs its pure-torch path instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
from functools import lru_cache
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qlr_cpu.cpp")
DISABLE_ENV = "LQLR_NO_EXTENSION"
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (a build for one CPU is not reused on another)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")


@lru_cache(maxsize=1)
def _load() -> ModuleType | None:
    import shutil

    from torch.utils import cpp_extension

    source = SOURCE.read_text()
    key = hashlib.sha256("\0".join([source, *_CFLAGS, _cpu_signature(), platform.machine()]).encode()).hexdigest()[:12]
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
        return cpp_extension.load_inline(name=f"lqlr_cpu_{key}", cpp_sources=[source], extra_cflags=_CFLAGS,
                                         extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # any build or load failure: fall back, never crash inference
        log.warning("lqlr: building the C++ kernels failed (%s: %s); using the pure-torch path",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None


def extension() -> ModuleType | None:
    """The compiled kernel module, building it on first call; None when unavailable or disabled."""
    if _disabled():
        return None
    return _load()
