"""Device-agnostic math: every tensor is made on the device of its inputs, the device setting, the
GPU out-of-memory fallback, and (marked ``cuda``) the GPU results against the CPU ones."""
import logging
from contextlib import contextmanager

import pytest
import torch

import lqlr
from lqlr.calibrate.capture import capture_hessians
from lqlr.core.grids import make_grid, quantize_rtn
from lqlr.core.incoherence import Rotation
from lqlr.core.lowrank import rank_k_fit
from lqlr.core.packing import pack, unpack
from lqlr.engine import runners
from lqlr.engine.runners import LocalRunner, MatrixJob, local_runner, run_job
from lqlr.nn.layer import QLRLinear
from lqlr.util.devices import resolve_device

from conftest import correlated_hessian

CONFIGS = [dict(bq=2, rank=8, iters=2), dict(bq=3, rank=8, iters=2, incoherence=True), dict(bq=2, rank=0, grid="nf"),
           dict(bq=2, rank=8, iters=2, svd="randomized", q2n=True, act_order=True),
           dict(bq=4, rank=4, bl=16, br=16, iters=2, order="q_first"), dict(bq=3, rank=6, bl=3, br=3, factor_grid="nf", iters=2)]


def _problem(out=96, n=1152, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=gen), correlated_hessian(n, seed=seed + 1)


