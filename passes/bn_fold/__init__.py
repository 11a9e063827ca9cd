"""fold-batchnorm: fold every BatchNormalization that can be folded exactly.

The necessary-and-sufficient condition of "To Fold or Not to Fold" (thesis §1.1.2,
docs/bn-folding.md): a BN computing ``z = s·x + t`` per channel (``s = γ/√(v+ε)``,
``t = β − s·μ``) can be removed iff its map can be moved onto a closed set of *roots*
(layers producing the mapped tensors, which absorb the map) and *leaves* (layers reading
them, which absorb the inverse), connected only through *transparent* nodes.

Backward (tried first)::

    Conv_a ─┐                              Conv_a' ─┐             (W_a·s, s·b_a + t)
            Add ── BN ── Relu       →               Add ── Relu
    Conv_b ─┘                              Conv_b' ─┘             (W_b·s, s·b_b)

Forward (when backward is blocked, e.g. by a Relu before the BN)::

    Relu ── BN ── Conv(pad 0)       →      Relu ── Conv'           (W[:,c]·s_c, b + Σ W[:,c]·t_c)

Transparent nodes (channel bookkeeping in :mod:`.channels`): Identity, Dropout, Add/Sub,
Concat/Split/Slice, Transpose/Reshape/Flatten/Squeeze/Unsqueeze, Average/Max pooling
(global too), ReduceMean over non-channel axes, Resize (nearest/linear), Pad (shift only
through reflect/edge), Mul by a gate (shift must be 0).  Expressive nodes and their exact
update rules are in :mod:`.absorb`.  Discovery and the solution of the per-tensor maps
are in :mod:`.region`.

Refused (with the reason in the report): training-mode BN, non-constant BN parameters,
γ = 0 in some channel when a leaf needs the inverse map (forward, or backward with
leaves), and every BN whose closure meets a blocking node (activation, graph input/output,
unknown op), a root/leaf overlap, a shift through zero padding or a gate, a negative
scale through a max, or channel axes that cannot be traced.

Statistics: each folded BN's output statistics (per channel mean β and std |γ|) are kept
in the model metadata ``onnxopt.bn_statistics`` for the tensor now holding those values
(backward: the BN input; forward: the BN input with its running mean/std), and later
folds that rescale that tensor update them, so data-free quantization still works after
folding.  :func:`read_bn_statistics` reads them back.

A BN whose output is a graph output folds backward only, and the graph output keeps its
name: the producer of the BN input writes it (as the classic Conv → BN fold does).

BNs inside If/Loop/Scan bodies (nested too) fold the same way within their own body: the
body's outputs count as graph outputs, its inputs and the tensors of the enclosing graph
block, and a weight the body reads from the enclosing graph (shared by both If branches,
say) is copied before it is rescaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import (
    NameFactory,
    all_graphs,
    cleanup,
    constant_values,
    detach,
    is_default_domain,
    is_graph_output,
    node_label,
    per_channel,
    producer,
    replace_all_uses,
    set_constant_input,
    substitute,
)
from onnxopt.pass_base import Pass, PassContext, PassResult

from ..common.absorb import absorb_input, absorb_output
from ..common.batchnorm import bn_refusal, bn_scale_shift
from ..common.channels import ChannelMap, tensor_rank
from ..common.statistics import STATISTICS_KEY, read_bn_statistics, statistics_from_metadata, statistics_to_metadata
from .region import FoldImpossible, Region, discover, leaf_refusal, push_shift, recompute, root_axis_refusal, spread_scales



@dataclass
class FoldPlan:
    direction: str
    region: Region
    values: dict[str, ChannelMap]


def plan_fold(graph: gs.Graph, bn: gs.Node) -> tuple[FoldPlan | None, str]:
    """The fold of ``bn`` (backward first, then forward), or None and the reasons."""
    reason = bn_refusal(bn)
    if reason:
        return None, reason
    scale, shift = bn_scale_shift(bn)
    reasons = []
    for direction in ("backward", "forward"):
        try:
            return _plan(graph, bn, direction == "backward", scale, shift), ""
        except FoldImpossible as exc:
            reasons.append(f"{direction}: {exc}")
    return None, "; ".join(reasons)


def _inverse_refusal(scale: np.ndarray) -> str | None:
    zeros = int(np.sum(scale == 0))
    return f"γ = 0 in {zeros} channel(s): the map has no inverse" if zeros else None


def _plan(graph: gs.Graph, bn: gs.Node, backward: bool, scale: np.ndarray, shift: np.ndarray) -> FoldPlan:
    """One direction's fold.  γ = 0 only blocks folds whose leaves need the inverse map (a
    backward fold into roots alone is exact for any scale, like the classic Conv → BN fold)."""
    if not backward and _inverse_refusal(scale):
        raise FoldImpossible(_inverse_refusal(scale))
    region = discover(graph, bn, backward)
    if region.leaves and _inverse_refusal(scale):
        raise FoldImpossible(f"{_inverse_refusal(scale)}, and {len(region.leaves)} leaf layer(s) would need it")
    spread_scales(region, 1, scale if backward else 1.0 / scale)
    if backward:
        root_shifts: dict[str, np.ndarray] = {}
        push_shift(region, region.seed, shift, root_shifts)
        sources = {}
        for key, root in region.roots.items():
            out = region.maps[root.outputs[0].name]
            sources[root.outputs[0].name] = ChannelMap(out.axis, out.scale, root_shifts.get(key, np.zeros_like(out.scale)))
        for key, (node, _) in region.constants.items():
            out = region.maps[node.outputs[0].name]
            sources[key] = ChannelMap(out.axis, out.scale, root_shifts.get(key, np.zeros_like(out.scale)))
    else:
        sources = {region.seed.name: ChannelMap(1, 1.0 / scale, -shift / scale)}
        for root in region.roots.values():
            out = region.maps[root.outputs[0].name]
            sources[root.outputs[0].name] = ChannelMap(out.axis, out.scale, np.zeros_like(out.scale))
        for key, (node, _) in region.constants.items():
            out = region.maps[node.outputs[0].name]
            sources[key] = ChannelMap(out.axis, out.scale, np.zeros_like(out.scale))
    values = recompute(region, list(graph.nodes), sources)
    if backward and not np.allclose(values[region.seed.name].shift, shift, rtol=1e-9, atol=1e-12):
        raise FoldImpossible("the shift cannot be distributed exactly over the roots")
    for root in region.roots.values():
        reason = root_axis_refusal(root, values[root.outputs[0].name].axis)
        if reason:
            raise FoldImpossible(reason)
    for leaf in region.leaves.values():
        reason = leaf_refusal(leaf, values[leaf.inputs[0].name])
        if reason:
            raise FoldImpossible(reason)
    for node, _ in region.constants.values():
        if tensor_rank(node.outputs[0]) is None:
            raise FoldImpossible(f"{node.op} {node_label(node)}: rank of its output unknown (its constant operand cannot be mapped)")
    return FoldPlan("backward" if backward else "forward", region, values)


def apply_fold(graph: gs.Graph, bn: gs.Node, plan: FoldPlan, names: NameFactory) -> None:
    for root in plan.region.roots.values():
        value = plan.values[root.outputs[0].name]
        absorb_output(graph, root, value.scale, value.shift, names)
    for leaf in plan.region.leaves.values():
        value = plan.values[leaf.inputs[0].name]
        absorb_input(graph, leaf, value.scale, value.shift, names)
    for key, (node, index) in plan.region.constants.items():
        value = plan.values[key]
        set_constant_input(graph, node, index, mapped_constant(constant_values(node, index), value, tensor_rank(node.outputs[0])), names)
    data, result = bn.inputs[0], bn.outputs[0]
    detach(bn)
    if is_graph_output(graph, result):  # backward only: the graph output keeps its name
        maker = producer(data)
        replace_all_uses(graph, data, result)
        substitute(maker.outputs, data, result)
    else:
        replace_all_uses(graph, result, data)


def surviving_tensor(graph: gs.Graph, bn: gs.Node) -> str:
    """The name of the tensor holding the BN's input (now rescaled) once ``bn`` is folded."""
    return bn.outputs[0].name if is_graph_output(graph, bn.outputs[0]) else bn.inputs[0].name


