"""Dynamic quantization of linear layers whose input has no range (ONNX Runtime's integer form).

A MatMul ``x[…, K] × W[K, N]`` (or a Gemm ``x[M, K] × W``) whose input has neither statistics
nor calibration data cannot get a static activation scale.  It is quantized *dynamically*:
the activation scale is computed at run time from the tensor's own min/max::

    x ── DynamicQuantizeLinear ──┬─ x_q ────── MatMulInteger(x_q, W_int8, x_zp, 0) ── Cast(float) ── Mul ── [Add bias] ── y
                                 ├─ x_scale ── Mul(x_scale, s_w) ──────────────────────────────────┘
                                 └─ x_zp ─────┘

This is the form ``onnxruntime.quantization.quantize_dynamic`` emits for MatMul, with the
weight symmetric per output column (``s_w`` of shape [N], zero point 0) instead of per tensor.
ONNX Runtime fuses MatMulInteger → Cast → Mul (→ Add of a constant [N] bias in its second
input) into MatMulIntegerToFloat, and DynamicQuantizeLinear → MatMulIntegerToFloat into
DynamicQuantizeMatMul when the DynamicQuantizeLinear has a single reader; one
DynamicQuantizeLinear is shared by every dynamic layer reading the same tensor.  All ops are
standard ONNX (opset ≥ 11); only the fused kernels are ORT's.

A Gemm's bias becomes the constant second input of an Add after the Mul; a MatMul whose
output is read only by an Add of a constant [N] bias (a PyTorch Linear) gets that bias moved to
the Add's second input, where ORT's fusion looks for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxopt.graph import NameFactory, constant_values, node_label

from ..common.layers import transposed_weight
from ..common.numerics import quantize_weight
from ..common.ops import MATRIX_OPS



@dataclass
class DynamicInput:
    """The three outputs of the DynamicQuantizeLinear shared by the readers of one tensor."""

    codes: gs.Variable
    scale: gs.Variable
    zero_point: gs.Variable


def can_be_dynamic(layer: gs.Node) -> bool:
    """A MatMul/Gemm with a constant float weight matrix (``layer_refusal`` already passed)."""
    weight = constant_values(layer, 1)
    return layer.op in MATRIX_OPS and weight is not None and weight.ndim == 2


def matrix_weight(layer: gs.Node) -> np.ndarray:
    """The [K, N] weight of a MatMul or Gemm (Gemm's B transposed when ``transB``)."""
    weight = constant_values(layer, 1).astype(np.float32)
    return weight.T if transposed_weight(layer) else weight


def dynamic_input(graph: gs.Graph, tensor: gs.Tensor, cache: dict[str, DynamicInput], names: NameFactory) -> DynamicInput:
    """The DynamicQuantizeLinear of ``tensor`` (created once, shared by all dynamic readers)."""
    if tensor.name in cache:
        return cache[tensor.name]
    base = tensor.name
    quantized = DynamicInput(
        gs.Variable(names.new(f"{base}_dynamic_quantized"), dtype=np.uint8, shape=tensor.shape),
        gs.Variable(names.new(f"{base}_dynamic_scale"), dtype=np.float32, shape=[]),
        gs.Variable(names.new(f"{base}_dynamic_zero_point"), dtype=np.uint8, shape=[]),
    )
    graph.nodes.append(
        gs.Node("DynamicQuantizeLinear", names.new(f"{base}_DynamicQuantizeLinear"), inputs=[tensor],
                outputs=[quantized.codes, quantized.scale, quantized.zero_point])
    )
    cache[tensor.name] = quantized
    return quantized


def quantize_dynamic_layer(
    graph: gs.Graph, layer: gs.Node, bits: int, per_channel: bool, cache: dict[str, DynamicInput], names: NameFactory
) -> str:
    """Replace ``layer`` by the dynamic integer form above; the name of its weight-codes
    initializer (how :mod:`.fusion` finds the layer in ORT's graph)."""
    codes, scales = quantize_weight(matrix_weight(layer), bits, 1 if per_channel else None)
    bias = constant_values(layer, 2) if layer.op == "Gemm" else None
    return emit_dynamic(graph, layer, codes, scales, cache, names, bias=bias)


def emit_dynamic(
    graph: gs.Graph,
    layer: gs.Node,
    codes: np.ndarray,
    scales: np.ndarray,
    cache: dict[str, DynamicInput],
    names: NameFactory,
    bias: np.ndarray | None = None,
) -> str:
    """Emit MatMulInteger → Cast → Mul (→ Add ``bias``, a Gemm's C) for ``layer`` with int8
    ``codes`` [K, N] and weight ``scales`` ([N] or scalar); ``layer`` is disconnected (cleanup
    removes it)."""
    label = node_label(layer)
    x = dynamic_input(graph, layer.inputs[0], cache, names)
    out = layer.outputs[0]
    weight = gs.Constant(names.new(f"{label}_weight_quantized"), np.ascontiguousarray(codes.astype(np.int8)))
    weight_zero = gs.Constant(names.new(f"{label}_weight_zero_point"), np.array(0, np.int8))
    weight_scale = gs.Constant(names.new(f"{label}_weight_scale"), np.asarray(scales, np.float32))
    integer = gs.Variable(names.new(f"{label}_integer"), dtype=np.int32, shape=out.shape)
    as_float = gs.Variable(names.new(f"{label}_integer_float"), dtype=np.float32, shape=out.shape)
    scale = gs.Variable(names.new(f"{label}_output_scale"), dtype=np.float32, shape=list(np.shape(scales)))
    layer.outputs = []
    scaled = out if bias is None else gs.Variable(names.new(f"{label}_scaled"), dtype=np.float32, shape=out.shape)
    nodes = [
        gs.Node("MatMulInteger", names.new(f"{label}_MatMulInteger"), inputs=[x.codes, weight, x.zero_point, weight_zero], outputs=[integer]),
        gs.Node("Cast", names.new(f"{label}_Cast"), attrs={"to": TensorProto.FLOAT}, inputs=[integer], outputs=[as_float]),
        gs.Node("Mul", names.new(f"{label}_scales_Mul"), inputs=[x.scale, weight_scale], outputs=[scale]),
        gs.Node("Mul", names.new(f"{label}_output_Mul"), inputs=[as_float, scale], outputs=[scaled]),
    ]
    if bias is not None:
        bias_constant = gs.Constant(names.new(f"{label}_bias"), np.broadcast_to(bias.astype(np.float32), (codes.shape[1],)).copy())
        nodes.append(gs.Node("Add", names.new(f"{label}_bias_Add"), inputs=[scaled, bias_constant], outputs=[out]))
    else:
        bias_second(out)
    graph.nodes.extend(nodes)
    return weight.name


def bias_second(out: gs.Tensor) -> bool:
    """When ``out`` is read only by an Add of a constant [N] bias given first, swap the Add's
    inputs (ORT's MatMulIntegerToFloat fusion takes the bias from the second input)."""
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return False
    add = out.outputs[0]
    if len(add.inputs) == 2 and add.inputs[1] is out and isinstance(add.inputs[0], gs.Constant):
        add.inputs[0], add.inputs[1] = add.inputs[1], add.inputs[0]
        return True
    return False


def dequantized_weight_codes(layer: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 codes [K, N], scales) of a static QDQ MatMul/Gemm's ``DequantizeLinear`` weight,
    None when the weight is not such a DequantizeLinear of int8 constants."""
    source = layer.inputs[1]
    dq = source.inputs[0] if source.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or not all(isinstance(t, gs.Constant) for t in dq.inputs):
        return None
    codes, scales = np.asarray(dq.inputs[0].values), np.asarray(dq.inputs[1].values, np.float32)
    if codes.dtype != np.int8 or codes.ndim != 2 or np.any(np.asarray(dq.inputs[2].values) != 0):
        return None
    if transposed_weight(layer):
        codes = codes.T
    if scales.ndim == 1 and scales.size != codes.shape[1]:
        return None
    return codes, scales


__all__ = ["DynamicInput", "bias_second", "can_be_dynamic", "dequantized_weight_codes", "dynamic_input", "emit_dynamic", "quantize_dynamic_layer"]
