"""SPIQ: per-channel activation scales folded into the graph (docs/quantization.md, eqs. 3.10–3.11).

A layer reading X with per-channel quantization steps s_c quantizes ``X/r`` per tensor
instead, with ``r_c = s_c / S`` and ``S = max_c s_c``: every channel of ``X/r`` then spans the
same range ``[0, (2^b − 1)·S]``.  Deployment **[derived]**:

* the division by r is folded into the producer's output channels (rows and bias ÷ r_c; for
  a LayerNormalization producer its γ and β ÷ r_c),
  which passes through ReLU, Max/Average pooling and a Flatten of a pooled tensor (they
  commute with a positive per-channel scale);
* a ReLU6 (Clip(0, 6)) on the way becomes a Relu: with ``s_c = min(6, hi_c)/(2^b − 1)`` the
  per-tensor quantizer's clip at (2^b − 1)·S reproduces the 6 on every channel;
* a Min/Max with a per-channel constant bound (the ReLU6 the equalize pass writes) stays,
  its bound divided by r_c too: min(x/r, m/r) = min(x, m)/r;
* the reading layers take the multiplication (input columns × r_c), before their own
  per-output-channel weight quantization.

Before rounding the rewritten float graph computes the same function (ReLU6 aside, whose
clip moves into the quantizer).  Refused, with the tensor left per-tensor: graph inputs,
tensors with readers other than quantized layers (Shape readers excepted), producers that cannot absorb a per-channel
scale (a residual Add, a Concat, an unknown op), and intermediate tensors with other readers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import (
    NameFactory,
    constant_values,
    is_graph_output,
    node_label,
    producer,
    set_constant_input,
)

from ..common.absorb import absorb_input, absorb_output, expressive_refusal
from ..common.layers import weight_rows
from ..common.numerics import dequantize_weight, quantize_weight
from ..common.ops import AVERAGING_OPS, LAYER_OPS, SCALE_COMMUTING_OPS, SHAPE_READERS
from ..common.ranges import Tail, channel_bound

#: Smallest r_c: a channel that is (almost) always zero must not blow its producer's rows up.
MIN_RATIO = 1e-3


@dataclass
class SpiqPlan:
    producer: gs.Node
    chain: list[gs.Node]
    #: upper clip of a ReLU6-like Clip on the way (inf when none)
    clip_high: float


def clip_high(node: gs.Node) -> float | None:
    """The upper bound of a Clip(0, m) node, or None if it is not such a clip."""
    low = constant_values(node, 1) if len(node.inputs) > 1 else None
    high = constant_values(node, 2) if len(node.inputs) > 2 else None
    low_value = float(low) if low is not None else float(node.attrs.get("min", -np.inf))
    high_value = float(high) if high is not None else float(node.attrs.get("max", np.inf))
    return high_value if low_value == 0.0 and high_value > 0 else None


def plan(graph: gs.Graph, tensor: gs.Tensor, readers: list[gs.Node]) -> SpiqPlan | str:
    """How ``tensor``'s per-channel scales can be folded, or why they cannot."""
    others = [n for n in tensor.outputs if not any(n is r for r in readers) and n.op not in SHAPE_READERS]
    if others:
        return f"also read by {others[0].op} {node_label(others[0])}"
    chain: list[gs.Node] = []
    high = np.inf
    averaged = False  # an averaging op lies between this point and ``tensor``
    current = tensor
    while True:
        if is_graph_output(graph, current):
            return f"{current.name} is a graph output"
        node = producer(current)
        if node is None:
            return "graph input (no producer to absorb the scales)"
        if not any(node is n for n in graph.nodes):
            return f"{current.name} comes from the graph enclosing this If/Loop/Scan body"
        if node.op in SCALE_COMMUTING_OPS or (node.op == "Clip" and clip_high(node) is not None) or _channel_flatten(node):
            if node.op == "Clip":
                if averaged:  # the average of clipped values is not the clip of the average
                    return f"Clip {node_label(node)} is followed by an average: its bound cannot move into the quantizer"
                high = min(high, clip_high(node))
            averaged |= node.op in AVERAGING_OPS
            chain.append(node)
            source = node.inputs[0]
            if len(source.outputs) != 1:
                return f"{source.name} feeds other nodes too (residual join)"
            current = source
            continue
        bound = channel_bound(node)
        if bound is not None and node.outputs[0] is current:
            if current.shape is None:
                return f"{node.op} {node_label(node)} output has no known rank"
            chain.append(node)
            source = node.inputs[1 - bound[0]]
            if len(source.outputs) != 1:
                return f"{source.name} feeds other nodes too (residual join)"
            current = source
            continue
        if node.op == "LayerNormalization" and node.outputs[0] is current:
            refusal = _layernorm_refusal(node)
            return refusal if refusal else SpiqPlan(node, chain, high)
        if node.op in LAYER_OPS and expressive_refusal(node) is None and node.outputs[0] is current:
            if node.op == "MatMul" and (current.shape is None or len(current.shape) != 2):
                return f"{node.op} {node_label(node)} output is not a matrix"
            return SpiqPlan(node, chain, high)
        return f"{node.op} {node_label(node)} cannot absorb per-channel scales"


