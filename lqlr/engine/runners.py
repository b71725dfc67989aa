"""Where the matrix decompositions of a compression run: in this process or as Ray tasks.

:func:`lqlr.compress.compress_model` captures each block's Hessians itself and hands the block's
matrices to a runner as :class:`MatrixJob` s (W, H and the matrix's config: everything a
decomposition needs, no model). ``runner.submit(jobs)`` starts them and ``runner.gather(handle)``
returns one :class:`MatrixResult` per job, in order. Both runners call the same pure
:func:`run_job`, with the same number of intra-op threads (CPU float results depend on it), so a
run gives the same bytes whichever runner did the work.

* :class:`LocalRunner`: one matrix after another in this process (the default).
* :class:`RayRunner`: one Ray task per matrix, on a local Ray instance or an existing cluster;
  GPU tasks when the cluster has GPUs; a task whose worker dies is retried by Ray.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from lqlr.config import QLRConfig
from lqlr.core.decompose import decompose
from lqlr.core.hessian import h_weighted_error
from lqlr.nn.layer import QLRLinear
from lqlr.util.devices import is_out_of_memory, resolve_device

log = logging.getLogger("lqlr")

RUNNERS = ("local", "ray")


@dataclass
class ModuleReport:
    """What happened to one matrix."""

    name: str
    shape: tuple[int, int]
    kind: str  # "linear" or "conv1d"
    bits_per_param: float
    q_bits_per_param: float
    error: float  # tr(E H Eᵀ) / tr(W H Wᵀ) under the calibration H
    rank: int
    time_s: float
    n_tokens: int
    pack_s: float = 0.0  # building the packed QLRLinear from the decomposition

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MatrixJob:
    """One matrix to decompose: min tr((Q + LR − W) H (Q + LR − W)ᵀ) under ``qcfg``."""

    name: str
    W: torch.Tensor  # (out, in) float32
    H: torch.Tensor  # (in, in) the calibration Hessian (errors are always reported under it)
    qcfg: QLRConfig
    use_hessian: bool  # False: decompose under H = I
    bias: torch.Tensor | None  # (out,) copied into the QLRLinear
    kind: str  # "linear" or "conv1d": how the dense export stores W
    n_tokens: int


@dataclass
class MatrixResult:
    """The packed module that replaces the matrix, and its report."""

    module: Any  # QLRLinear
    report: Any  # lqlr.compress.ModuleReport


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(n)`` (None: leave it as it is)."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def run_job(job: MatrixJob, threads: int | None = None, device: str | torch.device | None = None,
            cpu_fallback: bool = False) -> MatrixResult:
    """Decompose one matrix with ``threads`` intra-op threads on ``device`` (None: where W is);
    the result lives on W's original device. Pure: no model, no I/O. ``cpu_fallback``: a GPU
    out-of-memory error is logged and the matrix is decomposed again on the CPU."""
    where = torch.device(device or job.W.device)
    try:
        return _run_job(job, threads, device)
    except MemoryError as err:  # the CPU allocator gave up (the OOM killer may strike first)
        raise OutOfMemory(_oom_message(job, "CPU", err, "free memory, or use device=cuda when a GPU is present")) from err
    except Exception as err:
        if not is_out_of_memory(err) or where.type == "cpu":
            raise
        if not cpu_fallback:
            raise OutOfMemory(_oom_message(job, f"GPU ({where})", err, "use device=auto (retries such a matrix on the "
                                           "CPU) or device=cpu")) from err
        log.warning("%s (%d×%d): out of GPU memory on %s, decomposing it on the CPU instead", job.name,
                    *job.W.shape, device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return _run_job(job, threads, "cpu")


class OutOfMemory(MemoryError):
    """A matrix decomposition ran out of memory; the message names the matrix, the need and the fix."""


def _oom_message(job: MatrixJob, where: str, err: BaseException, fix: str) -> str:
    out_f, in_f = job.W.shape
    # W, H, Q, the rotated copies and the LDLQ factor: a few (out × in) and (in × in) fp32 matrices
    need = 4 * (4 * out_f * in_f + 3 * in_f * in_f)  # bytes
    size = f"{need / 2**30:.1f} GiB" if need >= 2**30 else f"{need / 2**20:.0f} MiB"
    said = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return (f"{job.name} ({out_f}×{in_f}, rank {job.qcfg.rank}) ran out of {where} memory: it needs about {size} "
            f"for its decomposition ({said}); {fix}. Finished blocks stay checkpointed (resume=true): rerun to continue")


def _run_job(job: MatrixJob, threads: int | None, device: str | torch.device | None) -> MatrixResult:
    home = job.W.device
    W, H = (job.W, job.H) if device is None else (job.W.to(device), job.H.to(device))
    qcfg = job.qcfg
    if qcfg.rank > min(W.shape):  # a uniform rank larger than a small matrix: use its full rank
        qcfg = replace(qcfg, rank=min(W.shape))
    with intra_op_threads(threads):
        t0 = time.perf_counter()
        d = decompose(W, H if job.use_hessian else None, qcfg)
        seconds = time.perf_counter() - t0
        error = d.error if job.use_hessian else h_weighted_error(d.weight() - W, H) / (h_weighted_error(W, H) or 1.0)
        t0 = time.perf_counter()
        module = QLRLinear.from_decomposition(d, job.bias).to(home)
        pack_s = time.perf_counter() - t0
    module.spec["layout"] = job.kind
    report = ModuleReport(name=job.name, shape=tuple(W.shape), kind=job.kind, bits_per_param=d.bits_per_param,
                          q_bits_per_param=d.breakdown.q_bits_per_param, error=float(error), rank=d.rank,
                          time_s=seconds, n_tokens=job.n_tokens, pack_s=pack_s)
    return MatrixResult(module=module, report=report)


class LocalRunner:
    """Decompose in this process, one matrix at a time, with ``threads`` intra-op threads
    (None: torch's current setting) on ``device`` (None: where each matrix is; ``cpu_fallback``:
    a matrix that runs out of GPU memory is decomposed on the CPU)."""

    def __init__(self, threads: int | None = None, device: str | torch.device | None = None,
                 cpu_fallback: bool = False) -> None:
        self.threads = threads
        self.device = device
        self.cpu_fallback = cpu_fallback

    def depth(self, matrices_per_block: int) -> int:
        """Nothing runs in the background: each block is gathered at once."""
        return 0

    def submit(self, jobs: list[MatrixJob]) -> list[MatrixJob]:
        return jobs

    def gather(self, handle: list[MatrixJob]) -> list[MatrixResult]:
        return [run_job(job, self.threads, self.device, self.cpu_fallback) for job in handle]

    def close(self) -> None:
        pass


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError('runner=ray needs Ray, which is not installed: pip install "lqlr[ray]"') from None
    return ray


def _ray_task(job: MatrixJob, threads: int, device: str | None) -> MatrixResult:
    """Body of one Ray task: the worker's thread count is set explicitly, so results match a local run."""
    return run_job(job, threads, device)


