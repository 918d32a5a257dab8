"""Ranks: the owner assignment every rank computes alike, and the single-process defaults."""

from __future__ import annotations

import pytest

from scoutq.errors import ScoutqError
from scoutq.stream.processes import Ranks, join, launched_ranks


def test_owners_balance_the_cost_the_same_way_on_every_rank() -> None:
    costs = [1.0, 1.5, 1.0, 3.0, 1.2, 1.0, 1.1, 1.0]
    owners = [Ranks(rank, 3).owners(costs) for rank in range(3)]
    assert owners[0] == owners[1] == owners[2]  # a pure function of the costs
    load = [sum(c for c, o in zip(costs, owners[0], strict=True) if o == rank) for rank in range(3)]
    assert set(owners[0]) == {0, 1, 2}
    # Largest first to the least loaded: no rank carries more than the best split plus one item.
    assert max(load) - min(load) <= max(costs)
    assert owners[0][3] == 0  # the largest item goes first, to rank 0
    assert Ranks(0, 1).owners(costs) == [0] * len(costs)
    assert Ranks(1, 2).owners([]) == []


def test_equal_costs_go_round_robin_in_item_order() -> None:
    assert Ranks(0, 3).owners([1.0] * 7) == [0, 1, 2, 0, 1, 2, 0]


def test_a_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_ranks() == 1
    ranks = join()
    assert ranks == Ranks(0, 1) and ranks.writer
    assert ranks.broadcast({"a": 1}, owner=0) == {"a": 1}
    ranks.barrier()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ScoutqError, match="WORLD_SIZE='two'"):
        launched_ranks()
