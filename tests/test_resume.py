"""Resumable compression: per-block checkpoints, SIGKILL at several points, byte-identical output."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lqlr
from lqlr.config import CompressConfig
from lqlr.engine.blocks import compress_model
from lqlr.engine.checkpoints import BlockCheckpoints
from lqlr.engine.models import load_model
from lqlr.nn.layer import QLRLinear

CFG = CompressConfig(qlr=lqlr.QLRConfig(bq=2, rank=4, group_size=32, iters=2, incoherence=True))


def _packed(model):
    return {f"{n}.{k}": v for n, m in model.named_modules() if isinstance(m, QLRLinear) for k, v in m.packed_tensors().items()}


@pytest.mark.parametrize("mode", ["sequential", "independent"])
def test_resume_from_partial_checkpoints_is_bit_identical(tmp_path, mode):
    cfg = CompressConfig(qlr=CFG.qlr, hessian_mode=mode)
    calib = torch.randint(3, 512, (6, 48), generator=torch.Generator().manual_seed(0))
    ref = load_model("stories260k")[0]
    compress_model(ref, calib, cfg, progress=False)
    first = load_model("stories260k")[0]
    compress_model(first, calib, cfg, progress=False, checkpoints=BlockCheckpoints(tmp_path, "run-1"))
    assert len(list(tmp_path.glob("block_*.safetensors"))) == 5
    for i in (2, 3, 4):  # the run "died" after block 1
        (tmp_path / f"block_{i:05d}.safetensors").unlink()
    (tmp_path / "block_00002.safetensors.tmp").write_bytes(b"half-written")  # an interrupted write
    resumed = load_model("stories260k")[0]
    reports = compress_model(resumed, calib, cfg, progress=False, checkpoints=BlockCheckpoints(tmp_path, "run-1"))
    assert len(reports) == 35 and not list(tmp_path.glob("*.tmp"))
    a, b = _packed(ref), _packed(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="different run"):
        compress_model(load_model("stories260k")[0], calib, cfg, progress=False, checkpoints=BlockCheckpoints(tmp_path, "run-2"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume(tmp_path):
    base = [sys.executable, "-m", "lqlr.cli", "model=stories260k", "data=wikitext2", "data.n_samples=16", "data.seq_len=128",
            "method=caldera", "method.rank=8", "method.iters=8", "budget=none", "eval.enabled=false", "progress=false"]
    env = dict(os.environ, HYDRA_FULL_ERROR="1")

    def command(out):
        return base + [f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra' / out.name}"]

    straight = tmp_path / "straight"
    subprocess.run(command(straight), check=True, env=env, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    ckpt = killed.with_name(killed.name + ".checkpoints")
    for n_blocks in (1, 3):  # kill after the first block, then again after the third
        proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while len(list(ckpt.glob("block_*.safetensors"))) < n_blocks and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (killed / "manifest.json").exists()  # the manifest is written last
    subprocess.run(command(killed), check=True, env=env, capture_output=True, timeout=600)
    assert not ckpt.exists()  # cleaned up once the export is complete
    a, b = _files(straight), _files(killed)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []  # byte-identical export


def test_same_seed_same_bytes(tmp_path):
    outs = []
    for name in ("a", "b"):
        config = lqlr.CompressConfig(qlr=CFG.qlr, calibration=lqlr.CalibrationConfig(source="wikitext2", n_samples=8, seq_len=64))
        res = lqlr.compress("stories260k", config, output_dir=tmp_path / name, progress=False)
        outs.append(_files(res.output_dir))
    assert outs[0] == outs[1]
