"""REx budget allocation: which units (channels, or groups) each order k ≥ 2 expands.

``rex_allocation="uniform"`` keeps the same share γ/(K−1) of every layer per order
(:func:`uniform_keep`); ``"network"`` spends γ × the layers' MACs where the relative error
falls most per MAC (:func:`allocate_network`, a greedy knapsack over the unit error
tables of densely expanded layers).  The same knapsack allocates the fold's divisor
ladder (:mod:`.fold`): its "orders" are then the rungs of a channel, each with its own
cost (MACs × the extra code bits of the rung), and :func:`unit_rungs` reads each unit's
rung off the nested selections.  :func:`layer_macs` gives the costs.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import with_inferred_shapes
from onnxopt.metrics import tensor_shapes
from onnxopt.pass_base import PassContext

from ..common.knapsack import greedy_nested_rungs
from .site import LayerSite, output_channel_axis


def allocate_network(unit_errors: list[np.ndarray], signals: np.ndarray, costs: list, budget: float, spend_all: bool = False) -> list[list[np.ndarray]]:
    """Network-wide sparse expansion: which units each order k ≥ 2 expands in every layer.

    ``unit_errors[l]`` is the [K, units] table of :attr:`.expansion.Expansion.unit_errors` of layer l
    expanded densely (per-channel scales make the units independent: the error an order
    removes from a unit does not depend on which other units are expanded), ``signals[l]``
    the layer's weight energy ‖W_l‖² (weighted like the errors), ``costs[l]`` the cost of one
    unit's step k−1 → k (a number: the same for every order, e.g. the MACs of one unit; or
    one per order 2..K, e.g. MACs × the extra bits of each rung of the fold's ladder) and
    ``budget`` the total cost allowed.  Candidate (l, u, k) gains
    ``(E_{k−1,u} − E_{k,u}) / ‖W_l‖²``, the share of layer l's relative weight error it
    removes (first order, the layers' noise-to-signal ratios add up along the network),
    and candidates are taken by gain per cost until the next one would exceed the budget
    (greedy knapsack).  Gains per cost are made non-increasing in k and ties keep k
    ascending, so a unit's orders are taken in order (nested selections).  Candidates
    with no measured gain are left out, unless ``spend_all`` (the fold's ladder): then
    they come last, taken only with budget left after every one that helps (the gains
    rest on data-free input statistics; at γ = 100 % every channel gets the top rung).
    Returns, per layer, the sorted units of orders 2..K (the shared
    :func:`..common.knapsack.greedy_nested_rungs`, its rungs read back as nested selections)."""
    reductions, step_costs = [], []
    for layer, errors in enumerate(unit_errors):
        errors = np.asarray(errors, np.float64)
        if len(errors) < 2:  # no order to expand
            reductions.append(np.zeros((0, 0)))
            step_costs.append(0.0)
            continue
        reductions.append(np.maximum(errors[:-1] - errors[1:], 0.0) / max(float(signals[layer]), 1e-30))
        step_costs.append(costs[layer])
    # relative slack 1e-9: a budget equal to the total cost takes it all
    rungs = greedy_nested_rungs(reductions, step_costs, budget, relative_slack=1e-9, spend_all=spend_all)
    return [[np.flatnonzero(reached > k) for k in range(max(len(e) - 1, 0))] for reached, e in zip(rungs, unit_errors)]


def unit_rungs(selection: list[np.ndarray], n_units: int) -> np.ndarray:
    """Per unit, how many of the nested selections (orders, or rungs) hold it: its rung
    (0: not expanded)."""
    rungs = np.zeros(n_units, np.int64)
    for chosen in selection:
        rungs[np.asarray(chosen, np.int64)] += 1
    return rungs


def uniform_keep(n_units: int, order: int, budget: float) -> int:
    """Units each order k ≥ 2 keeps under the uniform rule: round(γ/(K−1)·units)."""
    return 0 if order < 2 else min(int(round(min(budget, order - 1) / (order - 1) * n_units)), n_units)


def layer_macs(site: LayerSite, shape: list | None = None) -> float:
    """MACs of the base layer per sample (1 for an axis of unknown size: relative use)."""
    shape = shape if shape is not None else site.node.outputs[0].shape
    positions = 1.0
    if shape is not None:  # every axis but the batch (0) and the channel axis
        dims = [d for i, d in enumerate(shape) if i not in (0, output_channel_axis(site))]
        positions = float(np.prod([d if isinstance(d, (int, np.integer)) else 1 for d in dims]))
    w = site.weight
    per_output = w.size / w.shape[site.out_axis]
    return positions * w.shape[site.out_axis] * per_output


def inferred_shapes(graph: gs.Graph, ctx: PassContext) -> dict[str, list[int | None]]:
    """Every tensor's shape from a fresh shape inference of the graph as it is now."""
    return tensor_shapes(with_inferred_shapes(ctx.export(graph)))
