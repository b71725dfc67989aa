"""Bad input gets one clear line naming the problem and the fix, and files on disk stay intact."""
import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import lqlr
from lqlr.budget.fit import InfeasibleBudgetError, fit_to_budget
from lqlr.calibrate.text import calibration_ids, text_from_path
from lqlr.config import CompressConfig
from lqlr.core.arch import UnsupportedModelError
from lqlr.engine.blocks import compress_model
from lqlr.engine.checkpoints import BlockCheckpoints
from lqlr.engine.models import load_model
from lqlr.io.export import IntegrityError, read_manifest, save_compressed
from lqlr.io.load import load
from lqlr.util.files import ExportWriteError

ONE_LINE = r"^[^\n]+$"


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model, tok = load_model("stories260k")
    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    compress_model(model, calib, CompressConfig(qlr=lqlr.QLRConfig(bq=3, rank=4, group_size=32, iters=1)), progress=False)
    out = save_compressed(model, tmp_path_factory.mktemp("export") / "m", source={"model": "stories260k"}, tokenizer=tok)
    return model, out


@pytest.fixture
def copy(export, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(export[1], dst)
    return dst


# ---- numbers -------------------------------------------------------------------------------
@pytest.mark.parametrize("W, H, message", [
    (torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]), None, "W contains NaN or Inf"),
    (torch.eye(2), torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), "H contains NaN or Inf"),
    (torch.eye(2), torch.eye(3), r"expected \(2, 2\)"),
    (torch.randn(4), None, "2-D"),
    (torch.randn(2, 2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]), "not positive definite even after damping"),
    (torch.randn(4, 4), -torch.eye(4), "negative diagonal entries"),
])
def test_bad_matrices(W, H, message):
    with pytest.raises(ValueError, match=message) as info:
        lqlr.decompose(W, H, lqlr.QLRConfig(rank=1, group_size=2, iters=1))
    assert "\n" not in str(info.value)


def test_rank_larger_than_the_matrix():
    with pytest.raises(ValueError, match=r"rank=40 exceeds min\(out, in\) = 32"):
        lqlr.decompose(torch.randn(32, 64), None, lqlr.QLRConfig(rank=40))


