"""A layer REx expands, as it sits in the graph, and the input statistics REx and the fold
both use (the bias correction R·E[X] of eq. 3.8, the E[x²] weighting of the residual error);
:func:`layer_sites` finds the layers (quantized ones, or float ones in weight-only mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import constant_values, is_default_domain, node_label, optional_input, producer
from onnxopt.pass_base import PassContext

from ..common.layers import weight_axis
from ..common.ops import FOLLOWING_ACTIVATIONS, WITHOUT_TRANSPOSE_OPS
from ..common.quantization import QuantizedLayers


@dataclass
class LayerSite:
    """Where a layer sits in the graph: its input quantizer and output quantizer, if any."""

    node: gs.Node
    weight: np.ndarray
    bits: int
    axis: int | None
    out_axis: int
    groups: int
    mean: np.ndarray | None
    moment: np.ndarray | None  #: E[x²] per input channel (data-free, from the quantize pass)
    input_dq: gs.Node | None  #: DequantizeLinear producing the layer's input (per tensor)
    output_range: tuple[float, float] | None  #: range of the quantizer after the layer's activation
    rank: int
    combine: str = "gather"  #: how this layer's branches are added (rex_combine; "permute" → "pad" on a prefix, or "gather")
    #: rex_combine="fold": the divisors m (order-2 step s1/m) its channels may take, coarsest first (None: branches)
    fold: tuple[int, ...] | None = None


def scalar_value(tensor: gs.Tensor) -> np.float32 | None:
    """The float32 value of a one-element constant (e.g. a per-tensor scale), else None."""
    if isinstance(tensor, gs.Constant) and np.size(tensor.values) == 1:
        return np.float32(np.asarray(tensor.values).reshape(()))
    return None


def _per_input_channel(site: LayerSite, vector: np.ndarray, channels: np.ndarray) -> np.ndarray | None:
    """``vector`` (one value per input channel of a possibly grouped Conv) at the input each
    weight column of the output ``channels`` reads: [len(channels), C_in/groups]; None when
    its length is not the Conv's input channel count."""
    c, per_group_in = site.weight.shape[0], site.weight.shape[1]
    if len(vector) != site.groups * per_group_in:
        return None
    return vector[(channels // (c // site.groups))[:, None] * per_group_in + np.arange(per_group_in)]


def mean_shift(site: LayerSite, sub: np.ndarray, channels: np.ndarray) -> np.ndarray | None:
    """R·E[X] for the output channels of the sub-weight ``sub`` (bias correction of eq. 3.8)."""
    mean = site.mean
    if site.node.op == "Conv":
        read = _per_input_channel(site, mean, channels)
        return None if read is None else (sub.reshape(*read.shape, -1).sum(-1) * read).sum(1)
    k_by_n = sub.T if site.out_axis == 0 else sub
    return mean @ k_by_n if len(mean) == k_by_n.shape[0] else None


def input_moment_weights(site: LayerSite) -> np.ndarray | None:
    """E[x_i²] of the input each weight multiplies, broadcastable to the weight (None when unknown)."""
    moment, w = site.moment, site.weight
    if moment is None:
        return None
    moment = np.asarray(moment, np.float64)
    if site.node.op == "Conv":
        read = _per_input_channel(site, moment, np.arange(w.shape[0]))
        return None if read is None else read.reshape(*read.shape, *([1] * (w.ndim - 2)))
    in_axis = 1 - site.out_axis
    if len(moment) != w.shape[in_axis]:
        return None
    return moment[None, :] if in_axis == 1 else moment[:, None]


def layer_sites(graph: gs.Graph, ctx: PassContext, bits_only: int | None, combine: str) -> list[LayerSite]:
    """The layers REx expands: those the quantize pass quantized (``bits_only`` None), or every
    Conv/Gemm/MatMul with a constant float weight (rex_weight_only = ``bits_only``); refused
    layers are reported on ``ctx``.  ``combine`` is the run's rex_combine."""
    quantized = ctx.artifact(QuantizedLayers)
    records = quantized.layers if quantized is not None and bits_only is None else {}
    sites = []
    for node in list(graph.nodes):
        if node.op not in WITHOUT_TRANSPOSE_OPS or not node.outputs or not is_default_domain(node):
            continue
        key = node.outputs[0].name
        if bits_only is None:
            if key not in records:
                continue
            record = records[key]
            weight, bits, per_channel, mean, moment = record.float_weight, record.bits, record.per_channel, record.input_mean, record.input_moment
        else:
            weight = constant_values(node, 1)
            if weight is None or not np.issubdtype(weight.dtype, np.floating) or weight.ndim < 2:
                continue
            bits, per_channel, mean, moment = bits_only, True, None, None
        reason = check_layer(node, weight)
        if reason:
            ctx.refuse(f"layer {node_label(node)}", reason)
            continue
        site = layer_site(node, weight, bits, per_channel, mean, moment, combine)
        sites.append(site)
    return sites


def check_layer(node: gs.Node, weight: np.ndarray) -> str | None:
    """Why REx refuses this layer, or None."""
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0):
        return "Gemm with transA or alpha/beta ≠ 1"
    if node.op == "MatMul" and weight.ndim != 2:
        return "MatMul with a weight of rank ≠ 2"
    if output_rank(node) is None:
        return "output rank unknown (run shape inference)"
    return None


def layer_site(
    node: gs.Node, weight: np.ndarray, bits: int, per_channel: bool, mean: np.ndarray | None, moment: np.ndarray | None, combine: str
) -> LayerSite:
    """The :class:`LayerSite` of a layer REx accepted (``combine``: the run's rex_combine)."""
    out_axis = weight_axis(node)
    groups = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
    source = producer(node.inputs[0])
    input_dq = source if source is not None and source.op == "DequantizeLinear" and scalar_value(source.inputs[1]) is not None else None
    if node.op not in ("Conv", "Gemm", "MatMul"):
        mean = None
    combine = "gather" if combine == "permute" else combine  # permute: set per layer later
    return LayerSite(node, np.asarray(weight, np.float32), bits, out_axis if per_channel else None, out_axis, groups, mean, moment, input_dq,
                     output_range(node), output_rank(node), combine)


def output_rank(node: gs.Node) -> int | None:
    """Rank of the layer's output (None when unknown)."""
    if node.op == "Conv":
        weight = node.inputs[1]
        return len(weight.shape) if weight.shape is not None else None
    if node.op == "Gemm":
        return 2
    shape = node.outputs[0].shape if node.outputs[0].shape is not None else node.inputs[0].shape
    return len(shape) if shape is not None else None


def output_channel_axis(site: LayerSite) -> int:
    """The channel axis of the layer's output (last for MatMul, 1 otherwise)."""
    return site.rank - 1 if site.node.op == "MatMul" else 1


def output_range(node: gs.Node) -> tuple[float, float] | None:
    """Range [lo, hi] of the QuantizeLinear reading the layer's output (after Relu/Clip)."""
    current = node.outputs[0]
    while len(current.outputs) == 1 and current.outputs[0].op in FOLLOWING_ACTIVATIONS and current.outputs[0].outputs:
        current = current.outputs[0].outputs[0]
    for reader in current.outputs:
        if reader.op == "QuantizeLinear":
            scale, zero = scalar_value(reader.inputs[1]), optional_input(reader, 2)
            zp = int(np.asarray(zero.values).reshape(())) if isinstance(zero, gs.Constant) else 0
            if scale is None:
                return None
            top = 255 if zero is None or np.asarray(zero.values).dtype == np.uint8 else 127
            low = 0 if top == 255 else -128
            return float((low - zp) * scale), float((top - zp) * scale)
    return None
