"""Shared test helpers: small matrices and anisotropic, correlated Hessians; a stories260K export."""
import os
import shutil
from pathlib import Path

import pytest
import torch


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (``-n N``) each of the N workers, and every process a test starts, gets its share
    of the cores instead of all of them, so that N workers do not oversubscribe the machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        os.environ["OMP_NUM_THREADS"] = str(share)


_share_the_cores_between_workers()


def correlated_hessian(n: int, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """H = X Xᵀ / tokens for inputs with uneven scales and correlated channels (like real LLM inputs)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 0.7, n)[torch.randperm(n, generator=gen)]
    mix = torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / n**0.5
    X = mix @ (torch.randn(n, tokens, generator=gen) * scales[:, None])
    return X @ X.T / tokens


def block_ldlq_reference(W: torch.Tensor, H: torch.Tensor, grid, d: int | None = None) -> torch.Tensor:
    """QuIP's LDLQ written from its definition: H = (I + A) D (I + A)ᵀ, A strictly upper block
    triangular, D block diagonal; Q_b = round(W_b + Σ_{c<b} (W_c − Q_c) A_cb). (I + A) comes from the
    block LDLᵀ factorisation of H⁻¹ = L D⁻¹ Lᵀ by block elimination (L = (I + A)⁻ᵀ), in float64."""
    d = d or grid.dim
    n = H.shape[0]
    S = torch.linalg.inv(H.double())
    L = torch.eye(n, dtype=torch.float64)
    for b in range(0, n, d):
        Sbb = S[b:b + d, b:b + d]
        L[b + d:, b:b + d] = S[b + d:, b:b + d] @ torch.linalg.inv(Sbb)
        S[b + d:, b + d:] -= L[b + d:, b:b + d] @ S[b:b + d, b + d:]
    A = torch.linalg.inv(L).T - torch.eye(n, dtype=torch.float64)
    p = grid.fit(W)
    Q = torch.zeros_like(W, dtype=torch.float64)
    E = torch.zeros_like(W, dtype=torch.float64)
    for b in range(0, n, d):
        target = W[:, b:b + d].double() + E[:, :b] @ A[:b, b:b + d]
        Q[:, b:b + d] = grid.round(target.float(), p).double()
        E[:, b:b + d] = W[:, b:b + d].double() - Q[:, b:b + d]
    return Q.float()


def check_codebook_pipeline(out, qlr_kwargs: dict, kind: str) -> dict:
    """compress stories260K with a codebook Q (+ 4-bit L, R), export, and check that from_pretrained equals
    lqlr.load bit for bit, that the 172-wide down_proj fell back to the uniform grid, that Q packs at 2 bits
    per weight and that the stock PEFT adapter on the packed base gives the same logits. Returns q_proj's spec."""
    import json

    import lqlr
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = lqlr.CompressConfig(qlr=lqlr.QLRConfig(bq=2, rank=4, group_size=64, iters=1, incoherence=True, **qlr_kwargs),
                              calibration=lqlr.CalibrationConfig(source="wikitext2", n_samples=4, seq_len=64))
    lqlr.compress("stories260k", cfg, output_dir=out, progress=False)
    specs = {n: e["spec"]["q"] for n, e in json.loads((out / "manifest.json").read_text())["modules"].items()}
    assert specs["model.layers.0.self_attn.q_proj"]["kind"] == kind
    assert specs["model.layers.0.mlp.down_proj"]["kind"] == "uniform"
    ids = torch.arange(1, 33)[None]
    a, b = AutoModelForCausalLM.from_pretrained(out), lqlr.load(out)
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert torch.equal(la, lb)
    q = b.model.layers[0].self_attn.q_proj
    assert q.q_codes.numel() == q.out_features * q.in_features * 2 // 8  # 2 bits per weight, packed
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), str(out / "adapter"))
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, lb, atol=1e-4, rtol=1e-4)
    return specs["model.layers.0.self_attn.q_proj"]


@pytest.fixture
def W_H():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(96, 128, generator=gen)
    return W, correlated_hessian(128, seed=2)


@pytest.fixture(scope="session")
def stories_export(tmp_path_factory):
    """A stories260K export made once per session by ``lqlr.compress`` (seconds on a CPU): 35 compressed
    linears with BQ = 3 and rank 4 (so L, R and an adapter/), incoherence, the untouched tensors in the
    default 16 bits, the tokenizer. Shared: a test must not write into it (use ``stories_export_copy``);
    teardown fails if its checksums or model card changed."""
    import lqlr
    from lqlr.io.export import read_manifest

    out = tmp_path_factory.mktemp("stories") / "s3"
    cfg = lqlr.CompressConfig(qlr=lqlr.QLRConfig(bq=3, rank=4, group_size=32, iters=1, incoherence=True),
                              calibration=lqlr.CalibrationConfig(source="wikitext2", n_samples=4, seq_len=64))
    lqlr.compress("stories260k", cfg, output_dir=out, progress=False)
    card = (out / "README.md").read_bytes()
    yield out
    read_manifest(out, verify=True)  # IntegrityError if a test changed a file
    assert (out / "README.md").read_bytes() == card, "a test rewrote the shared export's model card"


@pytest.fixture
def stories_export_copy(stories_export, tmp_path):
    """A private copy of ``stories_export`` that the test may change."""
    return Path(shutil.copytree(stories_export, tmp_path / "s3"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA GPU: skipped cleanly without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