def _layernorm_refusal(node: gs.Node) -> str | None:
    """None if the LayerNormalization's affine part (γ, β per feature of the last axis) can
    absorb a per-feature scale, else why not."""
    gamma = constant_values(node, 1)
    has_beta = len(node.inputs) > 2 and not node.inputs[2].is_empty()
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if gamma is None or gamma.ndim != 1 or (has_beta and constant_values(node, 2) is None):
        return f"LayerNormalization {node_label(node)} scale/bias are not 1-D initializers"
    if rank is None or int(node.attrs.get("axis", -1)) % rank != rank - 1 or any(not t.is_empty() for t in node.outputs[1:]):
        return f"LayerNormalization {node_label(node)} does not normalize the last axis only"
    return None


def _channel_flatten(node: gs.Node) -> bool:
    """A Flatten of an [N, C, 1, …, 1] tensor: channel c becomes feature c."""
    shape = node.inputs[0].shape if node.op == "Flatten" else None
    return shape is not None and int(node.attrs.get("axis", 1)) == 1 and len(shape) > 2 and all(d == 1 for d in shape[2:])


def apply(graph: gs.Graph, spiq: SpiqPlan, ratio: np.ndarray, readers: list[gs.Node], names: NameFactory) -> None:
    """Divide the producer's output channels by ``ratio`` and multiply the readers' inputs."""
    inverse = 1.0 / ratio
    zero = np.zeros_like(ratio)
    if spiq.producer.op == "LayerNormalization":  # y/r = (γ/r)·n + β/r
        for index in (1, 2) if len(spiq.producer.inputs) > 2 and not spiq.producer.inputs[2].is_empty() else (1,):
            values = constant_values(spiq.producer, index)
            set_constant_input(graph, spiq.producer, index, (values.astype(np.float64) * inverse).astype(values.dtype), names)
    else:
        absorb_output(graph, spiq.producer, inverse, zero, names)
    for node in spiq.chain:
        bound = channel_bound(node)
        if bound is not None:  # min(x/r, m/r) = min(x, m)/r
            index, values = bound
            rank = len(node.outputs[0].shape)
            scaled = (np.broadcast_to(values, inverse.shape) * inverse).reshape(-1, *([1] * (rank - 2)))
            set_constant_input(graph, node, index, scaled.astype(constant_values(node, index).dtype), names)
            continue
        if node.op == "Clip":  # the quantizer's clip reproduces the upper bound (see module doc)
            node.op = "Relu"
            while len(node.inputs) > 1:  # graphsurgeon's synchronized lists: pop one by one
                node.inputs.pop()
            node.attrs.clear()
    for reader in readers:
        absorb_input(graph, reader, inverse, zero, names)


def ratios(step: np.ndarray) -> tuple[np.ndarray, float]:
    """(r, S) for per-channel steps ``step``: S = max step, r = step / S floored at MIN_RATIO."""
    top = float(step.max())
    return np.maximum(step / top, MIN_RATIO), top


