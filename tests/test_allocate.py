"""Per-matrix plans: override rules, the output sensitivities, the cost table and the allocator end to end."""
import itertools
from dataclasses import replace

import pytest
import torch

from lqlr.budget.allocator import auto_plan, weighted_error
from lqlr.budget.plan import make_plan
from lqlr.budget.rules import plan_table, resolve_overrides
from lqlr.calibrate.sensitivity import output_sensitivity
from lqlr.config import BudgetConfig, Menu, QLRConfig
from lqlr.core.arch import target_linears
from lqlr.core.bits import bits_per_param


def _tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)).eval()


NAMES = [f"model.layers.{i}.{m}" for i in range(2) for m in
         ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]


def test_first_matching_rule_wins_glob_and_regex():
    rules = [{"match": "model.layers.0.*", "bq": 4}, {"match": "re:.*down_proj", "rank": 8}, {"match": "*", "bq": 2}]
    got = resolve_overrides(NAMES, rules, QLRConfig(bq=3, rank=0))
    assert got["model.layers.0.mlp.down_proj"][0] == 0 and got["model.layers.0.mlp.down_proj"][1].bq == 4
    assert got["model.layers.1.mlp.down_proj"][0] == 1 and got["model.layers.1.mlp.down_proj"][1].rank == 8
    assert got["model.layers.1.self_attn.q_proj"] == (2, QLRConfig(bq=2, rank=0))


@pytest.mark.parametrize("rules, match", [
    ([{"match": "model.layers.7.*", "bq": 4}], "match no target"),
    ([{"match": "*", "bq": 4}, {"match": "*.q_proj", "rank": 4}], "match no target"),  # shadowed by the first rule
    ([{"match": "*", "bits": 4}], "unknown field"),
    ([{"bq": 4}], "needs a 'match'"),
    ([{"match": "re:([", "bq": 4}], "not a valid regex"),
    ([{"match": "*", "bq": 9}], "bq=9"),
])
def test_bad_rules_are_one_line_errors(rules, match):
    with pytest.raises(ValueError, match=match):
        resolve_overrides(NAMES, rules, QLRConfig())


def test_weighted_error_matches_its_definition():
    torch.manual_seed(0)
    W, W_hat = torch.randn(5, 7), torch.randn(5, 7)
    X = torch.randn(7, 50)
    H = X @ X.T / 50
    s = torch.rand(5)
    E = W - W_hat
    by_tokens = sum(float(s[r]) * float((E[r] @ X[:, t]) ** 2) for r in range(5) for t in range(50)) / 50
    assert weighted_error(W, W_hat, H, s) == pytest.approx(by_tokens, rel=1e-5)


