import pytest

from lqlr.budget.fit import InfeasibleBudgetError, fit_to_budget
from lqlr.config import QLRConfig
from lqlr.core.bits import bits_per_param


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (192, 576), (64, 172)])
@pytest.mark.parametrize("bits", [2.5, 3.0, 4.0])
def test_rank_is_the_largest_that_fits(shape, bits):
    cfg = fit_to_budget(QLRConfig(bq=2, rank=32), *shape, bits)
    assert bits_per_param(*shape, cfg) <= bits
    bigger = QLRConfig(**{**cfg.to_dict(), "rank": cfg.rank + 1})
    assert cfg.rank == min(shape) or bits_per_param(*shape, bigger) > bits  # brute-force check of maximality


@pytest.mark.parametrize("bits, bq", [(2.3, 2), (3.0, 2), (3.3, 3), (4.4, 4), (9.0, 8)])
def test_q_only_takes_the_largest_bq_that_fits(bits, bq):
    cfg = fit_to_budget(QLRConfig(bq=2, rank=0, group_size=64), 576, 576, bits)
    assert cfg.bq == bq


def test_infeasible_budgets_say_so():
    with pytest.raises(InfeasibleBudgetError, match="below"):
        fit_to_budget(QLRConfig(rank=0), 576, 576, 2.0)
    with pytest.raises(InfeasibleBudgetError, match="cannot hold even Q"):
        fit_to_budget(QLRConfig(bq=3, rank=16), 576, 576, 2.05)  # even 2-bit Q at group 256 is 2.07 bits


def test_q_plus_lr_lowers_bq_only_when_q_alone_cannot_fit():
    assert fit_to_budget(QLRConfig(bq=3, rank=16), 576, 576, 3.5).bq == 3
    cfg = fit_to_budget(QLRConfig(bq=3, rank=16), 576, 576, 2.5)  # 3-bit Q needs ≥ 3.07 bits
    assert cfg.bq == 2 and cfg.rank > 0 and bits_per_param(576, 576, cfg) <= 2.5


@pytest.mark.parametrize("grid", ["uniform", "nf"])
@pytest.mark.parametrize("bits", [2.25, 2.5, 3.0, 3.2, 4.0, 4.5])
def test_nearest_mode_matches_brute_force(grid, bits):
    from lqlr.budget.fit import Q_ONLY_GROUPS

    cfg = fit_to_budget(QLRConfig(bq=3, rank=0, grid=grid), 576, 1536, bits, mode="nearest")
    got = bits_per_param(576, 1536, cfg)
    every = [bits_per_param(576, 1536, QLRConfig(bq=b, rank=0, grid=grid, group_size=g))
             for b in range(2, (4 if grid == "nf" else 8) + 1) for g in Q_ONLY_GROUPS]
    assert abs(got - bits) == pytest.approx(min(abs(x - bits) for x in every))


def test_unknown_fit_mode_is_an_error():
    with pytest.raises(ValueError, match="fit mode"):
        fit_to_budget(QLRConfig(rank=0), 576, 576, 3.0, mode="closest")


def test_group_grows_before_giving_up():
    cfg = fit_to_budget(QLRConfig(bq=2, rank=16, group_size=64), 576, 576, 2.2)  # Q at g64 is 2.28 bits
    assert cfg.group_size > 64 and bits_per_param(576, 576, cfg) <= 2.2


def _brute_force(errors, bits, params, budget):
    import itertools

    best, best_choice = float("inf"), None
    for choice in itertools.product(*[range(len(e)) for e in errors]):
        spent = sum(bits[i][j] * params[i] for i, j in enumerate(choice))
        if spent <= budget * sum(params) + 1e-9:
            err = sum(errors[i][j] for i, j in enumerate(choice))
            if err < best:
                best, best_choice = err, choice
    return best, best_choice


@pytest.mark.parametrize("seed", range(8))
def test_milp_allocation_equals_brute_force(seed):
    import random

    from lqlr.budget.milp import choose_options

    rng = random.Random(seed)
    n_mat, n_opt = rng.randint(2, 5), rng.randint(2, 4)
    params = [rng.choice([4096, 16384, 65536]) for _ in range(n_mat)]
    bits = [sorted(rng.uniform(2, 5) for _ in range(n_opt)) for _ in range(n_mat)]
    errors = [sorted((rng.uniform(0.001, 0.2) for _ in range(n_opt)), reverse=True) for _ in range(n_mat)]
    budget = rng.uniform(min(map(min, bits)) + 0.2, 4.5)
    try:
        choice = choose_options(errors, bits, params, budget)
    except InfeasibleBudgetError:
        assert _brute_force(errors, bits, params, budget)[1] is None
        return
    best, _ = _brute_force(errors, bits, params, budget)
    got = sum(errors[i][j] for i, j in enumerate(choice))
    assert got == pytest.approx(best, rel=1e-9)
    assert sum(bits[i][j] * params[i] for i, j in enumerate(choice)) <= budget * sum(params) + 1e-6


def test_allocation_errors():
    from lqlr.budget.milp import choose_options

    with pytest.raises(InfeasibleBudgetError, match="cheapest option"):
        choose_options([[0.1, 0.01]], [[3.0, 4.0]], [100], 2.5)
    with pytest.raises(ValueError, match="same matrices"):
        choose_options([[0.1]], [[3.0], [4.0]], [100], 5.0)
