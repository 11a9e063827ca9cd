"""REx emission: the branch layers of orders ≥ 2 and how each is moved into the full
channel layout and summed with the base layer (``rex_combine``).

:func:`emit_branches` adds every branch (and the input-expansion pairs R^k ⊗ I²), each a
standard QDQ Conv/Gemm/MatMul re-quantized to uint8 (:func:`branch_bounds`), then places it:
``gather`` (one Gather with a channel map, a zero-weight unit giving the zeros), ``pad``
(a prefix or window of channels: Pad of the codes; also the ``permute`` form after
:mod:`.layout`), ``scatter`` (ScatterElements add) or ``dense`` (a full-width branch with
zero rows), and sums the terms with Adds.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PipelineError
from onnxopt.graph import NameFactory, node_label, producer

from ..common.emit import quantize_layer_bias
from ..common.numerics import checked_scales
from ..common.operators import QuantizedWeight, WeightOperator
from .expansion import Expansion, Order, channel_units
from .site import LayerSite, mean_shift, output_channel_axis, scalar_value


def emit_branches(
    graph: gs.Graph, site: LayerSite, expansion: Expansion, operator: WeightOperator, names: NameFactory, input_expansion: bool, requantize_outputs: bool
) -> list[np.ndarray]:
    """Add the branches of orders ≥ 2 (and input-expansion branches); returns the channel
    sets of the added branches.  ``input_expansion``: rex_input_expansion; ``requantize_outputs``:
    rex_requantize (the outlier residue is emitted by :mod:`.outliers`)."""
    terms = [(order, None) for order in expansion.orders[1:]]
    if input_expansion and site.input_dq is not None:
        x2 = input_residual(graph, site, names)
        # pairs (R^{k1}, I²) with k1 + 2 ≤ K + 1, on the channels kept for weight order k1 + 1
        # (higher input orders I^{k≥3} are below the 8-bit output quantizer's step: not emitted)
        for k1 in range(1, len(expansion.orders)):
            weight_order, next_order = expansion.orders[k1 - 1], expansion.orders[k1]
            channels = np.intersect1d(weight_order.channels, next_order.channels)
            if len(channels):
                terms.append((_restricted(weight_order, channels, site.out_axis), x2))
    if not terms:
        return []
    base = site.node
    label = node_label(base)
    out = base.outputs[0]
    y1 = gs.Variable(names.new(f"{label}_rex_order1"), dtype=np.float32, shape=out.shape)
    base.outputs[0] = y1
    fused = requantize_outputs and site.output_range is not None and site.input_dq is not None
    bounds = branch_bounds(site, expansion, terms) if fused else None
    summands = [requantize(graph, y1, bounds[0], names, f"{label}_rex_order1") if fused else y1]
    mode = site.combine
    scatter_into = summands[0]
    c = site.weight.shape[site.out_axis]
    for index, (order, source) in enumerate(terms):
        tag = f"{label}_rex_order{order.order}" + ("_input2" if source is not None else "")
        partial = len(order.channels) < c and not (mode == "dense" and site.groups == 1)
        slot = None
        if partial and mode in ("gather", "dense"):  # one zero-weight unit gives Gather its zero slot (no Pad)
            order, slot = _with_zero_unit(order, site)
        y = branch_layer(graph, site, order, source, names, tag, operator)
        if fused:
            y = requantize(graph, y, bounds[index + 1], names, tag, keep_codes=partial and mode not in ("scatter",))
        if not partial:
            summands.append(y)
        elif mode == "pad":
            summands.append(pad_combine(graph, site, order.channels, y, names, tag))
        elif mode == "scatter":
            scatter_into = scatter_combine(graph, site, order.channels, scatter_into, y, names, tag)
        else:  # gather (also the grouped-Conv fallback of dense)
            summands.append(gather_combine(graph, site, order.channels, y, names, tag, slot))
    if mode == "scatter":
        summands = [scatter_into] + [s for s in summands[1:]]
    total = summands[0]
    for i, term in enumerate(summands[1:]):
        last = i == len(summands) - 2
        result = out if last else gs.Variable(names.new(f"{label}_rex_sum"), dtype=np.float32, shape=out.shape)
        graph.nodes.append(gs.Node("Add", names.new(f"{label}_rex_add"), inputs=[total, term], outputs=[result]))
        total = result
    if total is not out:
        graph.nodes.append(gs.Node("Identity", names.new(f"{label}_rex_out"), inputs=[total], outputs=[out]))
    return [order.channels for order, _ in terms]


def branch_layer(graph: gs.Graph, site: LayerSite, order: Order, source: gs.Tensor | None, names: NameFactory, tag: str, operator: WeightOperator) -> gs.Variable:
    """The branch layer computing only ``order.channels`` (full width when combine="dense")."""
    base = site.node
    c = site.weight.shape[site.out_axis]
    dense = site.combine == "dense" and len(order.channels) < c and site.groups == 1
    q = order.q
    if dense:
        q = _scatter_rows(q, order.channels, c, site.out_axis)
    channels = np.arange(c) if dense else order.channels
    x = source if source is not None else base.inputs[0]
    attrs = dict(base.attrs)
    if site.groups > 1 and len(channels) < c:
        x, attrs["group"] = gather_input(graph, site, channels, x, names, tag)
    weight = operator.emit(graph, q, names, f"{tag}_weight")
    inputs = [x, weight]
    bias = None if site.mean is None or source is not None or base.op == "MatMul" else mean_shift(site, order.dequantized, order.channels)
    if dense and bias is not None:
        full = np.zeros(c, np.float32)
        full[order.channels] = bias
        bias = full
    y = gs.Variable(names.new(tag), dtype=np.float32, shape=None)
    node = gs.Node(base.op, names.new(f"{tag}_{base.op}"), attrs=attrs, inputs=inputs, outputs=[y])
    if bias is not None:
        node.inputs.append(gs.Constant(names.new(f"{tag}_bias"), (-bias).astype(np.float32)))
        if site.input_dq is not None and source is None:
            quantize_layer_bias(graph, node, scalar_value(site.input_dq.inputs[1]), q.scales, names)
    graph.nodes.append(node)
    return y


def gather_input(graph: gs.Graph, site: LayerSite, channels: np.ndarray, x: gs.Tensor, names: NameFactory, tag: str) -> tuple[gs.Tensor, int]:
    """Input channels read by the selected groups of a grouped Conv; gathered on the
    uint8 codes when the input is a per-tensor DequantizeLinear (keeps ORT's fusion)."""
    c = site.weight.shape[0]
    per_group_out, per_group_in = c // site.groups, site.weight.shape[1]
    chosen = np.unique(channels // per_group_out)
    wanted = (chosen[:, None] * per_group_in + np.arange(per_group_in)).reshape(-1).astype(np.int64)
    dq = producer(x)
    on_codes = dq is not None and dq.op == "DequantizeLinear" and scalar_value(dq.inputs[1]) is not None
    source = dq.inputs[0] if on_codes else x
    picked = gs.Variable(names.new(f"{tag}_input_codes" if on_codes else f"{tag}_input"), dtype=source.dtype, shape=None)
    if np.all(np.diff(wanted) == 1):  # contiguous (combine="pad"): Slice, which ORT's NHWC layout handles
        bounds = [gs.Constant(names.new(f"{tag}_input_{k}"), np.array([v], np.int64)) for k, v in (("start", wanted[0]), ("end", wanted[-1] + 1), ("axis", 1))]
        graph.nodes.append(gs.Node("Slice", names.new(f"{tag}_input_Slice"), inputs=[source, *bounds], outputs=[picked]))
    else:
        index = gs.Constant(names.new(f"{tag}_input_channels"), wanted)
        graph.nodes.append(gs.Node("Gather", names.new(f"{tag}_input_Gather"), attrs={"axis": 1}, inputs=[source, index], outputs=[picked]))
    if not on_codes:
        return picked, len(chosen)
    gathered = gs.Variable(names.new(f"{tag}_input"), dtype=np.float32, shape=None)
    graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{tag}_input_DequantizeLinear"), inputs=[picked, *dq.inputs[1:]], outputs=[gathered]))
    return gathered, len(chosen)


def input_residual(graph: gs.Graph, site: LayerSite, names: NameFactory) -> gs.Variable:
    """I² = DQ(Q(X − DQ(Q(X)))) with step S_x/254 (eq. 3.20), symmetric uint8."""
    dq = site.input_dq
    quant = producer(dq.inputs[0])
    x = quant.inputs[0] if quant is not None and quant.op == "QuantizeLinear" else dq.outputs[0]
    label = f"{node_label(site.node)}_rex_input2"
    diff = gs.Variable(names.new(f"{label}_error"), dtype=np.float32, shape=None)
    graph.nodes.append(gs.Node("Sub", names.new(f"{label}_Sub"), inputs=[x, dq.outputs[0]], outputs=[diff]))
    scale = float(scalar_value(dq.inputs[1])) / 254.0
    return requantize(graph, diff, (scale, 128), names, label)


def branch_bounds(site: LayerSite, expansion: Expansion, terms: list) -> list[tuple[float, int]]:
    """(scale, zero point) of the uint8 quantizer of each branch output: order k (k ≥ 2)
    symmetric ±B·max_c ‖R^k_c‖/‖R¹_c‖ (B the output quantizer's bound); the base order
    covers the output range widened by the sum of those bounds, so anything it clips the
    output quantizer clips too."""
    lo, hi = site.output_range
    bound = max(abs(lo), abs(hi))
    r1 = np.moveaxis(expansion.orders[0].dequantized, site.out_axis, 0).reshape(site.weight.shape[site.out_axis], -1)
    n1 = np.linalg.norm(r1, axis=1)
    result = []
    for order, source in terms:
        rk = np.moveaxis(order.dequantized, site.out_axis, 0).reshape(len(order.channels), -1)
        ratio = np.linalg.norm(rk, axis=1) / np.maximum(n1[order.channels], 1e-12)
        b = bound * float(np.max(ratio, initial=0.0))
        if source is not None:  # R^{k1} ⊗ I²: the input error is at most S_x/2 per element
            b = bound / 127.0
        result.append((max(b, 1e-12) / 127.0, 128))
    extra = sum(s * 127.0 for s, _ in result)
    low, high = lo - extra, hi + extra
    scale = (high - low) / 255.0
    return [(scale, int(np.clip(np.round(-low / scale), 0, 255)))] + result


def requantize(graph: gs.Graph, y: gs.Tensor, quant: tuple[float, int], names: NameFactory, tag: str, keep_codes: bool = False):
    """Q→DQ on ``y`` (uint8); with keep_codes the codes and quantizer are returned so the
    channel movement happens on uint8 before the DequantizeLinear."""
    scale = gs.Constant(names.new(f"{tag}_out_scale"), checked_scales(quant[0], f"{tag} output"))
    zero = gs.Constant(names.new(f"{tag}_out_zero_point"), np.array(quant[1], np.uint8))
    codes = gs.Variable(names.new(f"{tag}_out_quantized"), dtype=np.uint8, shape=None)
    graph.nodes.append(gs.Node("QuantizeLinear", names.new(f"{tag}_out_QuantizeLinear"), inputs=[y, scale, zero], outputs=[codes]))
    if keep_codes:
        return codes, scale, zero
    return dequantize(graph, codes, scale, zero, names, tag)


def dequantize(graph: gs.Graph, codes, scale, zero, names: NameFactory, tag: str) -> gs.Variable:
    out = gs.Variable(names.new(f"{tag}_out_dequantized"), dtype=np.float32, shape=None)
    graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{tag}_out_DequantizeLinear"), inputs=[codes, scale, zero], outputs=[out]))
    return out


def gather_combine(graph: gs.Graph, site: LayerSite, channels: np.ndarray, y, names: NameFactory, tag: str, slot: int) -> gs.Variable:
    """Branch output → full channel layout with one Gather (channel map: c ↦ its position
    in the branch, or ``slot``, the branch's zero-weight unit whose output is exactly 0)."""
    c = site.weight.shape[site.out_axis]
    codes, quant = (y[0], y[1:]) if isinstance(y, tuple) else (y, None)
    axis = output_channel_axis(site)
    channel_map = np.full(c, slot, np.int64)
    channel_map[channels] = np.arange(len(channels))
    padded = codes
    placed = gs.Variable(names.new(f"{tag}_placed"), dtype=codes.dtype, shape=None)
    graph.nodes.append(
        gs.Node("Gather", names.new(f"{tag}_Gather"), attrs={"axis": axis}, inputs=[padded, gs.Constant(names.new(f"{tag}_channel_map"), channel_map)], outputs=[placed])
    )
    return placed if quant is None else dequantize(graph, placed, *quant, names, tag)


def pad_combine(graph: gs.Graph, site: LayerSite, channels: np.ndarray, y, names: NameFactory, tag: str) -> gs.Variable:
    """A contiguous window of channels [a, a+n) → full layout: Pad the channel axis with
    a before and C − a − n after, with the zero point (on the uint8 codes when quantized)."""
    c = site.weight.shape[site.out_axis]
    codes, quant = (y[0], y[1:]) if isinstance(y, tuple) else (y, None)
    axis = output_channel_axis(site)
    pads = np.zeros(2 * site.rank, np.int64)
    pads[axis], pads[site.rank + axis] = channels[0], c - channels[-1] - 1
    value = quant[1] if quant is not None else gs.Constant(names.new(f"{tag}_pad_value"), np.array(0, np.float32))
    padded = gs.Variable(names.new(f"{tag}_padded"), dtype=codes.dtype, shape=None)
    graph.nodes.append(gs.Node("Pad", names.new(f"{tag}_Pad"), inputs=[codes, gs.Constant(names.new(f"{tag}_pads"), pads), value], outputs=[padded]))
    return padded if quant is None else dequantize(graph, padded, *quant, names, tag)


def scatter_combine(graph: gs.Graph, site: LayerSite, channels: np.ndarray, into: gs.Tensor, y: gs.Tensor, names: NameFactory, tag: str) -> gs.Variable:
    """ScatterElements(into, index expanded to the branch's shape, y, reduction=add)."""
    if graph.opset < 16:
        raise PipelineError("rex: rex_combine='scatter' needs opset ≥ 16 (ScatterElements reduction)")
    axis = output_channel_axis(site)
    shape = [1] * site.rank
    shape[axis] = len(channels)
    index = gs.Constant(names.new(f"{tag}_channels"), channels.astype(np.int64).reshape(shape))
    y_shape = gs.Variable(names.new(f"{tag}_shape"), dtype=np.int64, shape=[site.rank])
    graph.nodes.append(gs.Node("Shape", names.new(f"{tag}_Shape"), inputs=[y], outputs=[y_shape]))
    expanded = gs.Variable(names.new(f"{tag}_index"), dtype=np.int64, shape=None)
    graph.nodes.append(gs.Node("Expand", names.new(f"{tag}_Expand"), inputs=[index, y_shape], outputs=[expanded]))
    out = gs.Variable(names.new(f"{tag}_scattered"), dtype=np.float32, shape=None)
    graph.nodes.append(gs.Node("ScatterElements", names.new(f"{tag}_ScatterElements"), attrs={"axis": axis, "reduction": "add"}, inputs=[into, expanded, y], outputs=[out]))
    return out


def _with_zero_unit(order: Order, site: LayerSite) -> tuple[Order, int]:
    """``order`` plus one unselected unit (channel, or group) with zero weights; returns it and
    the position of the unit's first channel among the branch's channels.  The branch's
    output there is exactly 0 (zero weights, zero bias): Gather reads it for every channel
    the order does not expand."""
    c = site.weight.shape[site.out_axis]
    units = channel_units(c, site.groups)
    chosen = np.zeros(int(units.max()) + 1, bool)
    chosen[units[order.channels]] = True
    dummy = int(np.flatnonzero(~chosen)[0])
    extra = np.flatnonzero(units == dummy)
    channels = np.concatenate([order.channels, extra])
    ranking = np.argsort(channels, kind="stable")
    q = order.q
    zeros = list(q.codes.shape)
    zeros[site.out_axis] = len(extra)
    codes = np.take(np.concatenate([q.codes, np.zeros(zeros, q.codes.dtype)], axis=site.out_axis), ranking, axis=site.out_axis)
    dequantized = np.take(np.concatenate([order.dequantized, np.zeros(zeros)], axis=site.out_axis), ranking, axis=site.out_axis)
    scales = q.scales
    if q.axis is not None:
        scales = np.concatenate([q.scales, np.full(len(extra), np.max(q.scales), np.float32)])[ranking]
    sorted_channels = channels[ranking]
    widened = Order(order.order, sorted_channels, QuantizedWeight(codes, scales, q.axis, q.bits, dict(q.params)), dequantized)
    return widened, int(np.searchsorted(sorted_channels, extra[0]))


def _restricted(order: Order, channels: np.ndarray, out_axis: int) -> Order:
    """``order`` restricted to ``channels`` (a subset of its own channels)."""
    position = np.searchsorted(order.channels, channels)
    q = order.q
    codes = np.take(q.codes, position, axis=out_axis)
    scales = np.take(q.scales, position) if q.axis is not None else q.scales
    return Order(order.order, channels, QuantizedWeight(codes, scales, q.axis, q.bits, dict(q.params)), np.take(order.dequantized, position, axis=out_axis))


def _scatter_rows(q: QuantizedWeight, channels: np.ndarray, c: int, out_axis: int) -> QuantizedWeight:
    """A full-width quantized weight with zero codes outside ``channels`` (dense branch)."""
    shape = list(q.codes.shape)
    shape[out_axis] = c
    codes = np.zeros(shape, q.codes.dtype)
    index = [slice(None)] * len(shape)
    index[out_axis] = channels
    codes[tuple(index)] = q.codes
    scales = q.scales
    if q.axis is not None:
        scales = np.ones(c, np.float32) * np.float32(np.max(q.scales))
        scales[channels] = q.scales
    return QuantizedWeight(codes, scales, q.axis, q.bits, dict(q.params))