def mapped_constant(values: np.ndarray, channel_map: ChannelMap, rank: int) -> np.ndarray:
    """``scale·c + shift`` along the map's axis for a constant operand broadcast to ``rank``
    dimensions; the result only grows dimensions the Add output already has."""
    expanded = values.astype(np.float64).reshape((1,) * (rank - values.ndim) + values.shape)
    mapped = per_channel(channel_map.scale, channel_map.axis, rank) * expanded + per_channel(channel_map.shift, channel_map.axis, rank)
    return mapped.astype(values.dtype)




def _bn_output_statistics(bn: gs.Node, direction: str) -> dict[str, Any]:
    if direction == "backward":  # the BN input now holds the BN output: N(β, γ²)
        mean, std = constant_values(bn, 2), np.abs(constant_values(bn, 1))
    else:  # the BN input itself, described by the running statistics
        mean, std = constant_values(bn, 3), np.sqrt(constant_values(bn, 4))
    return {"axis": 1, "mean": _floats(mean), "std": _floats(std), "source": node_label(bn)}


def _floats(values: np.ndarray) -> list[float]:
    return [float(f"{v:.7g}") for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def _update_statistics(statistics: dict[str, dict[str, Any]], values: dict[str, ChannelMap]) -> None:
    """Tensors rescaled by a fold keep statistics that describe their new values."""
    for name, value in values.items():
        entry = statistics.get(name)
        if entry is None or entry["axis"] != value.axis or len(entry["mean"]) != len(value.scale):
            continue
        entry["mean"] = _floats(value.scale * np.asarray(entry["mean"]) + value.shift)
        entry["std"] = _floats(np.abs(value.scale) * np.asarray(entry["std"]))


class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    summary = "fold every BatchNormalization that can be folded exactly (N&S condition: across Add/Concat/pooling, backward and forward)"
    tags = frozenset({"bn-fold"})
    runs_before = frozenset({"prune", "quantize"})

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cleanup(graph)
        names = NameFactory(graph)
        metadata = ctx.metadata
        statistics = statistics_from_metadata(metadata)
        folded: list[dict[str, Any]] = []
        candidates = [(scope, n) for scope in all_graphs(graph) for n in scope.nodes if n.op == "BatchNormalization" and is_default_domain(n)]
        for scope, bn in ctx.progress(candidates, label="BatchNormalization"):
            plan, reason = plan_fold(scope, bn)
            if plan is None:
                ctx.refuse(f"BN {node_label(bn)}", f"not folded: {reason}")
                continue
            record = {
                "bn": node_label(bn),
                **({"body": scope.name or "body"} if scope is not graph else {}),
                "direction": plan.direction,
                "roots": [node_label(n) for n in plan.region.roots.values()],
                "leaves": [node_label(n) for n in plan.region.leaves.values()],
            }
            new_statistics = _bn_output_statistics(bn, plan.direction)
            source, target = bn.inputs[0].name, surviving_tensor(scope, bn)
            apply_fold(scope, bn, plan, names)
            _update_statistics(statistics, plan.values)
            if target != source:
                statistics.pop(source, None)
            statistics[target] = new_statistics
            folded.append(record)
            ctx.logger.info("folded BN %s %s into %s", record["bn"], plan.direction, record["roots"] + record["leaves"])
        if folded:
            cleanup(graph)
            metadata[STATISTICS_KEY] = statistics_to_metadata(statistics)
        backward = sum(1 for r in folded if r["direction"] == "backward")
        return PassResult(
            bool(folded),
            {
                "bn_folded": len(folded),
                "backward": backward,
                "forward": len(folded) - backward,
                "bn_kept": len(candidates) - len(folded),
                "folds": folded,
            },
        )


__all__ = ["FoldBatchNorm", "plan_fold", "apply_fold", "read_bn_statistics", "statistics_from_metadata", "statistics_to_metadata", "STATISTICS_KEY"]
