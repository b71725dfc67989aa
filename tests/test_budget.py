import pytest

from lqlr.bits import bits_per_param
from lqlr.budget import InfeasibleBudgetError, fit_to_budget
from lqlr.config import QLRConfig


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
        fit_to_budget(QLRConfig(bq=3, rank=16), 576, 576, 2.5)


def test_group_grows_before_giving_up():
    cfg = fit_to_budget(QLRConfig(bq=2, rank=16, group_size=64), 576, 576, 2.2)  # Q at g64 is 2.28 bits
    assert cfg.group_size > 64 and bits_per_param(576, 576, cfg) <= 2.2
