"""lqlr-bench quality: the verdict logic, the table/plot from JSON, the sweep configs, a real quick sweep."""
import json
from pathlib import Path

import pytest

from lqlr.bench import main as bench_main
from lqlr.bench.quality import collect, losses, sweep_command, sweeps


def _rec(method, bits, ppl, kl, model="m", budget=None):
    return dict(model=model, method=method, label=method, bits_per_param=bits, ppl=ppl, kl=kl, budget_bits=budget)


def test_losses_lists_exactly_the_same_budget_baselines_that_beat_lqlr():
    recs = [_rec("lqlr", 2.95, 30.0, 0.30, budget=3.0), _rec("lqlr", 2.4, 40.0, 0.5, budget=2.5),
            _rec("gptq", 3.07, 29.0, 0.35, budget=3.0),   # same budget, more bits, lower ppl: a loss
            _rec("hqq", 3.0, 31.0, 0.25, budget=3.0),     # same budget, more bits, lower KL: a loss
            _rec("rtn", 3.3, 35.0, 0.40, budget=3.0),     # same budget, more bits but worse: compared, fine
            _rec("nf", 2.9, 20.0, 0.10, budget=3.0),      # fewer bits than lqlr's point: not compared
            _rec("gptq", 4.3, 10.0, 0.01, budget=4.0),    # another budget: not compared at 3
            _rec("rtn", 2.45, 45.0, 0.6, budget=2.25)]    # bits between 2.4 and 2.5: compared at 2.5
    v = {x["budget"]: x for x in losses(recs)}
    assert v[3.0]["best"]["bits_per_param"] == 2.95 and v[3.0]["compared"] == 3
    assert sorted(r["method"] for r in v[3.0]["beaten_by"]) == ["gptq", "hqq"]
    assert v[2.5]["best"]["ppl"] == 40.0 and v[2.5]["compared"] == 1 and v[2.5]["beaten_by"] == []
    assert 2.25 not in v  # no lqlr point at or below 2.25 bits


def test_table_and_plot_are_rebuilt_from_the_json(tmp_path):
    recs = [_rec("lqlr", 2.95, 30.0, 0.30, budget=3.0), _rec("gptq", 3.07, 29.0, 0.35, budget=3.0),
            dict(model="m", method="reference", label="fp32", bits_per_param=32.0, ppl=20.0, kl=0.0)]
    src = tmp_path / "in" / "quality.json"
    src.parent.mkdir()
    src.write_text(json.dumps({"benchmark": "quality", "meta": {"command": "x"}, "records": recs}))
    bench_main(["quality", "--from-json", str(src), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "| lqlr | 3 | 2.950 | 30.00 | 0.300 |" in md and "gptq 3.07 b: ppl 29.00" in md
    assert (tmp_path / "out" / "quality.png").stat().st_size > 10_000


@pytest.mark.parametrize("i", range(len(sweeps())))
def test_every_sweep_composes(i):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lqlr.cli.compress import CONFIG_DIR, MainConf, register_configs

    methods, budgets, *extra = sweeps()[i]
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for m in methods:
            cfg = OmegaConf.to_object(compose(config_name="config", overrides=[
                "experiment=quality", "model=smollm2-135m", f"method={m}", f"budget.bits={budgets[0]}",
                *(extra[0] if extra else [])]))
            assert isinstance(cfg, MainConf) and cfg.budget.fit == "nearest" and cfg.data.source == "wikitext2"
            assert cfg.budget.mode == ("auto" if extra else "uniform") and cfg.budget.bits == budgets[0]
    cmd = sweep_command("smollm2-135m", methods, budgets, Path("d"))
    assert "-m" in cmd and "method=" + ",".join(methods) in cmd


@pytest.mark.slow
def test_quick_sweep_on_stories260k_end_to_end(tmp_path):
    bench_main(["quality", "--quick", "--models", "stories260k", "--work-dir", str(tmp_path / "w"),
                "--out", str(tmp_path / "r"), "--override", "eval.max_windows=2", "data.n_samples=8"])
    data = json.loads((tmp_path / "r" / "quality_quick.json").read_text())
    recs = data["records"]
    assert {r["method"] for r in recs} == {"rtn", "gptq", "hqq", "lqlr", "reference"}
    runs = [r for r in recs if r["method"] != "reference"]
    assert len(runs) == 8 and all(r["ppl"] > 0 and r["kl"] >= 0 and r["peak_rss_mb"] > 0 for r in runs)
    for r in runs:  # Q-only methods and peers land near the budget; lqlr stays at or below it
        assert abs(r["bits_per_param"] - r["budget_bits"]) < 0.35
        if r["method"] == "lqlr":
            assert r["bits_per_param"] <= r["budget_bits"]
    by = {(r["method"], r["budget_bits"]): r for r in runs}
    assert by[("gptq", 4.0)]["kl"] < by[("gptq", 2.5)]["kl"]  # more bits, closer to the reference
    assert (tmp_path / "r" / "quality_quick.png").is_file()
    assert collect(tmp_path / "w") == recs
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "w").rglob("result.json")}
    bench_main(["quality", "--quick", "--models", "stories260k", "--work-dir", str(tmp_path / "w"),
                "--out", str(tmp_path / "r"), "--override", "eval.max_windows=2", "data.n_samples=8"])
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "w").rglob("result.json")} == stamps  # rerun: nothing redone
    assert json.loads((tmp_path / "r" / "quality_quick.json").read_text())["records"] == recs


