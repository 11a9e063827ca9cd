"""Expressive nodes: layers whose parameters can absorb a per-channel affine map.

A *root* produces a mapped tensor and absorbs the map on its output channels
(``new output = s·old + t``).  A *leaf* reads a mapped tensor and absorbs the inverse on its
input channels (it now reads ``s·x + t`` and must compute what it computed from ``x``).
Exact update rules (docs/bn-folding.md, [derived]), with c an output (root) or input (leaf)
channel:

=================  =========================================  ================================================
node               root: output ← s·output + t                leaf: input x ← s·x + t
=================  =========================================  ================================================
Conv (groups g)    W[c] *= s_c;  b ← s·b + t                  W[:, c] /= s_c (within c's group);
                                                              b_o −= Σ_{c,k} W'[o, c, k]·t_c  (t = 0 if padded)
ConvTranspose      W[:, c] *= s_c (within c's group);         W[c] /= s_c;  requires t = 0 (the number of
                   b ← s·b + t                                kernel taps reaching an output varies)
Gemm               column n of B' *= s_n;                     row k of B' /= s_k;
                   C ← s·C + t/β (C created if absent)        C ← C − (α/β)·t·B''
MatMul (const B)   B[:, n] *= s_n;  + t by a new Add          B[k, :] /= s_k;  − t·B'' by a new Add
BatchNorm          γ ← s·γ;  β ← s·β + t                      γ ← γ/s;  μ ← s·μ + t   (var, ε kept)
=================  =========================================  ================================================

All arithmetic is done in float64 and cast back to the parameter's dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import (
    NameFactory,
    constant_values,
    has_padding,
    is_default_domain,
    optional_input,
    per_channel,
    set_constant_input,
    substitute,
)

from .layers import transposed_weight
from .ops import EXPRESSIVE_OPS


def expressive_refusal(node: gs.Node) -> str | None:
    """None if ``node`` can absorb a map, else why not."""
    if node.op not in EXPRESSIVE_OPS or not is_default_domain(node):
        return f"{node.op} is not a layer that can absorb the map"
    label = f"{node.op} {node.name or node.outputs[0].name}"
    if node.op == "BatchNormalization":
        if node.attrs.get("training_mode", 0) or len([t for t in node.outputs if not t.is_empty()]) > 1:
            return f"{label} is in training mode"
        if any(constant_values(node, i) is None for i in range(1, 5)):
            return f"{label} parameters are not initializers"
        return None
    weight = constant_values(node, 1)
    if weight is None:
        return f"{label} weight is not an initializer"
    if not np.issubdtype(weight.dtype, np.floating):
        return f"{label} weight is not floating point"
    if node.op == "MatMul" and weight.ndim != 2:
        return f"{label} weight is not a matrix"
    if node.op in ("Conv", "ConvTranspose", "Gemm") and optional_input(node, 2) is not None and constant_values(node, 2) is None:
        return f"{label} bias is not an initializer"
    return None


def leaf_shift_refusal(node: gs.Node) -> str | None:
    """Why ``node`` cannot absorb a non-zero input shift, or None."""
    if node.op == "ConvTranspose":
        return "a ConvTranspose cannot absorb an input shift exactly"
    if node.op == "Conv" and has_padding(node):
        return "zero padding: the shift is not exact at the borders"
    return None


# --------------------------------------------------------------------------- roots
def absorb_output(graph: gs.Graph, node: gs.Node, scale: np.ndarray, shift: np.ndarray, names: NameFactory) -> None:
    """Make ``node`` output ``scale·y + shift`` (per output channel) instead of ``y``."""
    if node.op == "BatchNormalization":
        gamma, beta = constant_values(node, 1), constant_values(node, 2)
        set_constant_input(graph, node, 1, _cast(scale * gamma, gamma), names)
        set_constant_input(graph, node, 2, _cast(scale * beta + shift, beta), names)
        return
    weight = constant_values(node, 1).astype(np.float64)
    dtype = constant_values(node, 1).dtype
    if node.op == "Conv":
        set_constant_input(graph, node, 1, (weight * per_channel(scale, 0, weight.ndim)).astype(dtype), names)
        _set_bias(graph, node, scale * _bias(node, len(scale)) + shift, dtype, names)
    elif node.op == "ConvTranspose":
        set_constant_input(graph, node, 1, (weight * _convtranspose_output_factor(node, weight, scale)).astype(dtype), names)
        _set_bias(graph, node, scale * _bias(node, len(scale)) + shift, dtype, names)
    elif node.op == "Gemm":
        trans_b = transposed_weight(node)
        factor = scale[:, None] if trans_b else scale[None, :]
        set_constant_input(graph, node, 1, (weight * factor).astype(dtype), names)
        beta = float(node.attrs.get("beta", 1.0))
        c = constant_values(node, 2)
        if c is None or beta == 0.0:
            node.attrs["beta"] = 1.0
            _set_bias(graph, node, shift, dtype, names)
        else:
            set_constant_input(graph, node, 2, (scale * c.astype(np.float64) + shift / beta).astype(c.dtype), names)
    elif node.op == "MatMul":
        set_constant_input(graph, node, 1, (weight * scale[None, :]).astype(dtype), names)
        if np.any(shift):
            _add_after(graph, node, shift.astype(dtype), names)
    else:  # pragma: no cover - guarded by expressive_refusal
        raise AssertionError(node.op)


def _convtranspose_output_factor(node: gs.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Factor for a ConvTranspose weight [C_in, C_out/g, k…] scaling output channel o = g·(C_out/g) + j."""
    groups = int(node.attrs.get("group", 1))
    c_in, per_group = weight.shape[0], weight.shape[1]
    factor = np.repeat(scale.reshape(groups, 1, per_group), c_in // groups, axis=1).reshape(c_in, per_group)
    return factor.reshape(c_in, per_group, *([1] * (weight.ndim - 2)))


# --------------------------------------------------------------------------- leaves
def absorb_input(graph: gs.Graph, node: gs.Node, scale: np.ndarray, shift: np.ndarray, names: NameFactory) -> None:
    """Make ``node`` compute from ``scale·x + shift`` what it computed from ``x``."""
    if node.op == "BatchNormalization":
        gamma, mean = constant_values(node, 1), constant_values(node, 3)
        set_constant_input(graph, node, 1, _cast(gamma / scale, gamma), names)
        set_constant_input(graph, node, 3, _cast(scale * mean + shift, mean), names)
        return
    weight = constant_values(node, 1).astype(np.float64)
    dtype = constant_values(node, 1).dtype
    inverse = 1.0 / scale
    if node.op == "Conv":
        groups = int(node.attrs.get("group", 1))
        c_out, per_group = weight.shape[0], weight.shape[1]
        grouped = weight.reshape(groups, c_out // groups, per_group, -1)
        grouped = grouped * inverse.reshape(groups, 1, per_group, 1)
        new_weight = grouped.reshape(weight.shape)
        set_constant_input(graph, node, 1, new_weight.astype(dtype), names)
        if np.any(shift):
            correction = np.einsum("gojk,gj->go", grouped, shift.reshape(groups, per_group)).reshape(c_out)
            _set_bias(graph, node, _bias(node, c_out) - correction, dtype, names)
    elif node.op == "ConvTranspose":
        set_constant_input(graph, node, 1, (weight * per_channel(inverse, 0, weight.ndim)).astype(dtype), names)
    elif node.op == "Gemm":
        trans_b = transposed_weight(node)
        new_weight = weight * (inverse[None, :] if trans_b else inverse[:, None])
        set_constant_input(graph, node, 1, new_weight.astype(dtype), names)
        if np.any(shift):
            alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
            k_by_n = new_weight.T if trans_b else new_weight
            correction = alpha * (shift @ k_by_n)
            c = constant_values(node, 2)
            if c is None or beta == 0.0:
                node.attrs["beta"] = 1.0
                _set_bias(graph, node, -correction, dtype, names)
            else:
                set_constant_input(graph, node, 2, (c.astype(np.float64) - correction / beta).astype(c.dtype), names)
    elif node.op == "MatMul":
        new_weight = weight * inverse[:, None]
        set_constant_input(graph, node, 1, new_weight.astype(dtype), names)
        if np.any(shift):
            _add_after(graph, node, (-(shift @ new_weight)).astype(dtype), names)
    else:  # pragma: no cover - guarded by expressive_refusal
        raise AssertionError(node.op)


# --------------------------------------------------------------------------- helpers
def _cast(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(like.dtype)


def _bias(node: gs.Node, channels: int) -> np.ndarray:
    bias = constant_values(node, 2)
    return np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(channels)


def _set_bias(graph: gs.Graph, node: gs.Node, values: np.ndarray, dtype: np.dtype, names: NameFactory) -> None:
    label = node.name or node.outputs[0].name
    set_constant_input(graph, node, 2, np.asarray(values).astype(dtype), names, base_name=f"{label}_bias")


def _add_after(graph: gs.Graph, node: gs.Node, bias: np.ndarray, names: NameFactory) -> None:
    """Insert ``output = node(...) + bias`` after a bias-less MatMul, keeping the output tensor."""
    output = node.outputs[0]
    label = node.name or output.name
    product = gs.Variable(names.new(f"{label}_product"), dtype=output.dtype, shape=output.shape)
    substitute(node.outputs, output, product)
    bias_const = gs.Constant(names.new(f"{label}_bias"), np.ascontiguousarray(bias))
    graph.nodes.append(gs.Node("Add", names.new(f"{label}_bias_add"), inputs=[product, bias_const], outputs=[output]))
