"""The quantizers on the quantized layers' outputs (after their Relu/Clip), so ORT fuses
each layer into QLinearConv/QGemm: :func:`quantize_outputs`, and :func:`chain_end`, the
tensor ORT quantizes after a layer; :func:`drop_output_quantizer` removes one again (a layer
put back in float whose output only float ops read).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import NameFactory, node_label
from onnxopt.pass_base import PassContext

from ..common.emit import quantize_activation
from ..common.numerics import ActivationQuant, activation_quant
from ..common.ops import FOLLOWING_ACTIVATIONS, LAYER_OPS
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


def drop_output_quantizer(layer: gs.Node) -> int:
    """Give the readers of the output quantizer of ``layer`` (the Q→DQ after its Relu/Clip that
    :func:`quantize_outputs` inserted) the float tensor, unless a Conv/Gemm/MatMul reads
    it; the number of inputs given back (the orphaned Q/DQ go with the next cleanup)."""
    end = chain_end(layer.outputs[0])
    dqs = [dq for q in end.outputs if q.op == "QuantizeLinear" for dq in q.outputs[0].outputs if dq.op == "DequantizeLinear"]
    if any(reader.op in LAYER_OPS for dq in dqs for reader in dq.outputs[0].outputs):
        return 0
    restored = 0
    for dq in dqs:
        for reader in list(dq.outputs[0].outputs):
            for index, value in enumerate(reader.inputs):
                if value is dq.outputs[0]:
                    reader.inputs[index] = end
                    restored += 1
    return restored


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
