"""The Hydra app: config composition, validation, a real run, and a multirun sweep."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import lqlr
from lqlr.cli.compress import CONFIG_DIR, MainConf, qlr_config, register_configs, run

SMALL = ["model=stories260k", "data=wikitext2", "data.n_samples=8", "data.seq_len=64", "method.iters=2",
         "eval.seq_len=128", "eval.max_windows=2"]


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


def test_default_config_is_the_embedded_default():
    cfg = _compose([])
    assert isinstance(cfg, MainConf)
    assert (cfg.model.name, cfg.data.source, cfg.method.name) == ("smollm2-135m", "self", "lqlr")
    assert cfg.budget == _compose(["budget=auto_fast"]).budget  # method=lqlr: the allocator's light preset
    for method in ("gptq", "caldera", "rtn", "lqlr_q", "lqlr_trellis", "hqq"):  # peers, baselines: the uniform plan
        assert _compose([f"method={method}"]).budget.mode == "uniform"
        assert _compose([f"method={method}", "budget=auto_fast"]).budget.mode == "auto"  # unless asked
    assert _compose(["budget=bits"]).budget.mode == _compose(["experiment=quick"]).budget.mode == "uniform"
    q = qlr_config(cfg.method, cfg.seed)
    assert (q.bq, q.bl, q.br, q.iters, q.incoherence) == (3, 4, 4, 5, True)
    caldera = qlr_config(_compose(["method=caldera"]).method, 0)
    assert (caldera.bq, caldera.rank, caldera.iters, caldera.incoherence) == (2, 32, 20, False)


@pytest.mark.parametrize("method, rank, use_h", [("gptq", 0, True), ("rtn", 0, False), ("loftq", 16, False), ("lqlr", 32, True)])
def test_method_presets(method, rank, use_h):
    cfg = _compose([f"method={method}"])
    assert cfg.method.rank == rank and cfg.method.use_hessian is use_h


def test_auto_fast_budget_is_the_allocator_with_the_light_cost_table():
    cfg = _compose(["budget=auto_fast"])
    assert (cfg.budget.mode, cfg.budget.bits) == ("auto", 3.5)
    m = cfg.budget.menu
    assert isinstance(m, lqlr.Menu) and (m.group_size, m.cost_rows, m.sensitivity_samples) == ([64], 128, 8)
    assert _compose(["budget=auto"]).budget.menu.sensitivity_samples is None  # the full allocator keeps every sequence


@pytest.mark.parametrize("override", ["method.bq=abc", "method.nonsense=1", "budget.bits=lots"])
def test_bad_values_are_rejected(override):
    with pytest.raises(ConfigCompositionException):
        _compose([override])


def test_bad_enum_value_is_a_clear_error():
    with pytest.raises(Exception, match="order='sideways': choose one of"):
        _compose(SMALL + ["method.order=sideways"])


@pytest.mark.parametrize("method, budget", [("gptq", 3.0), ("caldera", 3.0)])
def test_run_writes_export_and_result(tmp_path, method, budget):
    cfg = _compose(SMALL + [f"method={method}", f"budget.bits={budget}", f"output_dir={tmp_path / 'out'}"])
    result = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["bits_per_param"] == pytest.approx(result["bits_per_param"])
    assert result["bits_per_param"] <= budget
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert (tmp_path / "out" / "adapter").is_dir() == (method == "caldera")  # a Q-only export has no L, R to write
    if method == "caldera":  # the adapter names the model as the user did, never a resolved local path
        adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == "stories260k"
    assert result["ppl"] > result["ppl_reference"] * 0.98 and result["kl"] > 0


def test_a_finished_run_is_skipped_when_rerun_with_the_same_config(tmp_path, monkeypatch):
    import dataclasses

    import lqlr.cli.compress

    cfg = _compose(SMALL + ["method=rtn", "budget.bits=3", f"output_dir={tmp_path / 'out'}"])
    first = run(cfg, tmp_path)

    def no_compress(*a, **k):
        raise AssertionError("compressed again")

    monkeypatch.setattr(lqlr.cli.compress, "compress", no_compress)
    again = run(cfg, tmp_path)  # an interrupted multirun, rerun: the finished point is not recomputed
    assert again == json.loads(json.dumps(first))
    for changed in (dataclasses.replace(cfg, resume=False), dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_windows=1))):
        with pytest.raises(AssertionError, match="compressed again"):  # another config, or resume=false: run it
            run(changed, tmp_path)
    (tmp_path / "result.json").write_text('{"model": "stories')  # a torn file is not a result
    with pytest.raises(AssertionError, match="compressed again"):
        run(cfg, tmp_path)


def test_the_default_budget_is_the_allocator_and_beats_the_uniform_plan(tmp_path):
    """lqlr-compress's default method and budget run the allocator (budget=auto_fast): one menu option per
    matrix, all of them together within 3.5 all-in bits, and a lower perplexity than the uniform 3.5-bit plan."""
    base = SMALL + ["method.iters=1", "budget.cache=false", "progress=false"]
    auto = run(_compose(base + [f"output_dir={tmp_path / 'a'}"]), tmp_path)
    uniform = run(_compose(base + ["budget=bits", f"output_dir={tmp_path / 'u'}"]), tmp_path)
    assert (auto["budget_mode"], uniform["budget_mode"]) == ("auto", "uniform")
    modules = json.loads((tmp_path / "a" / "manifest.json").read_text())["modules"].values()
    numel = [m["shape"][0] * m["shape"][1] for m in modules]
    all_in = sum(m["bits_per_param"] * n for m, n in zip(modules, numel)) / sum(numel)  # from the export itself
    assert auto["bits_per_param"] == pytest.approx(all_in) and 3.45 < all_in <= 3.5
    menu = _compose([]).budget.menu
    for m in modules:
        c = m["spec"]["config"]
        assert c["bq"] in menu.bq and m["rank"] in menu.rank and c["group_size"] in menu.group_size
    assert len({(m["spec"]["config"]["bq"], m["rank"]) for m in modules}) > 1  # the plan is not uniform
    assert auto["ppl"] < uniform["ppl"]


@pytest.mark.slow
def test_multirun_sweep_writes_one_result_per_run(tmp_path):
    cmd = [sys.executable, "-m", "lqlr.cli", "-m", *SMALL, "method=rtn,gptq", "method.bq=3",
           f"hydra.sweep.dir={tmp_path}", "progress=false"]
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    subprocess.run(cmd, check=True, cwd=tmp_path, env=env, capture_output=True, timeout=600)
    results = sorted(Path(tmp_path).glob("*/result.json"))
    assert len(results) == 2
    methods = {json.loads(p.read_text())["method"] for p in results}
    assert methods == {"rtn", "gptq"}


def test_experiment_bundle():
    cfg = _compose(["experiment=quick"])
    assert cfg.model.name == "stories260k" and cfg.data.source == "wikitext2" and cfg.method.iters == 5


def test_method_seed_reaches_the_decomposition():
    """method.seed used to be accepted and dropped: now it wins over the run's seed, and null means the run's."""
    assert qlr_config(_compose(["seed=5"]).method, 5).seed == 5
    cfg = _compose(["seed=5", "method.seed=11"])
    assert qlr_config(cfg.method, cfg.seed).seed == 11
    from lqlr.cli.compress import compress_config

    assert compress_config(cfg).qlr.seed == 11 and compress_config(_compose(["seed=3"])).qlr.seed == 3


def test_the_schema_is_the_library_config():
    import lqlr

    cfg = _compose(["budget=auto", "budget.menu.rank=[0,8]", "data=wikitext2", "export.untouched_dtype=float32"])
    assert isinstance(cfg.budget, lqlr.BudgetConfig) and isinstance(cfg.budget.menu, lqlr.Menu)
    assert isinstance(cfg.data, lqlr.CalibrationConfig) and isinstance(cfg.export, lqlr.ExportConfig)
    assert cfg.budget.menu.rank == [0, 8]
    with pytest.raises(Exception, match="budget.mode='sideways': choose one of"):  # the library's own message
        _compose(["budget.mode=sideways"])
    with pytest.raises(Exception, match="budget=auto needs budget.bits"):
        _compose(["budget=auto", "budget.bits=null"])