@pytest.mark.parametrize("kwargs, message", [
    ({"bq": 9}, "bq=9"), ({"bl": 1}, "bl=1"), ({"grid": "e8"}, "grid='e8'"), ({"grid": "nf", "bq": 8}, "nf"),
    ({"iters": 0}, "iters=0"), ({"damp": -1.0}, "damp=-1.0"), ({"svd": "magic"}, "svd='magic'"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lqlr.QLRConfig(**kwargs)


def test_bad_pipeline_values():
    with pytest.raises(ValueError, match="hessian_mode='both'"):
        CompressConfig(hessian_mode="both")
    with pytest.raises(ValueError, match="calibration ids must be"):
        compress_model(load_model("stories260k")[0], torch.zeros(8, dtype=torch.long), CompressConfig(), progress=False)


# ---- models and data -----------------------------------------------------------------------
def test_unsupported_architecture():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="cannot find the decoder blocks"):
        compress_model(NoBlocks(), torch.zeros(1, 4, dtype=torch.long), CompressConfig(), progress=False)


def test_targets_matching_nothing():
    with pytest.raises(ValueError, match="match no linear layer"):
        compress_model(load_model("stories260k")[0], torch.zeros(1, 8, dtype=torch.long),
                       CompressConfig(targets=["not_a_layer"]), progress=False)


def test_infeasible_budget():
    with pytest.raises(InfeasibleBudgetError, match="raise budget.bits"):
        fit_to_budget(lqlr.QLRConfig(rank=0), 64, 64, 1.5)


def test_calibration_text_too_short_or_missing(tmp_path):
    tok = load_model("stories260k")[1]
    with pytest.raises(ValueError, match="needs at least"):
        calibration_ids(tok, "too short", n_samples=2, seq_len=64, seed=0)
    with pytest.raises(ValueError, match="needs at least"):
        calibration_ids(tok, "", n_samples=2, seq_len=64, seed=0)
    with pytest.raises(FileNotFoundError, match="neither a text file nor a folder"):
        text_from_path(tmp_path / "nothing_here")


def test_unknown_model_name():
    with pytest.raises(OSError, match="not a known name"):
        load_model("/definitely/not/a/model")


# ---- files ---------------------------------------------------------------------------------
def test_corrupt_base_file_is_named(copy):
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(data))
    before = _digests(copy)
    with pytest.raises(IntegrityError, match="model.safetensors does not match its sha256"):
        load(copy)
    assert _digests(copy) == before  # loading never writes


def test_truncated_base_file(copy):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(IntegrityError, match="sha256"):
        load(copy)
    with pytest.raises(IntegrityError, match="truncated or corrupt"):
        load(copy, verify=False)


def test_missing_file(copy):
    (copy / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="adapter_model.safetensors is missing"):
        load(copy)


def test_missing_manifest(copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(IntegrityError, match="not an lqlr export, or an unfinished one"):
        load(copy)


def test_manifest_not_json_or_wrong_version(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="is not valid JSON"):
        read_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps({"format": "lqlr", "format_version": 99}))
    with pytest.raises(IntegrityError, match="v99 is not lqlr v1"):
        read_manifest(copy)


def test_manifest_pointing_outside(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="points outside"):
        load(copy, verify=False)


def test_adapter_shapes_must_fit_the_base(copy, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad_adapter"
    shutil.copytree(copy / "adapter", bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(4, 7)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(IntegrityError, match="the adapter was trained for a different model"):
        load(copy, peft=True, adapter=bad)
    with pytest.raises(IntegrityError, match="is not a PEFT adapter folder"):
        load(copy, peft=True, adapter=tmp_path / "nowhere")


def test_output_dir_holding_a_different_run(export):
    model, out = export
    before = _digests(out)
    with pytest.raises(FileExistsError, match="already holds a different lqlr export"):
        save_compressed(model, out, source={"model": "something else"})
    assert _digests(out) == before


def test_disk_full_during_export(export, tmp_path, monkeypatch):
    import lqlr.io.export as E

    model, _ = export
    out = tmp_path / "full"
    save_compressed(model, out, source={"model": "stories260k"})
    before = _digests(out)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(E, "save_file", no_space)
    with pytest.raises(ExportWriteError, match="No space left on device") as info:
        save_compressed(model, out, source={"model": "stories260k"})
    assert "free space" in str(info.value)
    assert _digests(out) == before and not list(out.rglob("*.tmp"))  # the earlier export is intact


def test_disk_full_during_checkpoint(tmp_path, monkeypatch):
    import lqlr.engine.checkpoints as C

    model = load_model("stories260k")[0]
    calib = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    ckpt = BlockCheckpoints(tmp_path, "run")
    calls = {"n": 0}
    real = C.save_file

    def fail_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "save_file", fail_third)
    with pytest.raises(ExportWriteError, match="block_00002.safetensors failed"):
        compress_model(model, calib, CompressConfig(qlr=lqlr.QLRConfig(bq=4, rank=0)), progress=False, checkpoints=ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block_00000.safetensors", "block_00001.safetensors"]
    assert ckpt.load(1) is not None  # finished blocks survive and will be reused


def test_checkpoint_from_another_run(tmp_path):
    model = load_model("stories260k")[0]
    calib = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    compress_model(model, calib, CompressConfig(qlr=lqlr.QLRConfig(bq=4, rank=0)), progress=False,
                   checkpoints=BlockCheckpoints(tmp_path, "a"))
    with pytest.raises(ValueError, match="belongs to a different run"):
        BlockCheckpoints(tmp_path, "b").load(0)


def test_lazy_needs_safetensors_and_real_data(tmp_path):
    from lqlr.engine.lazy import lazy_model

    with pytest.raises(FileNotFoundError, match="needs a safetensors checkpoint"):
        lazy_model(tmp_path)


def test_bad_export_dtype(export, tmp_path):
    with pytest.raises(ValueError, match="untouched_dtype='int8'"):
        save_compressed(export[0], tmp_path / "x", source={}, untouched_dtype="int8")