# --------------------------------------------------------------------------- SPIQ or not
def reader_columns(reader: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """The reader's weight as rows = output channels, plus the input channel of every entry
    (:func:`..common.layers.weight_rows`; None for a grouped ConvTranspose)."""
    return weight_rows(reader)


def clipping_error(tail: Tail, threshold: np.ndarray, signed: bool) -> np.ndarray:
    """Expected squared error per channel of clipping the values at ``threshold`` (and at
    ``−threshold`` when ``signed``), for the values ``min(μ + σ·Z, cap)`` of ``tail = (μ, σ, cap, share)``.

    Z has unit variance; a share ``share`` (per channel, ChannelRange.tail) of it follows a
    heavy tail, a Student t with 3 degrees of freedom, scaled.  A
    Gaussian makes clipping at the BN range negligible (P(Z > 4) ≈ 3e-5), while the activations
    of trained networks (depthwise outputs in particular) exceed it far more often; the t
    tail is what lets the decision see that SPIQ clips each channel at its own range while a
    per-tensor quantizer clips at the widest one.
    """
    mean, std, cap, share = tail
    std = np.maximum(std, 1e-12)
    upper = _tail_error((threshold - mean) / std, (cap - mean) / std)
    if signed:
        upper = upper + _tail_error((threshold + mean) / std, np.full_like(mean, np.inf))
    return share * std**2 * upper


def _tail_error(k: np.ndarray, k_cap: np.ndarray) -> np.ndarray:
    """E[(min(Z, k_cap) − k)²; Z > k] for the unit-variance Student t(3) Z (0 where k ≥ k_cap)."""
    a, a_cap = np.sqrt(3.0) * k, np.sqrt(3.0) * np.maximum(k_cap, k)  # T = √3·Z is the standard t(3)
    finite = np.isfinite(a_cap)
    cap = np.where(finite, a_cap, 0.0)
    beyond_cap = np.where(finite, _t3_moment(cap, 2) - 2 * a * _t3_moment(cap, 1) + a**2 * _t3_moment(cap, 0), 0.0)
    at_cap = np.where(finite, (cap - a) ** 2 * _t3_moment(cap, 0), 0.0)
    between = _t3_moment(a, 2) - 2 * a * _t3_moment(a, 1) + a**2 * _t3_moment(a, 0) - beyond_cap
    return np.maximum(between + at_cap, 0.0) / 3.0


def _t3_moment(a: np.ndarray, order: int) -> np.ndarray:
    """∫_a^∞ x^order·f(x) dx for the standard Student t(3) density f (closed forms)."""
    density = 2.0 / (np.pi * np.sqrt(3.0)) / (1.0 + a**2 / 3.0) ** 2
    upper = np.arctan2(np.sqrt(3.0), a)  # π/2 − atan(a/√3), accurate for large a
    survival = (upper - np.sqrt(3.0) * a / (3.0 + a**2)) / np.pi
    if order == 0:
        return survival
    if order == 1:
        return (3.0 + a**2) / 2.0 * density
    return 6.0 / np.pi * upper - 3.0 * survival


def estimated_error(
    readers: list[gs.Node],
    second_moment: np.ndarray,
    ratio: np.ndarray,
    steps: np.ndarray,
    weight_bits: int,
    per_channel: bool,
    clipping: np.ndarray | None = None,
) -> float | None:
    """Expected squared output error summed over the readers when their input is quantized
    with per-channel ``steps`` obtained by folding ``ratio`` (all ones: per tensor).

    Each reader's error is the weight-quantization noise ``Σ ΔW²·E[x²]`` plus the activation
    noise ``Σ W²·(Δ²/12 + clipping)`` (``clipping``: the expected squared clipping error per
    channel, :func:`clipping_error`).  The reader quantizes ``W·r`` per output channel, so its
    weight noise, brought back to the original coordinates, is ``ΔW'/r``.  None for readers the
    estimate does not model (e.g. ConvTranspose).
    """
    axis = 0 if per_channel else None
    noise = steps**2 / 12 + (0.0 if clipping is None else clipping)
    total = 0.0
    for reader in readers:
        columns = reader_columns(reader)
        if columns is None:
            return None
        rows, channel = columns
        scaled = rows * ratio[channel]
        delta = (scaled - dequantize_weight(*quantize_weight(scaled, weight_bits, axis), axis)) / ratio[channel]
        total += float(np.sum(delta**2 * second_moment[channel]) + np.sum(rows**2 * noise[channel]))
    return total


def estimated_errors(
    readers: list[gs.Node],
    second_moment: np.ndarray,
    spiq_step: np.ndarray,
    tensor_step: float,
    weight_bits: int,
    per_channel: bool,
    tail: Tail | None = None,
    levels: int = 255,
    signed: bool = False,
) -> tuple[float, float] | None:
    """(with full SPIQ at per-channel steps ``spiq_step``, per tensor at ``tensor_step``).

    With ``tail`` (the BN statistics the values come from, ChannelRange.tail) both include the
    clipping error at the quantizer's top code, ``levels`` steps (per channel with SPIQ, at the
    widest channel's range per tensor).  The tail stops at the per-tensor quantizer's top: the
    data-free ranges assume every value of the tensor within the widest channel's range (that
    is how the per-tensor range is set); what the tail models is a narrow channel leaving its
    own range, which SPIQ clips and the per-tensor quantizer does not.  Unbounded, the t(3)
    tail's clipping error decays only as 1/threshold: at 8 bits it outweighs the rounding
    noise of both options even at the widest channel's range, and the relative gain the
    decision needs (SPIQ_MIN_GAIN) is then out of reach wherever no ReLU6 caps the values."""
    ratio = spiq_step / spiq_step.max()
    ones = np.ones_like(spiq_step)
    tensor_steps = ones * tensor_step
    clip_spiq = clip_tensor = None
    if tail is not None:
        tail = (tail[0], tail[1], np.minimum(tail[2], tensor_step * levels), tail[3])  # see the docstring
        clip_spiq = clipping_error(tail, spiq_step * levels, signed)
        clip_tensor = clipping_error(tail, tensor_steps * levels, signed)
    with_spiq = estimated_error(readers, second_moment, ratio, spiq_step, weight_bits, per_channel, clip_spiq)
    per_tensor = estimated_error(readers, second_moment, ones, tensor_steps, weight_bits, per_channel, clip_tensor)
    return None if with_spiq is None or per_tensor is None else (with_spiq, per_tensor)
