"""Quantized pieces put back in float where ORT would not fuse them, and the float values
under the quantize pass's Q/DQ.

:func:`read_float_where_unfused` gives readers of an activation quantizer that ORT cannot
fuse (e.g. a post-LN residual Add) the float tensor; :func:`unquantize` puts a static QDQ
layer ORT does not fuse back in float (the fusion check of the quantize pass), and
:func:`depthwise` tells the depthwise Convs the fusion check may put back in float.
:func:`float_source`, :func:`dequantized_input` and :func:`static_weight_name` read through
the emitted Q/DQ.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import NameFactory, constant_values, node_label, optional_input

from ..common.ops import AVERAGING_OPS, FOLLOWING_ACTIVATIONS, LAYER_OPS, QDQ_OPS

#: Ops that only move values: ORT drops DQ→op→Q around them when both sides share a quantizer.
MOVEMENT_OPS = frozenset({"Pad", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Identity"})


def read_float_where_unfused(graph: gs.Graph, dq_of: dict[str, gs.Variable]) -> int:
    """Give the float tensor back to the readers of an activation DequantizeLinear that are
    not quantized layers and whose output never reaches a QuantizeLinear (directly or through
    Relu/Clip): ORT cannot fuse them (no QLinearAdd without a quantized output), so reading the
    fake-quantized value only adds rounding error — e.g. the residual Add of a post-LN
    transformer reading the LayerNorm output.  The number of inputs given back."""
    restored = 0
    for dq_output in dq_of.values():
        source = float_source(dq_output)
        if source is dq_output or _from_layer(source):
            continue  # a quantized layer's own output quantizer makes it QLinearConv/QGemm: keep it
        for reader in list(dq_output.outputs):
            if reader.op in LAYER_OPS or reader.op in QDQ_OPS or any(_reaches_quantize(out) for out in reader.outputs):
                continue
            for index, value in enumerate(reader.inputs):
                if value is dq_output:
                    reader.inputs[index] = source
                    restored += 1
    return restored


def _from_layer(tensor: gs.Tensor) -> bool:
    """``tensor`` is a Conv/Gemm/MatMul output, directly or after Relu/Clip (the tensor an
    output quantizer reads; giving its readers the float value would unfuse the layer)."""
    node = tensor.inputs[0] if tensor.inputs else None
    while node is not None and node.op in FOLLOWING_ACTIVATIONS:
        node = node.inputs[0].inputs[0] if node.inputs and node.inputs[0].inputs else None
    return node is not None and node.op in LAYER_OPS


def _reaches_quantize(tensor: gs.Tensor) -> bool:
    """``tensor`` is read by a QuantizeLinear, directly or after Relu/Clip, a movement op or
    average pooling (ORT runs it on uint8 between quantizers: QLinear(Global)AveragePool)."""
    for reader in tensor.outputs:
        if reader.op == "QuantizeLinear":
            return True
        if (reader.op in FOLLOWING_ACTIVATIONS or reader.op in MOVEMENT_OPS or reader.op in AVERAGING_OPS) and any(
            _reaches_quantize(o) for o in reader.outputs
        ):
            return True
    return False


def depthwise(layer: gs.Node) -> bool:
    """A depthwise Conv: one input channel per group (``group`` > 1, weight [C_out, 1, k, k])."""
    if layer.op != "Conv" or int(layer.attrs.get("group", 1)) <= 1 or len(layer.inputs) < 2:
        return False
    weight = layer.inputs[1]
    if weight.inputs and weight.inputs[0].op == "DequantizeLinear":
        weight = weight.inputs[0].inputs[0]  # the weight codes
    return weight.shape is not None and len(weight.shape) > 1 and weight.shape[1] == 1


def static_weight_name(layer: gs.Node) -> str:
    """The name of the weight-codes initializer under a static layer's DequantizeLinear."""
    source = layer.inputs[1]
    return source.inputs[0].inputs[0].name if source.inputs and source.inputs[0].op == "DequantizeLinear" else source.name


def float_source(tensor: gs.Tensor) -> gs.Tensor:
    """The float tensor under the activation QuantizeLinear → DequantizeLinear (and the < 8-bit
    Clip) that :func:`..common.emit.quantize_activation` inserted; ``tensor`` itself otherwise."""
    dq = tensor.inputs[0] if tensor.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or not dq.inputs[0].inputs or dq.inputs[0].inputs[0].op != "QuantizeLinear":
        return tensor
    source = dq.inputs[0].inputs[0].inputs[0]
    clip = source.inputs[0] if source.inputs else None
    ours = clip is not None and clip.op == "Clip" and clip.name.startswith(f"{clip.inputs[0].name}_clip")  # the < 8-bit Clip
    return clip.inputs[0] if ours else source


def dequantized_input(layer: gs.Node, index: int) -> np.ndarray | None:
    """Input ``index`` as float values: a constant, or the DequantizeLinear of constants."""
    values = constant_values(layer, index)
    if values is not None or optional_input(layer, index) is None:
        return values
    source = layer.inputs[index]
    dq = source.inputs[0] if source.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or not all(isinstance(t, gs.Constant) for t in dq.inputs):
        return None
    codes, scales, zeros = (np.asarray(t.values) for t in dq.inputs[:3])
    axis = int(dq.attrs.get("axis", 1))
    shape = [1] * codes.ndim
    if np.ndim(scales) == 1:
        shape[axis if codes.ndim > 1 else 0] = -1
    along = [] if np.ndim(scales) == 0 else shape
    return ((codes.astype(np.float64) - zeros.reshape(along)) * scales.reshape(along)).astype(np.float32)


def unquantize(graph: gs.Graph, layer: gs.Node, names: NameFactory, weight: np.ndarray | None, bias: np.ndarray | None = None) -> None:
    """Put a static QDQ layer back in float: float input, its float ``weight`` (else the
    dequantized one) and its float ``bias`` before bias correction (else the dequantized one).
    The input stays the DequantizeLinear output when the quantizer is a quantized layer's
    output quantizer: without it that layer would lose its QLinearConv/QGemm fusion too."""
    if not _from_layer(float_source(layer.inputs[0])):
        layer.inputs[0] = float_source(layer.inputs[0])
    if weight is not None:
        layer.inputs[1] = gs.Constant(names.new(f"{node_label(layer)}_float_weight"), weight.astype(np.float32))
    if bias is not None and optional_input(layer, 2) is not None:
        layer.inputs[2] = gs.Constant(names.new(f"{node_label(layer)}_float_bias"), bias.astype(np.float32))
    for index in (1, 2):
        if index < len(layer.inputs) and optional_input(layer, index) is not None and not isinstance(layer.inputs[index], gs.Constant):
            values = dequantized_input(layer, index)
            if values is not None:
                layer.inputs[index] = gs.Constant(names.new(f"{node_label(layer)}_float_{index}"), values)
