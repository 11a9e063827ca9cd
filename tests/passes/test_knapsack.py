"""The shared greedy nested-rung knapsack (passes/common/knapsack.py): gains made
non-increasing along a unit's rungs, nested selections, the prefix that fits the budget (and
its slack), the tie order, zero gains with and without spend_all, and agreement with a plain
one-candidate-at-a-time reference on random tables."""

from __future__ import annotations

import numpy as np
import pytest
from onnxopt.passes.common.knapsack import (
    gains_per_cost,
    greedy_nested_rungs,
    greedy_prefix,
)


def test_gains_are_per_cost_and_non_increasing_along_the_rungs():
    reductions = np.array([[1.0, 4.0], [5.0, 2.0], [3.0, 1.0]])
    gains = gains_per_cost(reductions, [1.0, 1.0, 2.0])
    np.testing.assert_array_equal(gains, [[1.0, 4.0], [1.0, 2.0], [1.0, 0.5]])  # rung 2 of unit 0 (5) capped at rung 1's 1
    np.testing.assert_array_equal(gains_per_cost(reductions, 2.0), [[0.5, 2.0], [0.5, 1.0], [0.5, 0.5]])  # one cost for all rungs


def test_a_units_rungs_are_taken_in_order_within_the_budget():
    reductions = [np.array([[3.0, 2.0, 1.0], [4.0, 0.0, 0.0]])]  # unit 0's second rung removes more, but comes after its first
    assert greedy_nested_rungs(reductions, [[1.0, 1.0]], 1.0)[0].tolist() == [1, 0, 0]
    assert greedy_nested_rungs(reductions, [[1.0, 1.0]], 2.0)[0].tolist() == [2, 0, 0]  # gain 3 = 3: the lower rung went first
    assert greedy_nested_rungs(reductions, [[1.0, 1.0]], 3.5)[0].tolist() == [2, 1, 0]
    assert greedy_nested_rungs(reductions, [[1.0, 1.0]], 100.0)[0].tolist() == [2, 1, 1]  # the zero-gain rungs stay out
    assert greedy_nested_rungs(reductions, [[1.0, 1.0]], 0.0)[0].tolist() == [0, 0, 0]


def test_the_selection_is_a_prefix_of_the_ranking():
    # the best candidate costs 10: with 5 to spend the greedy stops there, it does not skip to the cheaper one
    reductions, costs = [np.array([[100.0]]), np.array([[1.0]])], [10.0, 1.0]
    assert [r.tolist() for r in greedy_nested_rungs(reductions, costs, 5.0)] == [[0], [0]]
    assert [r.tolist() for r in greedy_nested_rungs(reductions, costs, 10.0)] == [[1], [0]]
    assert [r.tolist() for r in greedy_nested_rungs(reductions, costs, 11.0)] == [[1], [1]]


def test_ties_go_to_the_lower_rung_then_the_earlier_table_then_the_lower_unit():
    table = np.array([[2.0, 2.0], [2.0, 2.0]])  # every candidate gains 2 per unit of cost
    taken = [greedy_nested_rungs([table, table], [1.0, 1.0], budget)
             for budget in (1.0, 2.0, 3.0, 4.0, 5.0)]
    assert [[r.tolist() for r in t] for t in taken] == [
        [[1, 0], [0, 0]],
        [[1, 1], [0, 0]],
        [[1, 1], [1, 0]],
        [[1, 1], [1, 1]],  # every first rung before any second one
        [[2, 1], [1, 1]],
    ]
    gain, cost = np.array([1.0, 1.0, 1.0, 2.0]), np.ones(4)
    assert greedy_prefix(gain, cost, 4.0, (np.array([1, 0, 0, 5]), np.array([0, 2, 1, 0]))).tolist() == [3, 2, 1, 0]
    assert greedy_prefix(gain, cost, 4.0).tolist() == [3, 0, 1, 2]  # no keys: the index breaks ties


def test_zero_gains_only_with_spend_all_and_after_every_gain():
    reductions = [np.array([[0.0, 1.0], [0.0, 0.0]])]
    assert greedy_nested_rungs(reductions, [1.0], 10.0)[0].tolist() == [0, 1]
    assert greedy_nested_rungs(reductions, [1.0], 10.0, spend_all=True)[0].tolist() == [2, 2]
    assert greedy_nested_rungs(reductions, [1.0], 2.0, spend_all=True)[0].tolist() == [1, 1]  # the gain first, then unit 0


def test_slack_lets_a_budget_equal_to_the_total_cost_take_everything():
    reductions, costs = [np.array([[1.0, 1.0, 1.0]])], [0.1]
    total = 0.1 + 0.1 + 0.1  # the cumulative sum rounds a little above 3 × 0.1
    assert greedy_nested_rungs(reductions, costs, 0.3)[0].tolist() == [1, 1, 0]
    assert greedy_nested_rungs(reductions, costs, 0.3, absolute_slack=1e-9)[0].tolist() == [1, 1, 1]
    assert greedy_nested_rungs(reductions, costs, 0.3, relative_slack=1e-9)[0].tolist() == [1, 1, 1]
    assert total > 0.3


def reference(reductions: list[np.ndarray], step_costs: list[np.ndarray], budget: float, spend_all: bool) -> list[list[int]]:
    """One candidate at a time: sort (−gain, rung, table, unit), add costs until one exceeds the budget."""
    candidates = []
    for t, (reduction, cost) in enumerate(zip(reductions, step_costs)):
        for u in range(reduction.shape[1]):
            best = np.inf
            for r in range(reduction.shape[0]):
                best = min(best, reduction[r, u] / max(cost[r], 1e-30))
                candidates.append((-best, r, t, u, cost[r]))
    reached = [[0] * r.shape[1] for r in reductions]
    spent = 0.0
    for negative_gain, r, t, u, cost in sorted(candidates):
        spent += cost
        if spent > budget:
            break
        if spend_all or -negative_gain > 0:
            reached[t][u] = max(reached[t][u], r + 1)
    return reached


@pytest.mark.parametrize("seed", range(20))
def test_matches_a_one_at_a_time_reference_and_respects_the_budget(seed):
    rng = np.random.default_rng(seed)
    reductions, costs = [], []
    for _ in range(int(rng.integers(1, 4))):
        rungs, units = int(rng.integers(1, 4)), int(rng.integers(1, 6))
        reductions.append(rng.integers(0, 4, size=(rungs, units)).astype(np.float64))  # small integers: ties and zeros
        costs.append(rng.integers(1, 4, size=rungs).astype(np.float64))
    total = sum(float(c.sum()) * r.shape[1] for r, c in zip(reductions, costs))
    for budget in (0.0, 1.0, total / 3, total / 2, total, 2 * total):
        for spend_all in (False, True):
            reached = greedy_nested_rungs(reductions, costs, budget, spend_all=spend_all)
            assert [r.tolist() for r in reached] == reference(reductions, costs, budget, spend_all)
            spent = sum(float(np.cumsum((0.0, *c))[r].sum()) for r, c in zip(reached, costs))  # a unit on rung r paid rungs 1..r
            assert spent <= budget