def test_output_sensitivity_equals_autograd_of_the_layer_output():
    model = _tiny()
    ids = torch.randint(0, 97, (3, 16))
    name = "model.layers.1.mlp.down_proj"
    s = output_sensitivity(model, ids, [name], batch_size=2, progress=False)[name]
    # second implementation: keep the layer output, differentiate the summed loss with respect to it
    outs = []
    h = model.get_submodule(name).register_forward_hook(lambda m, a, y: outs.append(y))
    logits = model(ids, use_cache=False).logits[:, :-1]
    h.remove()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1), reduction="sum")
    (g,) = torch.autograd.grad(loss, outs[0])
    ref = g.pow(2).reshape(-1, g.shape[-1]).sum(0) / ids.numel()
    assert torch.allclose(s, ref, rtol=1e-4, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients left behind


def test_allocator_stays_in_budget_and_beats_every_uniform_menu_plan():
    model = _tiny()
    ids = torch.randint(0, 97, (4, 32))
    menu = Menu(bq=[2, 3, 4], rank=[0, 8], group_size=[32])
    budget = 3.0
    plan, table = auto_plan(model, ids, QLRConfig(group_size=32), budget, menu, progress=False)
    n = sum(table.params)
    chosen = [opts.index(next(o for o in opts if (o.bq, o.rank) == (plan[nm].bq, plan[nm].rank)))
              for nm, opts in zip(table.names, table.options)]
    spent = sum(table.bits[i][j] * table.params[i] for i, j in enumerate(chosen)) / n
    cost = sum(table.costs[i][j] for i, j in enumerate(chosen))
    assert spent <= budget + 1e-9
    # every plan giving all matrices the same menu entry and fitting the budget costs at least as much
    for j in range(len(table.options[0])):
        same = [min(j, len(o) - 1) for o in table.options]
        if sum(table.bits[i][k] * table.params[i] for i, k in enumerate(same)) / n <= budget:
            assert cost <= sum(table.costs[i][k] for i, k in enumerate(same)) * (1 + 1e-9)
    assert len({(c.bq, c.rank) for c in plan.values()}) > 1  # a mixed plan: the point of allocating


def test_mixed_plan_bits_are_counted_exactly_in_the_export(tmp_path):
    from lqlr.config import CompressConfig
    from lqlr.engine.blocks import compress_model
    from lqlr.io.export import read_manifest, save_compressed

    model = _tiny()
    rules = [{"match": "*.mlp.down_proj", "bq": 4, "rank": 8, "bl": 3, "br": 3},
             {"match": "re:.*layers\\.0\\..*", "bq": 2, "group_size": 32}]
    base = QLRConfig(bq=3, rank=0, group_size=64, iters=1)
    plan = make_plan(model, base, BudgetConfig(overrides=rules))
    reports = compress_model(model, torch.randint(0, 97, (2, 32)), CompressConfig(qlr=base), plan=plan, progress=False)
    save_compressed(model, tmp_path / "m", source={"model": "tiny"}, reports=reports)
    man = read_manifest(tmp_path / "m")
    shapes = {n: tuple(m["shape"]) for n, m in man["modules"].items()}
    expect = {n: bits_per_param(*shapes[n], plan.configs[n]) for n in shapes}
    for n, m in man["modules"].items():
        assert m["bits_per_param"] == pytest.approx(expect[n])
        assert (m["spec"]["q"]["bits"], m["spec"]["rank"]) == (plan.configs[n].bq, plan.configs[n].rank)
    total = sum(expect[n] * shapes[n][0] * shapes[n][1] for n in shapes) / sum(a * b for a, b in shapes.values())
    assert man["summary"]["bits_per_param"] == pytest.approx(total)
    assert plan.source["model.layers.0.mlp.down_proj"] == "rule 0" and plan.source["model.layers.1.self_attn.q_proj"] == "method"
    assert "total" in plan_table(plan.configs, shapes, plan.source)


def test_uniform_budget_with_overrides_fits_only_the_others():
    model = _tiny()
    plan = make_plan(model, QLRConfig(bq=2, rank=0), BudgetConfig(bits=3.4, overrides=[{"match": "*.k_proj", "bq": 8}]))
    for n in target_linears(model):
        cfg = plan.configs[n]
        if n.endswith("k_proj"):
            assert cfg.bq == 8
        else:
            assert bits_per_param(*model.get_submodule(n).weight.shape, cfg) <= 3.4 and cfg.bq == 3


def test_readme_override_example_composes_and_resolves():
    import re
    import shlex
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lqlr.cli.compress import CONFIG_DIR, qlr_config, register_configs

    line = next(ln for ln in (Path(__file__).parents[1] / "README.md").read_text().splitlines() if "budget.overrides=[" in ln)
    override = shlex.split(line)[0]
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=["budget=auto", "budget.bits=2.5", override]))
    names = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")]
    got = resolve_overrides(names, cfg.budget.overrides, qlr_config(cfg.method, 0))
    assert got["model.layers.0.mlp.down_proj"][0] == 0 and got["model.layers.2.mlp.down_proj"][1].rank == 64
    assert got["model.layers.0.self_attn.q_proj"][1].bq == 4 and "model.layers.1.self_attn.q_proj" not in got
    assert re.fullmatch(cfg.budget.overrides[1]["match"][3:], "model.layers.0.mlp.up_proj")


