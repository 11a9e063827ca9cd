"""Emission of standard ONNX QDQ nodes in the form ONNX Runtime fuses into integer kernels.

For a quantized layer (Conv/ConvTranspose/Gemm/MatMul)::

    X ── QuantizeLinear(S_x, 0) ── DequantizeLinear ──┐
    W_int8 ── DequantizeLinear(s_w per channel) ──────┼── Conv ── Y
    b_int32 ── DequantizeLinear(S_x·s_w) ─────────────┘

Activation QDQ is per tensor (uint8 with zero point 0 after a ReLU, symmetric uint8 with
zero point 128 elsewhere) and shared: once a tensor is quantized every reader reads the DequantizeLinear output, so
ORT also fuses the Add/pooling between layers.  Activations below 8 bits get an explicit
Clip to the b-bit range before the 8-bit QuantizeLinear (ORT runs that Clip in float).

Weights of at most 4 bits can be stored as INT4 (``int4=True``, opset ≥ 21: DequantizeLinear
accepts INT4 from opset 21): the codes are the same, the file holds half a byte per weight.
ONNX Runtime's CPU provider runs such a DequantizeLinear in float and does not fuse it into
QLinearConv/MatMulIntegerToFloat, so the model is smaller but not faster.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import ml_dtypes
from onnx import TensorProto, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt.graph import NameFactory, all_graphs, constant_values

from .layers import weight_axis
from .numerics import ActivationQuant, bias_codes, checked_scales, dequantize_weight, quantize_weight


def quantize_activation(graph: gs.Graph, tensor: gs.Tensor, quant: ActivationQuant, names: NameFactory) -> gs.Variable:
    """Insert Q→DQ on ``tensor`` into ``graph`` (the main graph or an If/Loop/Scan body);
    every former reader in ``graph`` and in the bodies nested in it reads the DequantizeLinear
    output (so the producer's output only feeds the QuantizeLinear, as ORT's fusion needs).
    Readers in sibling graphs keep ``tensor``: a body quantizes an outer-scope tensor with
    its own Q→DQ, beside the layer ORT fuses (ORT fuses within one graph)."""
    base = tensor.name
    scale = gs.Constant(names.new(f"{base}_scale"), checked_scales(quant.scale, f"activation {base}"))
    zero = gs.Constant(names.new(f"{base}_zero_point"), np.array(quant.zero_point, dtype=quant.dtype))
    source: gs.Tensor = tensor
    here = {id(node) for scope in all_graphs(graph) for node in scope.nodes}
    readers = [reader for reader in tensor.outputs if id(reader) in here]
    nodes = []
    if quant.restricted:
        low = -quant.max_code * quant.scale if quant.signed else 0.0
        bounds = [gs.Constant(names.new(f"{base}_clip_{k}"), np.array(v, np.float32)) for k, v in (("min", low), ("max", quant.max_code * quant.scale))]
        clipped = gs.Variable(names.new(f"{base}_clipped"), dtype=np.float32, shape=tensor.shape)
        nodes.append(gs.Node("Clip", names.new(f"{base}_clip"), inputs=[tensor, *bounds], outputs=[clipped]))
        source = clipped
    codes = gs.Variable(names.new(f"{base}_quantized"), dtype=quant.dtype, shape=tensor.shape)
    result = gs.Variable(names.new(f"{base}_dequantized"), dtype=np.float32, shape=tensor.shape)
    nodes.append(gs.Node("QuantizeLinear", names.new(f"{base}_QuantizeLinear"), inputs=[source, scale, zero], outputs=[codes]))
    nodes.append(gs.Node("DequantizeLinear", names.new(f"{base}_DequantizeLinear"), inputs=[codes, scale, zero], outputs=[result]))
    for reader in readers:
        for index, value in enumerate(reader.inputs):
            if value is tensor:
                reader.inputs[index] = result
    graph.nodes.extend(nodes)  # a graph output keeps its float value: only readers change
    return result


def quantize_layer_weight(
    graph: gs.Graph, node: gs.Node, bits: int, per_channel: bool, names: NameFactory, int4: bool = False
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Replace the layer's float weight by DequantizeLinear(int8 codes, or INT4 ones when
    ``int4`` and ``bits`` ≤ 4); return the dequantized weight, the scales and the axis they
    run along (None: per tensor)."""
    weight = constant_values(node, 1).astype(np.float32)
    axis = weight_axis(node) if per_channel else None
    codes, scales = quantize_weight(weight, bits, axis)
    label = node.name or node.outputs[0].name
    zeros = np.zeros(scales.shape, np.int8)
    stored_codes, stored_zeros = (_int4(codes), _int4(zeros)) if int4 and bits <= 4 else (codes, zeros)
    node.inputs[1] = dequantized_constant(graph, f"{label}_weight", stored_codes, scales, stored_zeros, axis, names)
    return dequantize_weight(codes, scales, axis), scales, axis


def quantize_layer_bias(graph: gs.Graph, node: gs.Node, input_scale: np.float32, weight_scales: np.ndarray, names: NameFactory) -> bool:
    """Replace a 1-D float bias by DequantizeLinear(int32 codes, S_x·s_w); False if it has none
    (or one ORT's QDQ form cannot express, e.g. a 2-D Gemm C)."""
    bias = constant_values(node, 2) if node.op != "MatMul" else None
    if bias is None or bias.ndim != 1:
        return False
    codes, scales = bias_codes(bias, input_scale, np.broadcast_to(weight_scales, bias.shape))
    label = node.name or node.outputs[0].name
    node.inputs[2] = dequantized_constant(graph, f"{label}_bias", codes, scales, np.zeros(scales.shape, np.int32), 0, names)
    return True


def _int4(codes: np.ndarray) -> TensorProto:
    """An INT4 tensor (two codes per byte) holding ``codes`` (all in [−8, 7])."""
    return numpy_helper.from_array(codes.astype(ml_dtypes.int4), "int4")


def _constant(name: str, values: np.ndarray | TensorProto) -> gs.Constant:
    return gs.Constant(name, LazyValues(values) if isinstance(values, TensorProto) else values)


def dequantized_constant(
    graph: gs.Graph, base: str, codes: np.ndarray | TensorProto, scales: np.ndarray, zeros: np.ndarray | TensorProto, axis: int | None, names: NameFactory
) -> gs.Variable:
    """``DequantizeLinear(codes, scales, zeros, axis)`` of constants, appended to ``graph``."""
    inputs = [
        _constant(names.new(f"{base}_quantized"), codes),
        gs.Constant(names.new(f"{base}_scale"), checked_scales(scales, base)),
        _constant(names.new(f"{base}_zero_point"), zeros),
    ]
    result = gs.Variable(names.new(f"{base}_dequantized"), dtype=np.float32, shape=list(inputs[0].shape))
    attrs = {"axis": axis} if axis is not None and np.ndim(scales) > 0 else {}
    graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{base}_DequantizeLinear"), attrs=attrs, inputs=inputs, outputs=[result]))
    return result

