"""rex_combine="permute": the channel layout that makes every order's units a prefix.

Each channel group (:mod:`..common.channel_permutation`) of the expanded layers is
reordered once, exactly, by the summed share of relative error order 2 removes, so the
branches are added with a Pad of their uint8 codes (no Gather).  The sites' float weights
and input statistics are permuted like the graph (:func:`permute_site`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import node_label
from onnxopt.pass_base import PassContext

from ..common.channel_permutation import ChannelGroup, PermutationRefused, channel_group, permute
from .allocation import allocate_network, uniform_keep
from .site import LayerSite


def permuted_layout(graph: gs.Graph, sites: list[LayerSite], profile: tuple, options, ctx: PassContext) -> list:
    """rex_combine="permute": reorder each channel group (:mod:`.common.channel_permutation`) so the
    units every order expands are a prefix, then branches are added with Pad + Add.

    The group's layers (producers, and depthwise Convs inside it) share one order: its
    channels sorted by the summed share of relative error order 2 removes (ranking only
    by the partially expanded layers measured no better).  Each layer
    keeps the number of units the allocation gave it per order, taken as a prefix of
    that shared order.  Layers outside any permutable group keep their own selection
    and the Gather form.  The sites' float weights and input statistics are permuted
    like the graph."""
    o = options
    unit_errors, signals, costs, budget = profile
    if o["rex_allocation"] == "network":
        selections = allocate_network(unit_errors, signals, costs, budget)
    else:
        selections = [[np.zeros(uniform_keep(len(e[0]), o["rex_order"], float(o["rex_budget"])), np.int64)] * (len(e) - 1) for e in unit_errors]
    orders: dict[str, np.ndarray] = {}  # tensor name -> its group's order
    for group, members in channel_groups(graph, sites, unit_errors, ctx):
        partial = [m for m in members if 0 < len(selections[m][0]) < group.channels]
        if not partial:
            continue  # every layer of the group expands all its channels or none: nothing to place
        score = sum(np.maximum(unit_errors[m][0] - unit_errors[m][1], 0.0) / max(signals[m], 1e-30) for m in members)
        ranking = np.argsort(-score, kind="stable")
        permute(graph, group, ranking)
        orders.update({t.name: ranking for t in group.tensors})
        for m in members:
            selections[m] = [np.arange(len(chosen)) for chosen in selections[m]]
            sites[m].combine = "pad"
    for i, site in enumerate(sites):
        permute_site(site, orders)
        if site.combine != "pad" and o["rex_allocation"] == "uniform":
            selections[i] = None  # outside the groups: the uniform rule's own top units
    return selections


def channel_groups(graph: gs.Graph, sites: list[LayerSite], unit_errors: list, ctx: PassContext) -> list[tuple[ChannelGroup, list[int]]]:
    """The permutable channel groups of the sites' outputs and the sites inside each."""
    groups, site_of = [], {site.node.outputs[0].name: i for i, site in enumerate(sites)}
    claimed: set[str] = set()
    for site in sites:
        name = site.node.outputs[0].name
        if site.groups > 1 or name in claimed:
            continue
        try:
            group = channel_group(graph, site.node)
        except PermutationRefused as exc:
            ctx.refuse(f"layer {node_label(site.node)}", f"channel permutation refused ({exc}): its branches use the Gather form")
            continue
        names = {t.name for t in group.tensors}
        claimed |= names
        members = [site_of[n] for n in names if n in site_of and len(unit_errors[site_of[n]][0]) == group.channels]
        groups.append((group, sorted(members)))
    return groups


def permute_site(site: LayerSite, orders: dict[str, np.ndarray]) -> None:
    """Apply the group orders of the layer's output and input channels to its float weight
    (rows, and columns of a dense layer) and input statistics, as :func:`permute` did to the graph."""
    out_order, in_order = orders.get(site.node.outputs[0].name), orders.get(site.node.inputs[0].name)
    if out_order is not None:
        site.weight = np.take(site.weight, out_order, axis=site.out_axis)
    if in_order is None:
        return
    if site.groups == 1:
        in_axis = 1 if site.node.op == "Conv" else 1 - site.out_axis
        site.weight = np.take(site.weight, in_order, axis=in_axis)
    site.mean = None if site.mean is None else site.mean[in_order]
    site.moment = None if site.moment is None else site.moment[in_order]
