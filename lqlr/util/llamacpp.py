"""llama.cpp as a test dependency: build it from the llama-cpp-python sdist and run it on GGUF files.

    python -m lqlr.util.llamacpp build [--jobs N]    # once (minutes); a cached build is reused
    python -m lqlr.util.llamacpp path                # the built program, or why there is none (exit 1)
    python -m lqlr.util.llamacpp build --tools quantize,imatrix,bench   # opt in: llama.cpp's own tools (~10 min)
    python -m lqlr.util.llamacpp path --tool quantize                   # a built tool, or why there is none

The only network lqlr's CI has is the package registry, so llama.cpp comes from PyPI: the source
distribution of ``llama-cpp-python`` (pinned: :data:`VERSION`) vendors llama.cpp under vendor/llama.cpp.
``build`` gets it with ``pip download --no-deps --no-binary llama-cpp-python``, unpacks the parts that build libllama,
and compiles them with cmake and the system C/C++ compiler, CPU only (``GGML_NATIVE=OFF``: AVX2/FMA/F16C,
no AVX-512/AMX, which die with SIGILL in some VMs), together with one small program,
``lqlr-llama-logits`` (``llamacpp_logits.cpp`` next to this file): the logits llama.cpp computes for
given token sequences, with a LoRA adapter applied; ggml's decoding of a file's tensors; its tokenization of a
text. No tools, examples,
server, tests or curl are built.

Everything lives in one folder, :func:`cache_dir` (``$LQLR_LLAMA_CPP``, default
``~/.cache/lqlr/llama.cpp/<version>/``): sdist/, src/ (the unpacked llama.cpp), build/ (cmake's), bin/
(the program), build.log and build.json (what was built and how long it took), written last: a folder
whose build.json does not match this module (another version, another program source, other cmake
options) is rebuilt, incrementally. Errors are one-line :class:`LlamaCppError`\\ s.

llama.cpp's own tools (``llama-quantize``, ``llama-imatrix``, ``llama-bench``, ``llama-perplexity``: :data:`TOOLS`)
are an opt-in build (``build --tools``, for ``lqlr-bench gguf``; not part of the tests' build): the same sdist, the
parts they need unpacked into tools-src/, configured with llama.cpp's common library and tools on
(:data:`TOOLS_CMAKE_OPTIONS`, still ``GGML_NATIVE=OFF``) in build-tools/, each tool copied to bin/ and listed in
tools.json, written last (a tool is usable when tools.json lists it with these options).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"  # llama-cpp-python on PyPI; its sdist vendors llama.cpp 0c1e570 (libllama 0.5.0)
ENV = "LQLR_LLAMA_CPP"
PROGRAM = "lqlr-llama-logits"
SOURCE = Path(__file__).with_name("llamacpp_logits.cpp")
STAMP = "build.json"
# the parts of vendor/llama.cpp that libllama's build reads (no models/, docs/, tools/, tests/, examples/)
PARTS = ("CMakeLists.txt", "LICENSE", "cmake/", "ggml/", "src/", "include/", "vendor/", "licenses/")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CCACHE=OFF",
    "-DGGML_NATIVE=OFF",  # a portable x86-64 build (AVX2, FMA, F16C); native would add AVX-512/AMX kernels
    "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DGGML_BACKEND_DL=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
)
# llama.cpp's own tools (opt in: ``build --tools``): name -> cmake target and program in bin/
TOOLS = {"quantize": "llama-quantize", "imatrix": "llama-imatrix", "bench": "llama-bench",
         "perplexity": "llama-perplexity"}
TOOLS_STAMP = "tools.json"
TOOL_PARTS = (*PARTS, "common/", "tools/")  # the tools add llama.cpp's common library and tools/
TOOLS_CMAKE_OPTIONS = tuple(
    o.replace("OFF", "ON") if o in ("-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TOOLS=OFF") else o for o in CMAKE_OPTIONS)
# the cmake project that builds the program against llama.cpp's ``llama`` target (static, ggml inside)
CMAKE_PROJECT = """cmake_minimum_required(VERSION 3.14)
project(lqlr_llama_logits C CXX)
add_subdirectory("${LLAMA_CPP_SOURCE}" llama.cpp EXCLUDE_FROM_ALL)
add_executable(lqlr-llama-logits llamacpp_logits.cpp)
target_link_libraries(lqlr-llama-logits PRIVATE llama)
"""


class LlamaCppError(RuntimeError):
    """llama.cpp is not built, cannot be built, or failed on a file; the message is one line."""


def cache_dir() -> Path:
    """The build folder: ``$LQLR_LLAMA_CPP`` if set, else ``$XDG_CACHE_HOME`` (or ~/.cache)/lqlr/llama.cpp/<version>."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lqlr" / "llama.cpp" / VERSION


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wanted() -> dict:
    """What build.json must say for a build to be reused."""
    return {"package": PACKAGE, "version": VERSION, "program_sha256": _sha256(SOURCE.read_bytes()),
            "cmake_project_sha256": _sha256(CMAKE_PROJECT.encode()), "cmake_options": list(CMAKE_OPTIONS)}


