"""Reading safetensors into owned memory (lqlr.io.weights), checked against safetensors' own loader,
and the loaders that use it: no mapping of the export's file is left behind."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lqlr.io.export import IntegrityError
from lqlr.io.weights import read_header, read_tensors


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w16": torch.randn(37, 11, generator=g).half(),
        "wbf": torch.randn(5, 300, generator=g).bfloat16(),
        "w32": torch.randn(64, generator=g),
        "codes": torch.randint(0, 255, (1001,), generator=g, dtype=torch.uint8),
        "idx": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_read_equals_safetensors(sample: Path) -> None:
    ref = load_file(str(sample))
    got = read_tensors(sample, chunk_bytes=64)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("target", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk", [2, 6, 64, 1 << 20])
def test_chunked_conversion_equals_to(sample: Path, target: torch.dtype, chunk: int) -> None:
    ref = load_file(str(sample))
    got = read_tensors(sample, dtype=lambda k, d: target if d.is_floating_point else d, chunk_bytes=chunk)
    for k, v in ref.items():
        want = v.to(target) if v.is_floating_point() else v
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), (k, chunk)


def test_names_subset_and_header(sample: Path) -> None:
    header, start = read_header(sample)
    assert set(header) == set(load_file(str(sample)))
    assert start > 8 and header["w16"]["dtype"] == "F16"
    got = read_tensors(sample, names={"w32", "idx"})
    assert set(got) == {"w32", "idx"}


def test_truncated_file_is_a_clear_error(sample: Path, tmp_path: Path) -> None:
    data = sample.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(IntegrityError, match="truncated"):
        read_tensors(cut)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(IntegrityError, match="too short"):
        read_tensors(tmp_path / "tiny.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((100).to_bytes(8, "little") + b"{" * 100)
    with pytest.raises(IntegrityError, match="not JSON"):
        read_tensors(bad)


def _mapped(path: Path) -> bool:
    return any(str(path.resolve()) in line for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaders_leave_no_mapping(stories_export: Path) -> None:
    """After from_pretrained and lqlr.load, the export's model.safetensors is not mapped (no resident
    file pages on top of the model's tensors), and the models are unchanged: same logits."""
    import lqlr
    from transformers import AutoModelForCausalLM

    weights = stories_export / "model.safetensors"
    ids = torch.arange(1, 17)[None]
    a = AutoModelForCausalLM.from_pretrained(stories_export)
    assert not _mapped(weights)
    b = lqlr.load(stories_export)
    assert not _mapped(weights)
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert torch.equal(la, lb)
    assert a.lm_head.weight is a.get_input_embeddings().weight or not a.config.tie_word_embeddings
    assert {p.dtype for p in a.parameters() if p.is_floating_point()} == {torch.float32}
    h = AutoModelForCausalLM.from_pretrained(stories_export, dtype=torch.float16)
    assert not _mapped(weights)
    assert h.get_input_embeddings().weight.dtype == torch.float16