def test_cost_table_is_cached_and_reused_across_budgets_and_priors(tmp_path, monkeypatch):
    import lqlr.budget.allocator as A

    model = _tiny()
    ids = torch.randint(0, 97, (4, 32))
    menu = Menu(bq=[2, 3], rank=[0, 8], group_size=[32])
    plan1, t1 = auto_plan(model, ids, QLRConfig(group_size=32), 3.0, menu, progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1

    def boom(*a, **k):
        raise AssertionError("the cached costs should have been used")

    monkeypatch.setattr(A, "blockwise_hessians", boom)
    plan2, t2 = auto_plan(model, ids, QLRConfig(group_size=32), 3.0, menu, progress=False, cache_dir=tmp_path)
    assert plan2 == plan1 and t2.costs == t1.costs
    plan3, _ = auto_plan(model, ids, QLRConfig(group_size=32), 2.6, menu, progress=False, cache_dir=tmp_path)
    assert plan3 != plan1  # another budget, same table
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1e-3)  # other weights: new costs are needed
    with pytest.raises(AssertionError, match="cached costs"):
        auto_plan(model, ids, QLRConfig(group_size=32), 3.0, menu, progress=False, cache_dir=tmp_path)


def test_a_wider_menu_computes_only_its_new_options_and_matches_a_fresh_table(tmp_path, monkeypatch):
    import lqlr.budget.allocator as D  # the allocator's own reference to option_costs

    model = _tiny()
    ids = torch.randint(0, 97, (4, 32))
    base = QLRConfig(group_size=32)
    narrow, wide = Menu(bq=[2, 3], rank=[0, 8], group_size=[32]), Menu(bq=[2, 3], rank=[0, 8], group_size=[32, 16])
    auto_plan(model, ids, base, 3.0, narrow, progress=False, cache_dir=tmp_path)
    calls = []
    real = D.option_costs
    monkeypatch.setattr(D, "option_costs", lambda *a, **k: calls.extend(a[2]) or real(*a, **k))
    _, cached = auto_plan(model, ids, base, 3.0, wide, progress=False, cache_dir=tmp_path)
    assert calls and all(c.group_size == 16 for c in calls)  # only the new options were decomposed
    n_new = sum(1 for opts in cached.options for o in opts if o.group_size == 16)
    assert len(calls) == n_new
    _, fresh = auto_plan(model, ids, base, 3.0, wide, progress=False, cache_dir=None)
    assert fresh.options == cached.options and fresh.bits == cached.bits
    for a, b in zip(fresh.costs, cached.costs):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_menu_groups_wider_than_a_row_collapse_to_the_row():
    from lqlr.cli.compress import MainConf

    assert MainConf().budget.menu == Menu()  # the Hydra schema is the library's Menu
    narrow = Menu(bq=[2, 3], rank=[0, 8], group_size=[64]).options(QLRConfig(), 48, 64)
    wide = Menu(bq=[2, 3], rank=[0, 8], group_size=[64, 256]).options(QLRConfig(), 48, 64)
    assert wide == narrow  # on a 64-wide matrix, groups of 256 are groups of 64: no duplicate options
    assert {o.group_size for o in Menu(group_size=[64, 256]).options(QLRConfig(), 48, 512)} == {64, 256}


