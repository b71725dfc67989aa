"""Runners: Ray tasks give the same bytes as the local runner; dead workers are retried; finished
blocks survive a failed run; launcher configs compose; a multirun sweep through the Ray launcher."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import lqlr
from lqlr.cli.compress import CONFIG_DIR, MainConf, register_configs, run
from lqlr.config import CompressConfig
from lqlr.engine.blocks import compress_model
from lqlr.engine.checkpoints import BlockCheckpoints
from lqlr.engine.models import load_model
from lqlr.engine.runners import (
    LocalRunner,
    MatrixJob,
    check_runner,
    make_runner,
    run_job,
)

CFG = lqlr.QLRConfig(bq=2, rank=4, group_size=32, iters=2, incoherence=True)
SMALL = ["model=stories260k", "data=wikitext2", "data.n_samples=8", "data.seq_len=64", "method=caldera", "method.rank=4",
         "method.iters=2", "method.incoherence=true", "budget=none", "eval.enabled=false", "progress=false"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _compose(overrides, hydra_cfg=False):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=hydra_cfg)
        return cfg if hydra_cfg else OmegaConf.to_object(cfg)


# ----- without Ray ----------------------------------------------------------------------------

def test_runner_names_and_missing_ray(monkeypatch):
    with pytest.raises(ValueError, match="runner='cluster': choose one of"):
        check_runner("cluster")
    with pytest.raises(ValueError, match="threads=0"):
        make_runner("local", threads=0)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ImportError, match=r'pip install "lqlr\[ray\]"'):
        make_runner("ray")


def test_cli_without_ray_fails_before_loading(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    cfg = _compose(SMALL + ["runner=ray", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ImportError, match=r'lqlr\[ray\]'):
        run(cfg, tmp_path)
    assert not (tmp_path / "out").exists()


def test_local_runner_thread_count_is_restored():
    gen = torch.Generator().manual_seed(0)
    W, X = torch.randn(48, 64, generator=gen), torch.randn(64, 256, generator=gen)
    job = MatrixJob("m", W, X @ X.T / 256, CFG, True, None, "linear", 256)
    before = torch.get_num_threads()
    res = LocalRunner(threads=1).gather([job])[0]
    assert torch.get_num_threads() == before
    d = lqlr.decompose(W, X @ X.T / 256, CFG)  # the same decomposition called directly
    assert res.report.error == pytest.approx(d.error, rel=0, abs=0)
    assert torch.equal(res.module.q_codes, run_job(job).module.q_codes)


def test_launcher_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    slurm = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra_cfg=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.partition == "gpu" and slurm.max_num_timeout == 3
    ray_l = _compose(["hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=auto"], hydra_cfg=True).hydra.launcher
    assert ray_l._target_.endswith("RayLauncher") and ray_l.ray.init.address == "auto" and ray_l.ray.remote.num_cpus == 1
    cfg = _compose(["runner=ray", "ray.address=auto", "ray.num_gpus_per_task=0.5", "threads=2"])
    assert isinstance(cfg, MainConf) and (cfg.runner, cfg.ray.address, cfg.ray.num_gpus_per_task, cfg.threads) == ("ray", "auto", 0.5, 2)


# ----- with a local Ray instance (2 CPUs) ------------------------------------------------------

@pytest.fixture(scope="module")
def ray_2cpu():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_runner_same_bytes_as_local(ray_2cpu, tmp_path):
    """The CLI with runner=ray writes the same export as runner=local (sequential Hessians), and
    lqlr.compress with a Ray runner the same as the local one in independent mode, 3 blocks in flight."""
    outs = {}
    for kind in ("local", "ray"):
        run(_compose(SMALL + [f"runner={kind}", "threads=1", f"output_dir={tmp_path / kind}"]), tmp_path)
        outs[kind] = _files(tmp_path / kind)
    assert outs["ray"].keys() == outs["local"].keys() and "model.safetensors" in outs["ray"]
    assert [k for k in outs["ray"] if outs["ray"][k] != outs["local"][k]] == []
    ccfg = CompressConfig(qlr=CFG, hessian_mode="independent", calibration=lqlr.CalibrationConfig(source="wikitext2", n_samples=8, seq_len=64))
    runners = {"local": LocalRunner(threads=1), "ray": make_runner("ray", threads=1, pipeline_blocks=3)}
    assert runners["ray"].threads == 1 and runners["ray"].depth(7) == 3
    for kind, runner in runners.items():
        lqlr.compress("stories260k", ccfg, output_dir=tmp_path / f"ind-{kind}", progress=False, runner=runner)
    a, b = _files(tmp_path / "ind-local"), _files(tmp_path / "ind-ray")
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


@pytest.mark.slow
def test_ray_task_uses_the_local_thread_count(ray_2cpu):
    """CPU results depend on the intra-op thread count (Ray workers start with 1): a 2-thread Ray task
    must match a 2-thread local decomposition, not a 1-thread one."""
    gen = torch.Generator().manual_seed(0)
    W, X = torch.randn(256, 384, generator=gen), torch.randn(384, 1024, generator=gen) * torch.logspace(-1, 1, 384)[:, None]
    job = MatrixJob("m", W, X @ X.T / 1024, lqlr.QLRConfig(bq=2, rank=8, iters=2, incoherence=True), True, None, "linear", 1024)
    local = {t: LocalRunner(threads=t).gather([job])[0].module.packed_tensors() for t in (1, 2)}
    ray_runner = make_runner("ray", threads=2, num_cpus_per_task=1)  # the worker starts with OMP_NUM_THREADS=1
    with pytest.raises(ValueError, match="needs 4 CPUs and 0 GPUs but the Ray cluster has 2 CPUs"):
        make_runner("ray", threads=4)
    remote = ray_runner.gather(ray_runner.submit([job]))[0].module.packed_tensors()
    assert all(torch.equal(remote[k], local[2][k]) for k in local[2])
    if any(not torch.equal(local[1][k], local[2][k]) for k in local[1]):  # this BLAS is thread-count sensitive
        assert any(not torch.equal(remote[k], local[1][k]) for k in local[1])


def _dying(marker_dir: Path, victim: str, times: int):
    """A task body that kills its worker process the first ``times`` times it gets ``victim``."""
    from lqlr.engine.runners import run_job as body

    def task(job, threads, device):
        if job.name == victim:
            done = len(list(marker_dir.glob("death-*")))
            if done < times:
                (marker_dir / f"death-{done}").touch()
                os._exit(1)  # the worker dies: no exception, no result
        return body(job, threads, device)

    return task


@pytest.mark.slow
def test_dead_worker_is_retried_and_finished_blocks_are_kept(ray_2cpu, tmp_path):
    calib = torch.randint(3, 512, (6, 48), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(qlr=CFG, hessian_mode="independent")
    ref = load_model("stories260k")[0]
    compress_model(ref, calib, cfg, progress=False, runner=LocalRunner(threads=1))
    victim = "model.layers.2.mlp.down_proj"

    # one death, max_retries=1: Ray reruns the task and the result is unchanged
    runner = make_runner("ray", threads=1, max_retries=1, pipeline_blocks=5)
    runner._task = ray_2cpu.remote(_dying(tmp_path, victim, 1)).options(**runner._options)
    retried = load_model("stories260k")[0]
    compress_model(retried, calib, cfg, progress=False, runner=runner)
    assert len(list(tmp_path.glob("death-*"))) == 1
    packed = lambda m: {k: v for k, v in m.state_dict().items() if "layers" in k}  # noqa: E731
    a, b = packed(ref), packed(retried)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a task that keeps dying: the run fails, every other block is checkpointed, a rerun redoes only block 2
    deaths, ckpt = tmp_path / "deaths", tmp_path / "ckpt"
    deaths.mkdir()
    runner = make_runner("ray", threads=1, max_retries=0, pipeline_blocks=5)
    runner._task = ray_2cpu.remote(_dying(deaths, victim, 99)).options(**runner._options)
    with pytest.raises(Exception, match="(?i)worker|died|crash|exit"):
        compress_model(load_model("stories260k")[0], calib, cfg, progress=False, runner=runner,
                       checkpoints=BlockCheckpoints(ckpt, "run"))
    assert sorted(p.name for p in ckpt.glob("block_*")) == [f"block_{i:05d}.safetensors" for i in (0, 1, 3, 4)]
    seen = []
    resumed = load_model("stories260k")[0]

    class Counting(LocalRunner):
        def gather(self, handle):
            seen.extend(job.name for job in handle)
            return super().gather(handle)

    compress_model(resumed, calib, cfg, progress=False, runner=Counting(threads=1), checkpoints=BlockCheckpoints(ckpt, "run"))
    assert seen and all(n.startswith("model.layers.2.") for n in seen)
    c = packed(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_multirun_sweep_through_ray_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    cmd = [sys.executable, "-m", "lqlr.cli", "-m", "hydra/launcher=ray_cluster", "hydra.launcher.ray.init.num_cpus=2",
           *SMALL, "method=rtn,gptq", "method.bq=3", f"hydra.sweep.dir={tmp_path}"]
    env = dict(os.environ, HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, cwd=tmp_path, env=env, capture_output=True, timeout=900)
    results = sorted(tmp_path.glob("*/result.json"))
    assert {json.loads(p.read_text())["method"] for p in results} == {"rtn", "gptq"}
    assert all((p.parent / "model" / "manifest.json").is_file() for p in results)