def _read_stamp(root: Path, name: str = STAMP) -> dict | None:
    try:
        return json.loads((root / name).read_text())
    except (OSError, ValueError):
        return None


def missing(root: Path | None = None) -> str | None:
    """Why there is no usable build in ``root`` (default :func:`cache_dir`), in one line; None when there is one."""
    root = cache_dir() if root is None else Path(root)
    fix = "run `python -m lqlr.util.llamacpp build`"
    stamp = _read_stamp(root)
    if stamp is None or not (root / "bin" / PROGRAM).is_file():
        return f"llama.cpp is not built in {root} (${ENV} or ~/.cache/lqlr/llama.cpp/{VERSION}): {fix}"
    stale = [k for k, v in _wanted().items() if stamp.get(k) != v]
    if stale:
        return f"the llama.cpp build in {root} is stale ({', '.join(stale)} changed): {fix}"
    return None


def find(root: Path | None = None) -> Path:
    """The built ``lqlr-llama-logits``; LlamaCppError (one line, with the command to build it) when there is none."""
    root = cache_dir() if root is None else Path(root)
    reason = missing(root)
    if reason:
        raise LlamaCppError(reason)
    return root / "bin" / PROGRAM


# ----- the build ----------------------------------------------------------------------------------
def _run(cmd: Sequence[str], log: Path, step: str, echo: Callable[[str], None] | None = None,
         cwd: Path | None = None) -> None:
    """Run ``cmd`` with its output appended to ``log`` (lines matching ``[ NN%]`` also to ``echo`` every 10%);
    one-line LlamaCppError naming the step, the first compiler error and the log when it fails."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as err:
            raise LlamaCppError(f"{step}: cannot run {cmd[0]} ({err.strerror})") from err
        first_error, more, shown = None, False, -10
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if more and line.strip():  # "CMake Error at ...:" says what on the next line
                first_error, more = f"{first_error} {line.strip()}", False
            if first_error is None and re.search(r"\berror\b|CMake Error|No CMAKE_\w+_COMPILER", line):
                first_error = line.strip()
                more = first_error.endswith(":")
            m = re.match(r"\[\s*(\d+)%\]", line)
            if echo and m and int(m.group(1)) >= shown + 10:
                shown = int(m.group(1))
                echo(f"  {line.strip()}")
        rc = proc.wait()
    if rc:
        why = f": {first_error}" if first_error else ""
        raise LlamaCppError(f"{step} failed (exit {rc}){why}; full log in {log}")


def _download(root: Path, log: Path) -> Path:
    """The sdist in root/sdist, fetched with pip from the package registry unless it is there already."""
    sdist_dir = root / "sdist"
    name = f"{PACKAGE.replace('-', '_')}-{VERSION}.tar.gz"
    if not (sdist_dir / name).is_file():
        # --no-binary for this package only: pip prepares the sdist's metadata in an isolated build env, whose
        # build requirements (scikit-build-core, cmake) must come as wheels, or pip compiles cmake from source
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, f"{PACKAGE}=={VERSION}",
              "-d", str(sdist_dir)], log, f"pip download {PACKAGE}=={VERSION}")
    if not (sdist_dir / name).is_file():
        raise LlamaCppError(f"pip download {PACKAGE}=={VERSION} wrote no {name} in {sdist_dir}; full log in {log}")
    return sdist_dir / name


def _unpack(sdist: Path, dest: Path, parts: Sequence[str] = PARTS) -> None:
    """vendor/llama.cpp's ``parts`` (default :data:`PARTS`) from the sdist into ``dest`` (replaced whole, via a
    temp folder)."""
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.removeprefix(prefix) if m.name.startswith(prefix) else None
                if rel and (m.isfile() or m.isdir()) and any(rel == p or rel.startswith(p) for p in parts):
                    m.name = rel
                    members.append(m)
            if not any(m.name == "include/llama.h" for m in members):
                raise LlamaCppError(f"{sdist} has no vendor/llama.cpp/include/llama.h: not a llama-cpp-python sdist")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
    except (OSError, tarfile.TarError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LlamaCppError(f"cannot unpack {sdist}: {err}") from err
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def _cached(root: Path, echo: Callable[[str], None]) -> Path:
    stamp = _read_stamp(root) or {}
    echo(f"llama.cpp {VERSION} (from {PACKAGE}) is built: {root / 'bin' / PROGRAM} "
         f"(last build {stamp.get('build_seconds', 0):.0f} s; delete {root / STAMP} to rebuild)")
    return root / "bin" / PROGRAM


def build(root: Path | None = None, jobs: int | None = None, echo: Callable[[str], None] = print) -> Path:
    """Build llama.cpp and ``lqlr-llama-logits`` in ``root`` (default :func:`cache_dir`) unless a matching build
    is there; returns the program's path. ``jobs``: parallel compile jobs (default: the CPU count). Progress goes
    to ``echo``; failures are one-line LlamaCppErrors naming the log."""
    root = cache_dir() if root is None else Path(root)
    if missing(root) is None:
        return _cached(root, echo)
    tools = {"cmake": shutil.which("cmake"), "a C++ compiler": shutil.which("c++") or shutil.which("g++")
             or shutil.which("clang++")}
    lacking = [k for k, v in tools.items() if v is None]
    if lacking:
        raise LlamaCppError(f"building llama.cpp needs {' and '.join(lacking)} on PATH "
                            "(cmake: pip install cmake, part of the test extra; a compiler: e.g. apt-get install g++)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "w")  # noqa: SIM115 (held until the build ends)
    except OSError as err:
        raise LlamaCppError(f"cannot create the build folder {root}: {err.strerror}") from err
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same folder: wait for it
        if missing(root) is None:  # built by the process we waited for
            return _cached(root, echo)
        log = root / "build.log"
        log.write_text(f"lqlr.util.llamacpp build of {PACKAGE}=={VERSION}\n")
        (root / STAMP).unlink(missing_ok=True)
        t0 = time.perf_counter()
        echo(f"[1/4] {PACKAGE}=={VERSION} sdist in {root / 'sdist'} (pip download unless it is there)")
        sdist = _download(root, log)
        src = root / "src"
        if not (src / "include" / "llama.h").is_file():
            echo(f"[2/4] unpacking vendor/llama.cpp into {src}")
            _unpack(sdist, src)
        else:
            echo(f"[2/4] vendor/llama.cpp already unpacked in {src}")
        project = root / "project"
        project.mkdir(exist_ok=True)
        (project / "CMakeLists.txt").write_text(CMAKE_PROJECT)
        shutil.copyfile(SOURCE, project / SOURCE.name)
        echo(f"[3/4] cmake configure ({' '.join(o for o in CMAKE_OPTIONS if 'NATIVE' in o)}, CPU only)")
        _run(["cmake", "-S", str(project), "-B", str(root / "build"), f"-DLLAMA_CPP_SOURCE={src}", *CMAKE_OPTIONS],
             log, "cmake configure")
        jobs = jobs or os.cpu_count() or 1
        echo(f"[4/4] cmake --build (target {PROGRAM}, {jobs} jobs)")
        _run(["cmake", "--build", str(root / "build"), "--target", PROGRAM, "-j", str(jobs)], log, "cmake --build",
             echo=echo)
        built = root / "build" / "bin" / PROGRAM
        if not built.is_file():
            built = root / "build" / PROGRAM
        if not built.is_file():
            raise LlamaCppError(f"cmake --build made no {PROGRAM} under {root / 'build'}; full log in {log}")
        (root / "bin").mkdir(exist_ok=True)
        shutil.copy2(built, root / "bin" / f".{PROGRAM}.tmp")
        os.replace(root / "bin" / f".{PROGRAM}.tmp", root / "bin" / PROGRAM)  # a running copy keeps its old file
        seconds = time.perf_counter() - t0
        stamp = {**_wanted(), "sdist_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(),
                 "build_seconds": round(seconds, 1), "jobs": jobs, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = root / (STAMP + ".tmp")
        tmp.write_text(json.dumps(stamp, indent=1) + "\n")
        os.replace(tmp, root / STAMP)
        echo(f"built {root / 'bin' / PROGRAM} in {seconds:.0f} s")
        return root / "bin" / PROGRAM


# ----- llama.cpp's own tools (opt in) -------------------------------------------------------------
def _tool_names(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in TOOLS]
    if unknown or not names:
        raise LlamaCppError(f"unknown llama.cpp tool(s) {unknown or names}: choose from {', '.join(TOOLS)}")
    return list(dict.fromkeys(names))


def _tools_wanted() -> dict:
    return {"package": PACKAGE, "version": VERSION, "cmake_options": list(TOOLS_CMAKE_OPTIONS)}


def tool_missing(name: str, root: Path | None = None) -> str | None:
    """Why llama.cpp's tool ``name`` (a key of :data:`TOOLS`) is not built in ``root``, in one line; None when it is."""
    root = cache_dir() if root is None else Path(root)
    _tool_names([name])
    fix = f"run `python -m lqlr.util.llamacpp build --tools {name}` (--tools quantize,imatrix,bench for lqlr-bench " \
          "gguf: about 10 min on 2 cores)"
    stamp = _read_stamp(root, TOOLS_STAMP)
    if stamp is None or name not in stamp.get("tools", []) or not (root / "bin" / TOOLS[name]).is_file():
        return f"llama.cpp's {TOOLS[name]} is not built in {root}: {fix}"
    stale = [k for k, v in _tools_wanted().items() if stamp.get(k) != v]
    if stale:
        return f"the llama.cpp tools in {root} are stale ({', '.join(stale)} changed): {fix}"
    return None