@contextmanager
def default_device_meta():
    """Inside, any tensor made without naming a device lands on ``meta`` and fails when mixed with real
    data, so code that passes runs wherever its inputs are (what a CUDA run needs), on a CPU-only machine."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_decompose_and_the_layer_make_nothing_off_their_inputs_device(cfg):
    W, H = _problem()
    x = torch.randn(3, W.shape[1])
    with default_device_meta():
        d = lqlr.decompose(W, H, lqlr.QLRConfig(group_size=64, **cfg))
        layer = QLRLinear.from_decomposition(d, None)
        layer.set_kernel("reference")
        y = layer(x)
        L, R = layer.factors()
        Wd = layer.dequantize()
    assert d.weight().device.type == y.device.type == L.device.type == R.device.type == Wd.device.type == "cpu"
    assert torch.isfinite(y).all()


def test_primitives_make_nothing_off_their_inputs_device():
    W, H = _problem(64, 2048)
    C = torch.linalg.cholesky(H)
    codes = torch.randint(0, 8, (1000,), dtype=torch.uint8)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5))
    ids = torch.randint(0, 11, (2, 4))
    with default_device_meta():
        L, R = rank_k_fit(W, C, 8, method="randomized")  # the range finder's random matrix
        V = Rotation(2048, 3).matrix(device="cpu")
        q = quantize_rtn(W, make_grid("nf", 3, 64)).dequantize()
        back = unpack(pack(codes, 3), 3, 1000)
        (H1, n), = capture_hessians(model, ids, ["1"], progress=False).values()
    assert L.device.type == R.device.type == V.device.type == q.device.type == H1.device.type == "cpu"
    assert torch.equal(back, codes) and n == 8


def test_device_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU.*device=cpu or device=auto"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device='gpu': choose auto"):
        lqlr.CompressConfig(device="gpu")
    assert local_runner(device="auto").device is None  # the CPU path: no copies, the same bytes as before


def test_gpu_out_of_memory_falls_back_to_the_cpu_for_that_matrix(monkeypatch, caplog):
    W, H = _problem(32, 128)
    job = MatrixJob(name="m", W=W, H=H, qcfg=lqlr.QLRConfig(bq=2, rank=0, group_size=64), use_hessian=True,
                    bias=None, kind="linear", n_tokens=1)
    real, seen = runners._run_job, []

    def fake(job, threads, device):
        seen.append(str(device))
        if str(device).startswith("cuda"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(job, threads, device)

    monkeypatch.setattr(runners, "_run_job", fake)
    with caplog.at_level(logging.WARNING, logger="lqlr"):
        res = run_job(job, device="cuda", cpu_fallback=True)
    assert seen == ["cuda", "cpu"] and "out of GPU memory" in caplog.text and res.report.shape == (32, 128)
    ref = real(job, None, None)
    assert torch.equal(res.module.q_codes, ref.module.q_codes)
    from lqlr.engine.runners import OutOfMemory

    with pytest.raises(OutOfMemory, match="device=auto"):  # device=cuda named explicitly: no silent fallback
        LocalRunner(device="cuda").gather([job])


# ----- on a GPU: the same numbers as on the CPU ------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_decompose_on_cuda_matches_the_cpu(cfg):
    W, H = _problem(256, 2048)
    qcfg = lqlr.QLRConfig(group_size=64, **cfg)
    cpu = lqlr.decompose(W, H, qcfg)
    gpu = lqlr.decompose(W.cuda(), H.cuda(), qcfg)
    assert gpu.weight().device.type == "cuda"
    assert gpu.bits_per_param == cpu.bits_per_param
    assert gpu.error == pytest.approx(cpu.error, rel=0.03)  # fp32 on another device: rounding ties may differ
    rel = torch.linalg.norm(gpu.weight().cpu() - cpu.weight()) / torch.linalg.norm(cpu.weight())
    assert rel < 0.05


@pytest.mark.cuda
def test_layer_and_capture_on_cuda_match_the_cpu():
    W, H = _problem(128, 1024)
    d = lqlr.decompose(W, H, lqlr.QLRConfig(bq=3, rank=8, iters=2, incoherence=True))
    layer = QLRLinear.from_decomposition(d, torch.randn(128))
    x = torch.randn(4, 1024)
    ref = layer(x)
    gpu = layer.to("cuda")
    torch.testing.assert_close(gpu(x.cuda()).cpu(), ref, rtol=1e-4, atol=1e-4)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 64), torch.nn.Linear(64, 32))
    ids = torch.randint(0, 50, (3, 16))
    (Hc, _), = capture_hessians(model, ids, ["1"], progress=False).values()
    (Hg, _), = capture_hessians(model.cuda(), ids, ["1"], progress=False).values()
    torch.testing.assert_close(Hg.cpu(), Hc, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.slow
def test_compress_on_cuda_matches_the_cpu(tmp_path):
    cfg = dict(qlr=lqlr.QLRConfig(bq=2, rank=4, group_size=32, iters=2, incoherence=True),
               calibration=lqlr.CalibrationConfig(source="wikitext2", n_samples=8, seq_len=64))
    out = {}
    for device in ("cpu", "cuda"):
        res = lqlr.compress("stories260k", lqlr.CompressConfig(device=device, **cfg), output_dir=tmp_path / device,
                            progress=False)
        out[device] = res
    assert [r.bits_per_param for r in out["cuda"].reports] == [r.bits_per_param for r in out["cpu"].reports]
    for a, b in zip(out["cuda"].reports, out["cpu"].reports):
        assert a.error == pytest.approx(b.error, rel=0.05, abs=1e-4)
    ppl = {k: lqlr.evaluate(tmp_path / k, max_windows=4)["ppl"] for k in out}
    assert ppl["cuda"] == pytest.approx(ppl["cpu"], rel=0.02)


def test_random_matrices_follow_their_inputs_device():
    """The range finder's test matrix and the rotation's parts are drawn on the host (the same values for
    a seed on every device) and moved to the data: meta inputs give meta outputs, with no CPU tensor mixed in."""
    from lqlr.core.lowrank import _top_svd

    W, C = torch.randn(64, 2048, device="meta"), torch.randn(2048, 2048, device="meta")
    L, R = rank_k_fit(W, C, 8, method="randomized")
    assert L.device.type == R.device.type == "meta" and L.shape == (64, 8) and R.shape == (8, 2048)
    seen = []  # (meta kernels do not check devices, so look at what the range finder multiplies by)
    _top_svd(lambda X: seen.append(X.device.type) or W @ X, lambda Y: W.T @ Y, 64, 2048, 8, None, "randomized", 0,
             W.device)
    assert seen and set(seen) == {"meta"}
    X = torch.randn(5, 2048, device="meta")
    assert Rotation(2048, 3).apply(X).device.type == Rotation(2048, 3).apply_inverse(X).device.type == "meta"


def test_out_of_memory_without_a_fallback_is_one_line_naming_the_matrix_and_the_fix(monkeypatch):
    from lqlr.engine.runners import OutOfMemory

    W, H = _problem(32, 128)
    job = MatrixJob(name="model.layers.3.mlp.down_proj", W=W, H=H, qcfg=lqlr.QLRConfig(bq=2, rank=8, group_size=64),
                    use_hessian=True, bias=None, kind="linear", n_tokens=1)

    def gpu_oom(job, threads, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.3 GiB total)")

    monkeypatch.setattr(runners, "_run_job", gpu_oom)
    with pytest.raises(OutOfMemory) as err:
        run_job(job, device="cuda")
    msg = str(err.value)
    assert "\n" not in msg and "model.layers.3.mlp.down_proj (32×128" in msg and "needs about 0 MiB" in msg
    assert "device=auto" in msg and "Tried to allocate 20.00 GiB" in msg and "checkpointed" in msg

    def cpu_oom(job, threads, device):
        raise MemoryError()

    monkeypatch.setattr(runners, "_run_job", cpu_oom)
    with pytest.raises(OutOfMemory, match="ran out of CPU memory.*MemoryError"):
        run_job(job)
