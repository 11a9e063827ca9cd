"""The quantizers on the quantized layers' outputs (after their Relu/Clip), so ORT fuses
each layer into QLinearConv/QGemm: :func:`quantize_outputs`, and :func:`chain_end`, the
tensor ORT quantizes after a layer.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import NameFactory, node_label
from onnxopt.pass_base import PassContext

from ..common.emit import quantize_activation
from ..common.numerics import ActivationQuant, activation_quant
from ..common.ops import FOLLOWING_ACTIVATIONS
from ..common.ranges import ChannelRange, channel_bound
from .fallback import MOVEMENT_OPS


def quantize_outputs(
    graph: gs.Graph,
    ctx: PassContext,
    layers: list[gs.Node],
    ranges: dict[str, ChannelRange],
    quants: dict[str, ActivationQuant],
    dq_of: dict[str, gs.Variable],
    names: NameFactory,
    act_bits: int,
) -> int:
    """Q→DQ after each quantized layer (after its Relu/Clip) so ORT can fuse it.  Before a
    data-movement op (Pad, MaxPool, Reshape, …) whose output is quantized the same
    quantizer is used, so ORT can drop the DQ→op→Q pair around it.  ``act_bits``: the activation bits."""
    count = 0
    for layer in layers:
        end = chain_end(layer.outputs[0])
        if not end.outputs or end.name in dq_of or any(n.op == "QuantizeLinear" for n in end.outputs):
            continue  # nobody reads it (a graph output only), or already quantized
        quant = downstream_quant(end, quants)
        if quant is None:
            channel_range = ranges.get(end.name)
            if channel_range is None:
                ctx.refuse(f"output of {node_label(layer)}", f"no statistics for {end.name}: left float (fused_by_ort says what ORT runs)")
                continue
            unsigned = bool(np.all(channel_range.lo >= 0))
            low = 0.0 if unsigned else float(channel_range.lo.min())
            quant = activation_quant(low, float(channel_range.hi.max()), act_bits)
        dq_of[end.name] = quantize_activation(graph, end, quant, names)
        count += 1
    return count


def downstream_quant(tensor: gs.Tensor, quants: dict[str, ActivationQuant]) -> ActivationQuant | None:
    """The quantizer of the output of the single data-movement op reading ``tensor``, if any."""
    if len(tensor.outputs) != 1:
        return None
    node = tensor.outputs[0]
    if node.op not in MOVEMENT_OPS or not node.outputs or node.inputs[0] is not tensor:
        return None
    return quants.get(node.outputs[0].name)


def chain_end(tensor: gs.Tensor) -> gs.Tensor:
    """Follow single-reader Relu/Clip nodes (and Min/Max with a per-channel constant bound,
    the equalize pass's ReLU6) after a layer output (the tensor ORT quantizes)."""
    current = tensor
    while len(current.outputs) == 1 and current.outputs[0].outputs and _following(current.outputs[0]):
        current = current.outputs[0].outputs[0]
    return current


def _following(node: gs.Node) -> bool:
    return node.op in FOLLOWING_ACTIVATIONS or channel_bound(node) is not None