def test_menu_rotation_choice_is_a_superset_of_both_settings(tmp_path):
    from lqlr.config import CompressConfig
    from lqlr.engine.blocks import compress_model
    from lqlr.io.export import read_manifest, save_compressed

    model = _tiny()
    ids = torch.randint(0, 97, (4, 32))
    base = QLRConfig(group_size=32, incoherence=True)
    both = Menu(bq=[2, 3, 4], rank=[0], group_size=[32], incoherence=[False, True])
    opts = both.options(base, 64, 64)
    assert sorted((o.bq, o.incoherence) for o in opts) == sorted(itertools.product([2, 3, 4], [False, True]))
    assert Menu(bq=[2], rank=[0], group_size=[32]).options(base, 64, 64)[0].incoherence is True  # None: the method's
    costs = {}
    for rot in (False, True):  # each setting alone, from a fresh table
        plan, table = auto_plan(model, ids, replace(base, incoherence=rot), 2.75, Menu(bq=[2, 3, 4], rank=[0], group_size=[32]),
                                progress=False)
        costs[rot] = (table, plan)
    plan, table = auto_plan(model, ids, base, 2.75, both, progress=False)
    for i, n in enumerate(table.names):  # the mixed table holds exactly both single-setting tables' costs
        for o, c in zip(table.options[i], table.costs[i]):
            t = costs[o.incoherence][0]
            assert c == pytest.approx(t.costs[i][t.options[i].index(o)], rel=1e-9)

    def total(p, t):
        return sum(t.costs[i][t.options[i].index(replace(p[n], iters=1))] for i, n in enumerate(t.names))

    mixed = total(plan, table)
    assert len({c.incoherence for c in plan.values()}) == 2  # (on this model the allocator uses both)
    assert mixed <= min(total(p, t) for t, p in costs.values()) * (1 + 1e-9)
    from lqlr.budget.plan import Plan

    chosen = Plan(dict(plan), {n: "auto" for n in plan}, base, BudgetConfig(bits=2.75, mode="auto"), table)
    reports = compress_model(model, ids, CompressConfig(qlr=base), plan=chosen, progress=False)
    save_compressed(model, tmp_path / "m", source={"model": "tiny"}, reports=reports)
    man = read_manifest(tmp_path / "m")
    for n, m in man["modules"].items():  # the rotation each matrix was given is the one stored
        assert (m["spec"]["rotation"] is not None) == plan[n].incoherence
        assert m["bits_per_param"] == pytest.approx(bits_per_param(*m["shape"], plan[n]))



def test_blockwise_cost_table_equals_the_one_from_whole_model_hessians():
    from lqlr.budget.allocator import cost_table
    from lqlr.calibrate.capture import capture_hessians
    from lqlr.calibrate.sensitivity import output_sensitivity

    model = _tiny()
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(5))
    menu = Menu(bq=[2, 3], rank=[0, 8], group_size=[32])
    base = QLRConfig(group_size=32)
    _, table = auto_plan(model, ids, base, 3.0, menu, progress=False)
    names = list(target_linears(model))
    ref = cost_table(model, capture_hessians(model, ids, names, progress=False),
                     output_sensitivity(model, ids, names, progress=False), menu, base, progress=False, names=names)
    assert table.names == ref.names and table.options == ref.options and table.bits == ref.bits
    for a, b in zip(table.costs, ref.costs):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-12)


def test_sensitivity_samples_use_the_first_sequences_and_all_of_them_for_the_hessians(tmp_path):
    from lqlr.budget.allocator import cost_table
    from lqlr.calibrate.capture import capture_hessians

    model = _tiny()
    ids = torch.randint(0, 97, (6, 32), generator=torch.Generator().manual_seed(7))
    base = QLRConfig(group_size=32)
    menu = Menu(bq=[2, 3], rank=[0, 8], group_size=[32], sensitivity_samples=2)
    _, table = auto_plan(model, ids, base, 3.0, menu, progress=False, cache_dir=tmp_path)
    names = list(target_linears(model))
    ref = cost_table(model, capture_hessians(model, ids, names, progress=False),
                     output_sensitivity(model, ids[:2], names, progress=False), menu, base, progress=False, names=names)
    for a, b in zip(table.costs, ref.costs):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-12)
    _, every = auto_plan(model, ids, base, 3.0, replace(menu, sensitivity_samples=None), progress=False,
                         cache_dir=tmp_path)
    assert every.costs != table.costs  # a cache entry of its own: the sensitivities differ
    assert len(list(tmp_path.glob("*.json"))) == 2
    with pytest.raises(ValueError, match="sensitivity_samples=0"):
        Menu(sensitivity_samples=0)


def test_output_sensitivity_is_the_same_with_a_chunked_head_and_any_batch_size():
    model = _tiny()
    ids = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(6))
    names = list(target_linears(model))[:3]
    ref = output_sensitivity(model, ids, names, batch_size=4, progress=False, loss_chunk=0)  # full logits at once
    for batch, chunk in ((1, 7), (2, 256), (4, 5)):
        got = output_sensitivity(model, ids, names, batch_size=batch, progress=False, loss_chunk=chunk)
        for n in names:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-10)
