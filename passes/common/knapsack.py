"""Greedy knapsack over nested rungs: how far up its ladder each unit climbs under one budget.

Both network-wide REx allocations use it: the conv/MatMul one (:mod:`..rex.allocation`: units
are channels or groups, rungs the expansion orders 2..K or the fold's divisor ladder) and the
MatMulNBits one (:mod:`..weight_only.residual`: units are output columns, rungs the residual
widths).

The method, in plain words.  A *table* is one layer; each of its units can climb rungs
1..R in order.  Rung r of a unit costs ``step_costs[r − 1]`` more than rung r − 1 (the same
for every unit of the table) and removes ``reductions[r − 1, unit]`` more error.  Every
(table, unit, rung) is a candidate worth its reduction per cost, its *gain*.  A rung can
only be taken on top of the rungs below it, so the gains along a unit's rungs are made
non-increasing first (each one capped by the smallest gain below it: a running minimum,
the monotone envelope); a rung then never ranks above the rung it builds on.

All candidates of all tables are ranked best gain first; ties go to the lower rung, then the
earlier table, then the lower unit, so the ranking is deterministic and a unit's rungs stay
in order.  The selection is the longest prefix of that ranking whose summed cost fits the
budget (plus the caller's slack for float rounding: a budget equal to the total cost takes
everything).  Candidates in that prefix with no gain (gain ≤ 0) still count in the sum but
are dropped, unless ``spend_all``: then they are kept (they rank after every candidate that
helps, so they only use budget nothing else wanted).  Because the selection is a prefix and
a unit's rungs come in order, it is nested: a unit holding rung r holds rungs 1..r, so the
result is one rung number per unit (0: none).

:func:`greedy_prefix` is the ranking-and-prefix step alone, for callers with single-rung
candidates and their own tie order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Floor of a step cost in the gain division (a free step ranks first, without dividing by 0).
MIN_COST = 1e-30


def gains_per_cost(reductions: np.ndarray, step_costs: np.ndarray | float) -> np.ndarray:
    """Gain per cost [rungs, units] of one table, non-increasing along the rungs:
    ``reductions`` [rungs, units] over ``step_costs`` (one number, or one per rung; floored
    at MIN_COST), then a running minimum down the rungs."""
    cost = np.asarray(step_costs, np.float64).reshape(-1, 1)
    return np.minimum.accumulate(reductions / np.maximum(cost, MIN_COST), axis=0)


def greedy_prefix(gain: np.ndarray, cost: np.ndarray, budget: float, ties: Sequence[np.ndarray] = (), *,
                  relative_slack: float = 0.0, absolute_slack: float = 0.0, spend_all: bool = False) -> np.ndarray:
    """The candidates taken, in ranking order (indices into ``gain``): ranked by ``gain``,
    best first, ties by the keys ``ties`` (most significant first, each ascending, then the
    index); the longest prefix whose cost fits ``budget`` · (1 + ``relative_slack``) +
    ``absolute_slack``; without ``spend_all``, only its candidates with gain > 0."""
    ranking = np.lexsort((*reversed(tuple(ties)), -gain))
    taken = ranking[np.cumsum(cost[ranking]) <= budget * (1 + relative_slack) + absolute_slack]
    return taken if spend_all else taken[gain[taken] > 0]


def greedy_nested_rungs(reductions: Sequence[np.ndarray], step_costs: Sequence, budget: float, *,
                        relative_slack: float = 0.0, absolute_slack: float = 0.0, spend_all: bool = False) -> list[np.ndarray]:
    """The greedy knapsack over (table, unit, rung) of the module docstring.  Per table t:
    ``reductions[t]`` [rungs, units] the error each rung removes, ``step_costs[t]`` the cost
    of each rung (one number, or one per rung).  Returns per table the rung each unit
    reached ([units] int64, 0 = none; nested)."""
    gains, costs, table_of, rung_of, unit_of = [], [], [], [], []
    for index, (reduction, step_cost) in enumerate(zip(reductions, step_costs)):
        gain = gains_per_cost(reduction, step_cost)
        rungs, n_units = gain.shape
        gains.append(gain.reshape(-1))
        costs.append(np.broadcast_to(np.asarray(step_cost, np.float64).reshape(-1, 1), gain.shape).reshape(-1))
        table_of.append(np.full(gain.size, index))
        rung_of.append(np.repeat(np.arange(rungs), n_units))
        unit_of.append(np.tile(np.arange(n_units), rungs))
    reached = [np.zeros(np.shape(reduction)[1], np.int64) for reduction in reductions]
    if not gains:
        return reached
    gain, cost, table, rung, unit = (np.concatenate(a) for a in (gains, costs, table_of, rung_of, unit_of))
    taken = greedy_prefix(gain, cost, budget, (rung, table, unit), relative_slack=relative_slack,
                          absolute_slack=absolute_slack, spend_all=spend_all)
    for index in np.unique(table[taken]):
        mine = taken[table[taken] == index]
        np.maximum.at(reached[index], unit[mine], rung[mine] + 1)
    return reached


__all__ = ["MIN_COST", "gains_per_cost", "greedy_nested_rungs", "greedy_prefix"]
