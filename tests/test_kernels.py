"""The compiled packed kernel against the pure-torch reference path, and the fallback without it.

Tests that need the extension are skipped where it cannot be built (no compiler / ninja); the
fallback tests force it off with LQLR_NO_EXTENSION and always run.
"""
import pytest
import torch

import lqlr
from lqlr.core.grids import QuantizedTensor, make_grid, n_groups
from lqlr.core.incoherence import Rotation
from lqlr.nn.kernels import KERNELS, extension, resolve
from lqlr.nn.kernels.build import DISABLE_ENV
from lqlr.nn.kernels.plan import packed_matrix, rotation
from lqlr.nn.layer import QLRLinear, set_kernel


@pytest.fixture(scope="module")
def ext():
    e = extension()
    if e is None:
        pytest.skip("the C++ kernel extension is not available here (no compiler or ninja)")
    return e


def _random_qt(rows: int, cols: int, kind: str, bits: int, group: int, seed: int) -> QuantizedTensor:
    gen = torch.Generator().manual_seed(seed)
    ng = n_groups(cols, group)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=gen).to(torch.uint8)
    scale = (torch.rand(rows, ng, generator=gen) + 0.1).to(torch.float16).float()
    zero = torch.randint(0, 2**bits, (rows, ng), generator=gen).float() if kind == "uniform" else None
    kind, _, state_bits = kind.partition("@")  # "trellis@7": a trellis of 7 state bits
    grid = make_grid(kind, bits, group, clip_search=False, state_bits=int(state_bits) if state_bits else None)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, grid=grid)


class _Holder:  # the attributes packed_matrix reads from a layer
    def __init__(self, qt: QuantizedTensor) -> None:
        self.spec = {"q": qt.grid.spec()}
        for k, v in qt.packed().items():
            setattr(self, f"q_{k}", v)


CASES = [  # (rows, cols, kind, bits, group): aligned, odd widths, short last groups, groups not a multiple of 8
    (33, 128, "uniform", 2, 64), (17, 96, "uniform", 3, 32), (9, 100, "uniform", 3, 64), (12, 72, "uniform", 4, 20),
    (8, 64, "uniform", 5, 64), (7, 40, "uniform", 6, 16), (5, 56, "uniform", 7, 8), (6, 48, "uniform", 8, 16),
    (4, 24, "uniform", 1, 8), (10, 130, "nf", 4, 64), (11, 64, "nf", 3, 32), (3, 18, "nf", 2, 18),
    (33, 128, "e8p", 2, 64), (9, 96, "e8p", 2, 4096), (5, 40, "e8p", 2, 8),  # E8P: every 16-bit index is a codeword
    # trellis: every digit stream is a code; full 16-row tiles and a last shorter one, L a multiple of k or not
    (33, 128, "trellis", 2, 64), (40, 96, "trellis", 3, 4096), (16, 32, "trellis", 4, 16), (7, 48, "trellis@7", 3, 16),
    (18, 64, "trellis@16", 2, 32),
]


@pytest.mark.parametrize("rows,cols,kind,bits,group", CASES)
def test_packed_matmul_and_dequantize_match_the_reference(ext, rows, cols, kind, bits, group):
    qt = _random_qt(rows, cols, kind, bits, group, seed=rows * cols + bits)
    W = qt.dequantize()  # the pure-torch reference, (rows, cols)
    P = packed_matrix(ext, _Holder(qt), "q", rows, cols)
    assert torch.equal(ext.dequantize(P), W)  # same arithmetic: (c − z)·s or level[c]·s
    gen = torch.Generator().manual_seed(7)
    for M in (1, 2, 3, 4, 5, 9, 40):  # GEMV blocks of 1–4 rows, and the tile + GEMM path above 8 rows
        x = torch.randn(M, cols, generator=gen)
        y = ext.matmul(P, x, 8)
        ref = (x.double() @ W.double().T).float()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("n", [1, 8, 64, 96, 576, 1536])
def test_rotation_kernel_matches_the_dense_rotation(ext, n):
    rot = Rotation(n, seed=n + 3)
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    V = rot.matrix().double()  # dense V, built independently of the fast transform
    R = rotation(ext, rot)
    torch.testing.assert_close(ext.rotate(R, x, False).double(), x.double() @ V.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ext.rotate(R, x, True).double(), x.double() @ V, rtol=1e-5, atol=1e-5)