def tool(name: str, root: Path | None = None) -> Path:
    """The built llama.cpp tool ``name`` (``quantize``, ``imatrix``, ``bench``, ``perplexity``); LlamaCppError
    (one line, with the command that builds it) when it is not built."""
    root = cache_dir() if root is None else Path(root)
    reason = tool_missing(name, root)
    if reason:
        raise LlamaCppError(reason)
    return root / "bin" / TOOLS[name]


def build_tools(names: Sequence[str], root: Path | None = None, jobs: int | None = None,
                echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Build llama.cpp's tools ``names`` (keys of :data:`TOOLS`) in ``root`` unless they are built; returns
    {name: path}. The same sdist as :func:`build`, unpacked with llama.cpp's common/ and tools/ into tools-src/,
    configured with :data:`TOOLS_CMAKE_OPTIONS` in build-tools/ (cmake rebuilds only what changed)."""
    root = cache_dir() if root is None else Path(root)
    names = _tool_names(names)
    if all(tool_missing(n, root) is None for n in names):
        echo(f"llama.cpp tools built in {root / 'bin'}: {', '.join(TOOLS[n] for n in names)}")
        return {n: root / "bin" / TOOLS[n] for n in names}
    if shutil.which("cmake") is None:
        raise LlamaCppError("building llama.cpp's tools needs cmake on PATH (pip install cmake, part of the test extra)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        log = root / "build-tools.log"
        log.write_text(f"lqlr.util.llamacpp build --tools {','.join(names)} of {PACKAGE}=={VERSION}\n")
        stamp = _read_stamp(root, TOOLS_STAMP) or {}
        have = stamp.get("tools", []) if all(stamp.get(k) == v for k, v in _tools_wanted().items()) else []
        (root / TOOLS_STAMP).unlink(missing_ok=True)
        t0 = time.perf_counter()
        sdist = _download(root, log)
        src = root / "tools-src"
        if not (src / "tools" / "quantize").is_dir():
            echo(f"unpacking vendor/llama.cpp with common/ and tools/ into {src}")
            _unpack(sdist, src, TOOL_PARTS)
        echo("cmake configure (llama.cpp's common library and tools on, -DGGML_NATIVE=OFF, CPU only)")
        _run(["cmake", "-S", str(src), "-B", str(root / "build-tools"), *TOOLS_CMAKE_OPTIONS], log, "cmake configure")
        jobs = jobs or os.cpu_count() or 1
        targets = [TOOLS[n] for n in names]
        echo(f"cmake --build (targets {', '.join(targets)}, {jobs} jobs)")
        _run(["cmake", "--build", str(root / "build-tools"), "--target", *targets, "-j", str(jobs)], log,
             "cmake --build", echo=echo)
        (root / "bin").mkdir(exist_ok=True)
        for target in targets:
            built = root / "build-tools" / "bin" / target
            if not built.is_file():
                raise LlamaCppError(f"cmake --build made no {target} under {root / 'build-tools'}; full log in {log}")
            shutil.copy2(built, root / "bin" / f".{target}.tmp")
            os.replace(root / "bin" / f".{target}.tmp", root / "bin" / target)
        seconds = time.perf_counter() - t0
        stamp = {**_tools_wanted(), "tools": sorted({*have, *names}), "build_seconds": round(seconds, 1),
                 "jobs": jobs, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = root / (TOOLS_STAMP + ".tmp")
        tmp.write_text(json.dumps(stamp, indent=1) + "\n")
        os.replace(tmp, root / TOOLS_STAMP)
        echo(f"built {', '.join(targets)} in {root / 'bin'} in {seconds:.0f} s")
        return {n: root / "bin" / TOOLS[n] for n in names}


# ----- running it ---------------------------------------------------------------------------------
def _call(args: list[str], stdin: str, root: Path | None) -> str:
    program = find(root)
    for flag in ("-m", "--lora"):
        if flag in args and not Path(args[args.index(flag) + 1]).is_file():
            raise LlamaCppError(f"{args[args.index(flag) + 1]}: no such file")
    proc = subprocess.run([str(program), *args], input=stdin, capture_output=True, text=True)
    if proc.returncode:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        if proc.returncode < 0:
            why = f"killed by signal {-proc.returncode} ({why})"
        raise LlamaCppError(why)
    return proc.stdout


def logits(model: str | os.PathLike, sequences: Sequence[Sequence[int]], lora: str | os.PathLike | None = None,
           lora_scale: float = 1.0, threads: int = 2, repack: bool = True, kv: str = "f32",
           root: Path | None = None) -> np.ndarray:
    """llama.cpp's logits of every position of every sequence (each decoded from position 0), float32
    (Σ len, n_vocab), for ``model`` (a GGUF file) with the LoRA adapter ``lora`` applied at ``lora_scale``.
    ``repack``: llama.cpp's CPU weight repacking (its default); ``kv``: the K/V cache type (f32, or llama.cpp's
    default f16)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("logits needs at least one sequence and no empty one")
    with tempfile.TemporaryDirectory(prefix="lqlr-llama-") as tmp:
        out = Path(tmp) / "logits.f32"
        args = ["-m", str(model), "-o", str(out), "-t", str(threads), "--kv", kv]
        if lora is not None:
            args += ["--lora", str(lora), "--lora-scale", repr(float(lora_scale))]
        if not repack:
            args.append("--no-repack")
        text = "\n".join(" ".join(str(int(t)) for t in s) for s in sequences) + "\n"
        positions, n_vocab = (int(v) for v in _call(args, text, root).split())
        data = np.fromfile(out, dtype="<f4")
    if data.size != positions * n_vocab or positions != sum(len(s) for s in sequences):
        raise LlamaCppError(f"{PROGRAM} wrote {data.size} logits, not {positions}×{n_vocab}")
    return data.reshape(positions, n_vocab)


