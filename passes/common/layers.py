"""Layer geometry: where a layer's weight, input and output keep their channels.

Shared by every pass that touches a layer's weight per channel (BN folding, equalization,
quantization, REx, channel permutation, modular accumulation).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


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