def _layer(bq=2, rank=6, bl=4, br=4, grid="uniform", factor_grid="uniform", incoherence=True, bias=True,
           shape=(48, 96), seed=0) -> QLRLinear:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=gen)
    cfg = lqlr.QLRConfig(bq=bq, rank=rank, bl=bl, br=br, group_size=32, iters=2, grid=grid, factor_grid=factor_grid,
                         incoherence=incoherence, seed=seed)
    b = torch.randn(shape[0], generator=gen) if bias else None
    return QLRLinear.from_decomposition(lqlr.decompose(W, None, cfg), bias=b)


LAYERS = {
    "q+lr+rotation+bias": {},
    "q only": dict(rank=0, incoherence=False, bias=False),
    "fp16 factors": dict(bl=16, br=16),
    "nf grids": dict(grid="nf", factor_grid="nf", bq=3),
    "odd dims (3·2^k)": dict(shape=(24, 40), rank=3),
    "e8p q + lr": dict(grid="e8p", bq=2),
    "trellis q + lr": dict(grid="trellis", bq=2),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_kernels_match_the_reference_forward(ext, name):
    layer = _layer(**LAYERS[name])
    x = torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = layer.reference_forward(x)
        for kind in ("packed", "dense-fp32", "dense-bf16", "dense-fp16"):
            layer.set_kernel(kind)
            assert layer.kernel == kind
            for rows in (x[:, :1], x):  # decode (GEMV) and prefill (tile) shapes
                y = layer(rows)
                tol = 1e-5 if kind in ("packed", "dense-fp32") else 2e-2
                scale = float(ref.abs().max())
                torch.testing.assert_close(y, ref[:, : rows.shape[1]], rtol=tol, atol=tol * scale)


def test_kernel_is_skipped_when_autograd_needs_the_layer(ext):
    layer = _layer()
    layer.set_kernel("packed")
    x = torch.randn(3, layer.in_features, requires_grad=True)
    y = layer(x)  # grad mode + input requiring grad: the differentiable reference path
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_plan_follows_reloaded_buffers(ext):
    a, b = _layer(seed=0), _layer(seed=1)
    a.set_kernel("packed")
    x = torch.randn(1, a.in_features)
    with torch.no_grad():
        a(x)
        a.load_packed(b.packed_tensors())
        a.spec = b.spec  # same shapes and grids; rotation seeds from b
        a.bias.copy_(b.bias)
        torch.testing.assert_close(a(x), b.reference_forward(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def stories_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("kern") / "s"
    cfg = lqlr.QLRConfig(bq=2, rank=4, bl=4, br=4, group_size=32, iters=1, incoherence=True)
    config = lqlr.CompressConfig(qlr=cfg, calibration=lqlr.CalibrationConfig(source="wikitext2", n_samples=4, seq_len=64))
    lqlr.compress("stories260k", config, output_dir=out, progress=False)
    return out


@pytest.mark.parametrize("peft", [False, True])
def test_load_kernels_give_the_reference_logits(ext, stories_export, peft):
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lqlr.load(stories_export, peft=peft, kernel="reference")(ids).logits
        for kind, tol in (("auto", 1e-5), ("packed", 1e-5), ("dense-fp32", 1e-5), ("dense-bf16", 5e-2)):
            model = lqlr.load(stories_export, peft=peft, kernel=kind)
            layers = [m for m in model.modules() if isinstance(m, QLRLinear)]
            assert layers and all(m.kernel == ("packed" if kind == "auto" else kind) for m in layers)
            out = model(ids).logits
            assert (out - ref).norm() / ref.norm() <= tol, kind


def test_fallback_without_the_extension(monkeypatch, stories_export):
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert extension() is None
    assert resolve("auto") == "reference"
    with pytest.raises(RuntimeError, match="kernel='packed' needs the compiled extension"):
        resolve("packed")
    model = lqlr.load(stories_export, kernel="auto")
    assert {m.kernel for m in model.modules() if isinstance(m, QLRLinear)} == {"reference"}
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = lqlr.load(stories_export, kernel="dense-fp32")  # dense modes need no compiler
        torch.testing.assert_close(dense(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_bad_kernel_name_is_one_line():
    with pytest.raises(ValueError, match="kernel='fast' is not a kernel: choose one of auto, packed"):
        resolve("fast")
    assert KERNELS[0] == "auto"
    with pytest.raises(ValueError, match="not a kernel"):
        set_kernel(torch.nn.Linear(2, 2), "fast")