def decode_speed(model: str | os.PathLike, prompt: Sequence[int], new_tokens: int, lora: str | os.PathLike | None = None,
                 threads: int = 2, repeats: int = 3, kv: str = "f16", repack: bool = True,
                 root: Path | None = None) -> dict:
    """llama.cpp's speed on ``model`` (+ the LoRA adapter ``lora`` at scale 1): ``prompt`` in one batch, then
    ``new_tokens`` generated greedily one ``llama_decode`` at a time, the fastest of ``repeats`` runs. Defaults are
    llama.cpp's own (K/V cache f16, weight repacking on). Returns prompt and decode tokens/s and the generated ids."""
    if not prompt or new_tokens < 1 or repeats < 1:
        raise ValueError("decode_speed needs a prompt, new_tokens >= 1 and repeats >= 1")
    args = ["-m", str(model), "-t", str(threads), "--kv", kv, "--decode", str(new_tokens), "--repeats", str(repeats)]
    if lora is not None:
        args += ["--lora", str(lora)]
    if not repack:
        args.append("--no-repack")
    n_prompt, prompt_s, n_new, decode_s, *ids = _call(args, " ".join(str(int(t)) for t in prompt) + "\n", root).split()
    return {"prompt_tokens": int(n_prompt), "prompt_tok_s": int(n_prompt) / float(prompt_s),
            "new_tokens": int(n_new), "decode_tok_s": int(n_new) / float(decode_s), "decode_s": float(decode_s),
            "generated": [int(t) for t in ids], "threads": threads, "repeats": repeats, "kv": kv, "repack": repack}