def test_an_allocator_menu_other_than_the_default_is_its_own_line_and_counts_as_lqlr():
    from lqlr.bench.quality import is_ours, record_of, summary

    def result(groups):
        return dict(model="m", method="lqlr", budget_bits=3.0, bits_per_param=3.0, ppl=30.0, kl=0.3, budget_mode="auto",
                    config={"budget": {"menu": {"group_size": groups}}, "method": {}})

    default, narrow = record_of(result([64, 256])), record_of(result([64]))
    assert default["method"] == "lqlr-auto" and narrow["method"] == "lqlr-auto-g64"
    rot = result([64, 256])
    rot["config"]["budget"]["menu"]["incoherence"] = [False, True]
    assert record_of(rot)["method"] == "lqlr-auto-rot" and is_ours("lqlr-auto-rot")
    assert record_of(rot)["label"] == "lqlr, allocator (budget=auto), rotation chosen per matrix"
    rot["config"]["budget"]["menu"]["incoherence"] = [True]  # one setting is not a choice
    assert record_of(rot)["method"] == "lqlr-auto"
    assert narrow["label"] == "lqlr, allocator (budget=auto), menu groups 64" and is_ours(narrow["method"])
    wide = default
    gptq = _rec("gptq", 3.09, 29.0, 0.35, budget=3.0)
    v = losses([wide, gptq])[0]
    assert v["best"] is wide and v["beaten_by"] == [gptq]
    table = summary([narrow, gptq], "m")
    assert "| lqlr, allocator (budget=auto), menu groups 64 | – | – | 3.00 · 30.00 · 0.300 | – |" in table


def test_seeds_are_averaged_with_their_spread_and_kept_apart_from_the_single_seed_sweep(tmp_path):
    import math

    from lqlr.bench.quality import markdown, seed_means

    def result(method, seed, ppl, kl, bits=3.0):
        return {"model": "m", "method": method, "budget_bits": 3.0, "bits_per_param": bits, "ppl": ppl, "kl": kl,
                "ppl_reference": 20.0, "config": {"seed": seed, "method": {}}}

    runs = {"sweep0/0": result("gptq", 0, 50.0, 0.5, 3.1),
            "seeds/sweep0/0": result("gptq", 1, 40.0, 0.4, 3.1), "seeds/sweep0/1": result("gptq", 2, 90.0, 0.6, 3.1),
            "seeds/sweep1/0": result("lqlr", 1, 30.0, 0.3), "seeds/sweep1/1": result("lqlr", 2, 120.0, 0.5)}
    for d, r in runs.items():
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "result.json").write_text(json.dumps(r))
    single, seeded = collect(tmp_path), collect(tmp_path, seeded=True)
    assert [(r["method"], r["seed"]) for r in single if r["method"] != "reference"] == [("gptq", 0)]
    assert sorted((r["method"], r["seed"]) for r in seeded if r["method"] != "reference") == [
        ("gptq", 1), ("gptq", 2), ("lqlr", 1), ("lqlr", 2)]
    means = {r["method"]: r for r in seed_means(seeded)}
    assert means["gptq"]["ppl"] == pytest.approx(60.0) and means["lqlr"]["ppl"] == pytest.approx(60.0)  # √(40·90), √(30·120)
    assert means["gptq"]["kl"] == pytest.approx(0.5) and means["lqlr"]["kl_range"] == [0.3, 0.5]
    assert means["lqlr"]["seeds"] == [1, 2] and "seed" not in means["lqlr"]
    assert math.isclose(means["reference"]["ppl"], 20.0)
    md = markdown(seeded)
    assert "| m | lqlr (Q + L·R, incoherence) | 3 | 1, 2 | 3.000 | 60.00 | 30.00–120.00 (150 %) | 0.400 | 0.300–0.500 |" in md
    # the verdict uses the means: equal perplexity at more bits counts as a loss for lqlr
    v = losses(seed_means(seeded))[0]
    assert v["best"]["method"] == "lqlr" and [r["method"] for r in v["beaten_by"]] == ["gptq"]


def test_seeded_sweeps_go_to_their_own_folder_with_the_seed_overrides(tmp_path, monkeypatch):
    import subprocess

    from lqlr.bench.quality import run_sweeps

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    run_sweeps("stories260k", tmp_path, only=[0], seeds=[0, 3])
    (cmd,) = calls
    assert f"hydra.sweep.dir={tmp_path / 'seeds' / 'sweep0'}" in cmd
    assert "seed=0,3" in cmd and "data.seed=${seed}" in cmd
    run_sweeps("stories260k", tmp_path, only=[0])
    assert f"hydra.sweep.dir={tmp_path / 'sweep0'}" in calls[1] and not any(a.startswith("seed=") for a in calls[1])


def test_add_runs_puts_finished_runs_into_a_results_file(tmp_path):
    import json

    from lqlr.bench.quality import add_runs

    old = [dict(model="m", method="lqlr_e8p", label="x", budget_bits=2.5, bits_per_param=2.49, ppl=99.0, kl=1.0),
           dict(model="m", method="gptq", label="g", budget_bits=2.5, bits_per_param=2.56, ppl=170.0, kl=1.9)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps(dict(model="m", method="lqlr_e8p", budget_bits=2.5, bits_per_param=2.493,
                                                     ppl=50.0, kl=0.7, config={"method": {"grid": "e8p"}})))
    records, added = add_runs(old, [run])
    assert added == ["m lqlr_e8p 2.5"] and len(records) == 2
    new = next(r for r in records if r["method"] == "lqlr_e8p")
    assert new["ppl"] == 50.0 and new["label"].startswith("lqlr E8P") and new["method_config"]["grid"] == "e8p"
    with pytest.raises(ValueError, match="no result.json"):
        add_runs(old, [tmp_path / "nothing"])
