"""Layer geometry: where a layer's weight, input and output keep their channels.

Shared by every pass that touches a layer's weight per channel (BN folding, equalization,
quantization, REx, channel permutation, modular accumulation).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import constant_values


def transposed_weight(node: gs.Node) -> bool:
    """True for a Gemm with ``transB``: its weight B is stored [N, K] instead of [K, N]."""
    return node.op == "Gemm" and bool(node.attrs.get("transB", 0))


def output_channel_axis(node: gs.Node) -> int:
    """Axis of the layer's output that holds its output channels."""
    if node.op == "MatMul":
        return len(node.outputs[0].shape) - 1 if node.outputs[0].shape is not None else -1
    return 1


def input_channel_axis(node: gs.Node) -> int:
    """Axis of the layer's data input that holds its input channels."""
    if node.op == "Gemm":
        return 0 if node.attrs.get("transA", 0) else 1
    if node.op == "MatMul":
        return len(node.inputs[0].shape) - 1 if node.inputs[0].shape is not None else -1
    return 1


def weight_axis(node: gs.Node) -> int | None:
    """Axis of the weight holding output channels (None: per-tensor only)."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1 if int(node.attrs.get("group", 1)) == 1 else None
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1  # MatMul: B is [K, N]


def weight_rows(layer: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """The layer's weight as rows = output channels, plus the input channel of every entry
    (None when the weight is not a constant, or for a grouped ConvTranspose)."""
    weight = constant_values(layer, 1)
    if weight is None:
        return None
    weight = weight.astype(np.float64)
    if layer.op == "Conv":
        groups = int(layer.attrs.get("group", 1))
        out, per_group = weight.shape[0], weight.shape[1]
        rows = weight.reshape(out, -1)
        kernel = rows.shape[1] // per_group
        group_of_row = np.arange(out) // (out // groups)
        channel = group_of_row[:, None] * per_group + np.repeat(np.arange(per_group), kernel)[None, :]
        return rows, channel
    if layer.op == "ConvTranspose":
        if int(layer.attrs.get("group", 1)) != 1:
            return None  # its weight is quantized per tensor (emit.weight_axis)
        c_in, out = weight.shape[0], weight.shape[1]
        rows = np.moveaxis(weight, 1, 0).reshape(out, -1)  # [C_out, C_in·k]
        kernel = rows.shape[1] // c_in
        return rows, np.broadcast_to(np.repeat(np.arange(c_in), kernel), rows.shape)
    if layer.op in ("Gemm", "MatMul"):
        rows = weight if transposed_weight(layer) else weight.T
        return rows, np.broadcast_to(np.arange(rows.shape[1]), rows.shape)
    return None