def dequantize(model: str | os.PathLike, root: Path | None = None) -> dict[str, np.ndarray]:
    """Every tensor of the GGUF file ``model`` decoded to float32 by ggml itself (its ``to_float`` row decoders,
    as llama.cpp's CPU backend reads the blocks), by name, in numpy's order (rows, row length) for a matrix."""
    with tempfile.TemporaryDirectory(prefix="lqlr-llama-") as tmp:
        out = Path(tmp) / "weights.f32"
        listing = _call(["-m", str(model), "--dequantize", "-o", str(out)], "", root)
        data = np.fromfile(out, dtype="<f4")
    tensors, at = {}, 0
    for line in listing.splitlines():
        name, *ne = line.split()
        shape = [int(v) for v in ne]
        while len(shape) > 1 and shape[-1] == 1:
            shape.pop()
        n = int(np.prod(shape))
        tensors[name] = data[at:at + n].reshape(shape[::-1])
        at += n
    if at != data.size:
        raise LlamaCppError(f"{PROGRAM} --dequantize wrote {data.size} floats, its listing says {at}")
    return tensors


def tokenize(model: str | os.PathLike, text: str, special: bool = True, root: Path | None = None) -> list[int]:
    """llama.cpp's token ids of ``text`` with ``model``'s vocabulary (BOS/EOS as the file says, unless not
    ``special``; special tokens written in ``text`` are parsed)."""
    args = ["-m", str(model), "--tokenize"] + ([] if special else ["--no-special"])
    return [int(t) for t in _call(args, text, root).split()]