class RayRunner:
    """One Ray task per matrix.

    ``address``: None starts a local Ray instance (``num_cpus`` CPUs, None: all) unless Ray is already
    initialised in this process; ``"auto"`` joins the cluster this machine belongs to; ``"ray://host:10001"``
    connects through Ray Client. Each task decomposes with ``threads`` intra-op threads (None: this
    process's ``torch.get_num_threads()``, as the local runner) and reserves ``num_cpus_per_task`` CPUs
    (None: ``threads``, or 1 for a GPU task) and ``num_gpus_per_task`` GPUs (None: 1 when the cluster has GPUs, else 0;
    a GPU task decomposes on its GPU, so its bytes match a local run on a GPU, not on a CPU).
    A task whose worker dies is retried up to ``max_retries`` times; an exception raised by the
    decomposition itself (bad H, ...) is not retried and surfaces as is. ``pipeline_blocks``: how many
    blocks may be in flight at once in ``independent`` Hessian mode (None: enough to fill the cluster).
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, threads: int | None = None,
                 num_cpus_per_task: float | None = None, num_gpus_per_task: float | None = None,
                 max_retries: int = 3, pipeline_blocks: int | None = None) -> None:
        for key, value in (("threads", threads), ("ray.num_cpus", num_cpus)):
            if value is not None and value < 1:
                raise ValueError(f"{key}={value}: must be >= 1 (or null)")
        for key, value in (("num_cpus_per_task", num_cpus_per_task), ("num_gpus_per_task", num_gpus_per_task)):
            if value is not None and value < 0:
                raise ValueError(f"ray.{key}={value}: must be >= 0 (or null)")
        if max_retries < 0:
            raise ValueError(f"ray.max_retries={max_retries}: must be >= 0")
        ray = _import_ray()
        self._ray = ray
        self._owner = not ray.is_initialized()
        if self._owner:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None:
                kwargs["num_cpus"] = num_cpus
            ray.init(address=address, **kwargs)
        self.threads = threads or torch.get_num_threads()
        resources = ray.cluster_resources()
        gpus = num_gpus_per_task if num_gpus_per_task is not None else (1.0 if resources.get("GPU", 0) > 0 else 0.0)
        if num_cpus_per_task is not None:
            cpus = num_cpus_per_task
        else:  # a CPU task reserves a core per thread; a GPU task one core
            cpus = 1.0 if gpus > 0 else float(self.threads)
        if cpus > resources.get("CPU", 0) or gpus > resources.get("GPU", 0):
            self.close()
            raise ValueError(f"a task needs {cpus:g} CPUs and {gpus:g} GPUs but the Ray cluster has "
                             f"{resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs: "
                             "lower threads / ray.num_cpus_per_task / ray.num_gpus_per_task")
        self.device = "cuda" if gpus > 0 else None
        self.slots = int(resources.get("GPU", 0) // gpus) if gpus > 0 else int(resources.get("CPU", 1) // max(cpus, 1e-9))
        self.pipeline_blocks = pipeline_blocks
        self._options = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": max_retries, "retry_exceptions": False}
        self._task = ray.remote(_ray_task).options(**self._options)

    def depth(self, matrices_per_block: int) -> int:
        """Blocks kept in flight in independent mode: ``pipeline_blocks``, or enough to fill every slot."""
        if self.pipeline_blocks is not None:
            return self.pipeline_blocks
        return math.ceil(max(self.slots, 1) / max(matrices_per_block, 1))

    def submit(self, jobs: list[MatrixJob]) -> list:
        """Start one task per job; tensors travel on the CPU (the worker may have no GPU)."""
        handle = []
        for job in jobs:
            cpu = replace(job, W=job.W.cpu(), H=job.H.cpu(), bias=None if job.bias is None else job.bias.cpu())
            handle.append((job.W.device, self._task.remote(cpu, self.threads, self.device)))
        return handle

    def gather(self, handle: list) -> list[MatrixResult]:
        """Wait for the tasks; each module comes back to the device its matrix came from."""
        results = self._ray.get([ref for _, ref in handle])
        for (device, _), res in zip(handle, results):
            res.module = res.module.to(device)
        return results

    def close(self) -> None:
        """Shut Ray down if this runner started it."""
        if self._owner and self._ray.is_initialized():
            self._ray.shutdown()


def check_runner(kind: str, threads: int | None = None) -> None:
    """Fail fast, with a one-line message, on a runner that cannot be made (before any slow step)."""
    if kind not in RUNNERS:
        raise ValueError(f"runner={kind!r}: choose one of {RUNNERS}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads}: must be >= 1 (or null for torch's default)")
    if kind == "ray":
        _import_ray()


def make_runner(kind: str = "local", threads: int | None = None, device: str = "auto",
                **ray_options) -> LocalRunner | RayRunner:
    """A runner by name (``local`` or ``ray``); ``ray_options`` go to :class:`RayRunner` (whose
    tasks take a GPU of the cluster when it has one). ``device``: where a local runner decomposes
    (lqlr.util.devices.resolve_device; ``auto`` falls back to the CPU on GPU out-of-memory)."""
    check_runner(kind, threads)
    if kind == "local":
        return local_runner(threads, device)
    return RayRunner(threads=threads, **ray_options)


def local_runner(threads: int | None = None, device: str = "auto") -> LocalRunner:
    """A :class:`LocalRunner` on the device ``device`` names (the CPU path is unchanged: no copies)."""
    target = resolve_device(device)
    if target.type == "cpu":
        return LocalRunner(threads)
    return LocalRunner(threads, target, cpu_fallback=device == "auto")
