"""Which MatMul/Gemm layers the weight-only pass rewrites: a :class:`Layer` per rewritable
node (its weight read as W[K, N], loaded only when quantized), the reason a node is refused
(checked on types and shapes, nothing loaded), and the data-free input statistics
(E[x²] per input feature) a LayerNormalization / RMSNormalization in front of the layer gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.external import read_values
from onnxopt.graph import constant_values, node_label, optional_input

from ..common.layers import transposed_weight


@dataclass
class Layer:
    """A layer to rewrite: its node, its weight constant (read as W[K, N] = alpha·B or
    alpha·Bᵀ, loaded only when quantized) and the bias of a Gemm."""

    node: gs.Node
    tensor: gs.Constant
    k: int
    n: int
    trans_b: int = 0
    alpha: float = 1.0
    bias: np.ndarray | None = None
    #: E[x_k²] per input row, from the normalization producing x or measured on calibration
    #: data (None: unweighted search).
    row_weight: np.ndarray | None = None
    #: What the row weights come from: the norm's node, or the measured input tensor.
    norm: str | None = None
    #: "layernorm", "calibration" or None.
    row_source: str | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        return (id(self.tensor), self.trans_b, self.alpha)

    def matrix(self) -> np.ndarray:
        values = np.asarray(read_values(self.tensor))  # a lazy weight is not kept by its constant
        matrix = values.T if self.trans_b else values
        return np.ascontiguousarray(matrix * np.float32(self.alpha) if self.alpha != 1.0 else matrix)


def plan_matmul(node: gs.Node) -> Layer | str:
    """The Layer of ``x × W``, or why it cannot be rewritten (nothing loaded)."""
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant):
        return "constant left operand (W × x)" if isinstance(node.inputs[0], gs.Constant) else "weight is not a constant (activation × activation)"
    reason = weight_refusal(weight) or input_refusal(node.inputs[0])
    if reason:
        return reason
    k, n = (int(d) for d in weight.shape)
    return Layer(node, weight, k, n)


def plan_gemm(node: gs.Node) -> Layer | str:
    """The Layer of ``alpha·A × B' + beta·C``, or why it cannot be rewritten."""
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant):
        return "weight is not a constant (Gemm of two activations)"
    reason = weight_refusal(weight)
    if reason:
        return reason
    if node.attrs.get("transA", 0):
        return "Gemm with transA=1: MatMulNBits multiplies A as given (transpose A before the Gemm)"
    trans_b = int(transposed_weight(node))
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    k, n = (int(d) for d in (weight.shape[::-1] if trans_b else weight.shape))
    bias = None
    if optional_input(node, 2) is not None:
        c = constant_values(node, 2)
        if c is None:
            return "Gemm bias C is not a constant"
        if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
            return f"Gemm bias C of shape {list(c.shape)}: MatMulNBits takes a bias of [N] = [{n}]"
        bias = np.ascontiguousarray(np.broadcast_to(c.reshape(-1), (n,)) * np.float32(beta), dtype=np.float32)
    return Layer(node, weight, k, n, trans_b, alpha, bias)


NORM_OPS = {("", "LayerNormalization"), ("", "RMSNormalization"), ("com.microsoft", "SimplifiedLayerNormalization")}


def norm_statistics(tensor: gs.Tensor, depth: int) -> tuple[str, np.ndarray] | None:
    """(norm name, E[x_k²] ≈ γ_k² + β_k²) when ``tensor`` is the output of a last-axis
    LayerNormalization / RMSNormalization with constant γ (and β) of ``depth`` features: the
    normalized values have unit mean square per token, so γ and β set each feature's power
    (the data-free statistics the quantize pass also reads).  None otherwise."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is None or (node.domain or "", node.op) not in NORM_OPS or node.outputs[0] is not tensor:
        return None
    if int(node.attrs.get("axis", -1)) != -1 and not (tensor.shape and int(node.attrs["axis"]) == len(tensor.shape) - 1):
        return None
    gamma, beta = constant_values(node, 1), constant_values(node, 2)
    if gamma is None or gamma.size != depth or (beta is not None and beta.size != depth):
        return None
    power = np.square(gamma.reshape(-1).astype(np.float64))
    if beta is not None:
        power = power + np.square(beta.reshape(-1).astype(np.float64))
    return node_label(node), power.astype(np.float32)


def weight_refusal(weight: gs.Constant) -> str | None:
    """Checked on the constant's type and shape, without loading its values."""
    if np.dtype(weight.dtype) != np.float32:
        return f"weight is not float32 ({np.dtype(weight.dtype)}): MatMulNBits is emitted for float32 models"
    if len(weight.shape) != 2:
        return f"weight of rank {len(weight.shape)}: MatMulNBits takes a 2-D W[K, N]"
    return None


def input_refusal(tensor: gs.Tensor) -> str | None:
    shape = tensor.shape
    if shape is None or len(shape) < 2:
        return f"input rank {'unknown' if shape is None else len(shape)}: MatMulNBits reads x of rank >= 2 (run shape inference or give the input's shape)"
    return None


__all__ = ["NORM_OPS", "Layer", "input_refusal", "norm_statistics", "plan_gemm", "plan_matmul", "weight_refusal"]