def main(argv: list[str] | None = None) -> None:
    """``python -m lqlr.util.llamacpp {build,path}``; errors: one line on stderr, exit status 1."""
    p = argparse.ArgumentParser(prog="python -m lqlr.util.llamacpp", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help=f"build llama.cpp from the {PACKAGE}=={VERSION} sdist (cached)")
    b.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: the CPU count)")
    b.add_argument("--tools", default=None,
                   help=f"also build llama.cpp's own tools, comma-separated: {','.join(TOOLS)} (opt in; ~10 min)")
    q = sub.add_parser("path", help=f"print the built {PROGRAM}, or why there is none (exit 1)")
    q.add_argument("--tool", default=None, help=f"print a built tool instead ({', '.join(TOOLS)})")
    a = p.parse_args(argv)
    try:
        if a.command == "build":
            echo = lambda s: print(s, flush=True)
            build(jobs=a.jobs, echo=echo)
            if a.tools:
                build_tools([t.strip() for t in a.tools.split(",") if t.strip()], jobs=a.jobs, echo=echo)
        else:
            print(tool(a.tool) if a.tool else find())
    except LlamaCppError as err:
        sys.exit(f"python -m lqlr.util.llamacpp {a.command}: error: {err}")


if __name__ == "__main__":
    main()
