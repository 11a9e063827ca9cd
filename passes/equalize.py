"""equalize: cross-layer equalization (CLE) of DFQ, the standard data-free baseline.

Before::   x ── Conv(W1, b1) ── Relu ── Conv(W2, b2) ── y
After::    x ── Conv(W1/s, b1/s) ── Relu ── Conv(W2·s, b2) ── y      (s > 0 per channel)

Maths.  A positively homogeneous activation f (f(a·x) = a·f(x) for a > 0: ReLU, LeakyReLU,
the identity) commutes with a positive scale per channel.  So dividing output channel c of
the first layer (its weight row and bias) by s_c and multiplying the second layer's input
column c by s_c computes the same function, whatever s > 0.  DFQ chooses s to balance the
weight ranges: with r1_c the range of W1's output channel c (max |W1[c, …]|) and r2_c the
range of W2's input channel c (max |W2[:, c, …]| over every reader), ``s_c = √(r1_c·r2_c) / r2_c``
makes both ranges ``√(r1_c·r2_c)``.  A per-tensor weight quantizer then no longer spends its
levels on a few wide channels.  In a chain (MobileNetV2: 1×1 expand → ReLU6 → 3×3 depthwise →
ReLU6 → 1×1 project) the middle layer is the second layer of one pair and the first of the
next: a depthwise Conv's input channel c is its output channel c, so both scalings act on
its kernel c.  Balancing one pair unbalances its neighbours, so the pass sweeps over all
pairs until no scale moves by more than ``tolerance`` (relative), at most ``max_sweeps``
times; the products of the per-sweep scales are written once.  A channel whose range is 0
on either side keeps s = 1.  The rewrite is exact in float (only rounding moves).

Bounded activations.  ReLU6 = Clip(x, 0, 6) is not homogeneous: Clip(x/s, 0, 6) ≠ Clip(x, 0, 6)/s.
But min(x/s, 6/s) = min(x, 6)/s, so a clipped channel stays exact when its bound is scaled
with it.  The pass therefore rewrites Clip(x, lo, hi) on a pair's path into
``Relu`` (lo = 0) or ``Max(x, lo/s)``, then ``Min(·, hi/s)`` with per-channel constant
bounds (shape [C, 1, 1] for NCHW): exact, at the price of one elementwise op that ONNX
Runtime does not fuse into the Conv.  (DFQ replaces ReLU6 by ReLU instead, which changes
the float model; this pass never does.)  Min/Max/Add/Sub nodes with one constant operand
that is per channel or scalar (the bounds this pass writes, a MatMul's bias Add) stay on the
path with their constant divided by s_c: op(x/s, c/s) = op(x, c)/s.

Pairs.  The first layer is a Conv (any group), a Gemm or a MatMul with a constant 2-D
weight; its output may pass through single-reader Relu, LeakyRelu, Identity, Clip and
Min/Max/Add/Sub-with-a-constant nodes and must then be read only by layers (Conv with any group,
depthwise included; Gemm without transA; MatMul with a constant 2-D weight) of the same
layout (Conv ↔ Conv, Gemm/MatMul ↔ Gemm/MatMul) as their data input.  Several readers
share the scales (their columns' ranges are combined with a max).

Refused (with the reason in the report): non-constant or non-float weights, ConvTranspose,
Gemm with transA, a tensor on the path that is a graph output, a path tensor read by
anything else than one path node or only layers (a residual Add, a Concat, a Shape, ...),
non-homogeneous activations (Sigmoid, HardSwish, Gelu, Tanh, ...), Clip/Min/Max/Add/Sub
without a constant per-channel operand, layers of different layouts.

High-bias absorption (pass ``absorb-high-bias``, DFQ §4.1; lossy but nearly exact).  After
equalization a channel with a small s_c may carry a large bias b1_c/s_c: a near-constant
channel that stretches the per-tensor activation range.  With the kept BN statistics of the
pre-activation x_c ~ N(β_c, γ_c²), x_c ≥ c_c = max(0, β_c − 3|γ_c|) almost always, and then
ReLU(x − c) = ReLU(x) − c, min(ReLU(x − c), m − c) = min(ReLU(x), m) − c.  So the producer's bias
loses c_c, a per-channel Min bound m_c becomes m_c − c_c (c_c is capped at m_c: a channel
always above its bound is the constant m_c), and every reader gets the constant back in its
bias: b2 += Σ_k W2[:, c, k]·c_c.  Exact wherever x_c ≥ c_c; refused (with the reason) for
readers with zero padding (the padded border would read −c_c instead of 0) or a
ConvTranspose, paths that are not Relu [+ Min] (Clip: run ``equalize`` first, it rewrites
ReLU6 into Relu + Min; LeakyRelu is not a shift), and pre-activations without kept
statistics.  The statistics' means move by −c_c.

Statistics.  fold-batchnorm keeps each folded BN's output statistics (mean β_c, std |γ_c|)
in the metadata that the quantize pass reads for its data-free ranges.  Every path tensor
of an equalized pair now holds its old values divided by s_c, so its entry becomes
(β_c/s_c, |γ_c|/s_c): the ranges quantize derives stay those of the actual values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import (
    NameFactory,
    cleanup,
    constant_values,
    detach,
    is_default_domain,
    is_graph_output,
    node_label,
    set_constant_input,
)
from onnxopt.options import OptionProblem, PassOptions
from onnxopt.pass_base import Pass, PassContext, PassResult, Stage

from .common.absorb import absorb_input, absorb_output, expressive_refusal, leaf_shift_refusal
from .common.layers import transposed_weight
from .common.ops import HOMOGENEOUS_ACTIVATIONS, NON_HOMOGENEOUS_OPS, WITHOUT_TRANSPOSE_OPS
from .common.statistics import STATISTICS_KEY, statistics_from_metadata, statistics_to_metadata

#: Elementwise ops with a constant operand that is rescaled with the channel:
#: op(x/s, c/s) = op(x, c)/s (Min/Max bounds, a MatMul's bias Add).
BOUND_OPS = frozenset({"Min", "Max", "Add", "Sub"})
#: A range below this share of the largest one counts as 0 (the channel keeps s = 1).
ZERO_RANGE = 1e-12


class Refused(Exception):
    """The pair is left unchanged; the message says why."""


# --------------------------------------------------------------------------- layer views
@dataclass
class LayerView:
    """A layer's weight as [outputs, inputs per group, kernel] (float64 working copy) and the
    input channel every (output, column) entry reads."""

    node: gs.Node
    weight: np.ndarray
    in_channel: np.ndarray
    inputs: int
    #: "conv" (channels on axis 1) or "dense" (channels on the last axis)
    layout: str

    @property
    def outputs(self) -> int:
        return self.weight.shape[0]

    def out_range(self) -> np.ndarray:
        return np.abs(self.weight).max(axis=(1, 2))

    def in_range(self) -> np.ndarray:
        per_entry = np.abs(self.weight).max(axis=2)
        ranges = np.zeros(self.inputs)
        np.maximum.at(ranges, self.in_channel.ravel(), per_entry.ravel())
        return ranges

    def scale_out(self, scale: np.ndarray) -> None:
        self.weight /= scale[:, None, None]

    def scale_in(self, scale: np.ndarray) -> None:
        self.weight *= scale[self.in_channel][:, :, None]


def layer_view(node: gs.Node) -> LayerView:
    """The canonical view of a Conv/Gemm/MatMul, or Refused with the reason."""
    label = f"{node.op} {node_label(node)}"
    if node.op not in WITHOUT_TRANSPOSE_OPS or not is_default_domain(node):
        raise Refused(f"{label} is not a Conv, Gemm or MatMul")
    reason = expressive_refusal(node)
    if reason:
        raise Refused(reason)
    weight = constant_values(node, 1).astype(np.float64)
    if node.op == "Conv":
        groups = int(node.attrs.get("group", 1))
        out, per_group = weight.shape[0], weight.shape[1]
        if out % groups:
            raise Refused(f"{label} output channels are not a multiple of its groups")
        group_of_row = np.arange(out) // (out // groups)
        in_channel = group_of_row[:, None] * per_group + np.arange(per_group)[None, :]
        return LayerView(node, weight.reshape(out, per_group, -1).copy(), in_channel, groups * per_group, "conv")
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            raise Refused(f"{label} has transA")
        rows = weight if transposed_weight(node) else weight.T
    else:
        rows = weight.T  # MatMul x[…, K] × W[K, N]
    out, depth = rows.shape
    in_channel = np.broadcast_to(np.arange(depth), (out, depth))
    return LayerView(node, rows[:, :, None].copy(), in_channel, depth, "dense")


# --------------------------------------------------------------------------- pairs
@dataclass
class Pair:
    producer: LayerView
    consumers: list[LayerView]
    #: nodes between the producer and the consumers, in order
    path: list[gs.Node]
    #: the producer's output and every path node's output
    tensors: list[gs.Tensor]
    #: cumulative s per channel
    scale: np.ndarray = field(default_factory=lambda: np.ones(0))

    @property
    def rank(self) -> int | None:
        """Rank of the path tensors when known (a Conv's is its weight's)."""
        if self.producer.layout == "conv":
            return constant_values(self.producer.node, 1).ndim
        shape = self.tensors[0].shape
        return len(shape) if shape is not None else None


def channel_bound(node: gs.Node, tensor: gs.Tensor, channels: int, layout: str, rank: int | None) -> tuple[int, np.ndarray]:
    """(index of the constant operand, its value per channel) of a Min/Max/Add/Sub reading ``tensor``."""
    label = f"{node.op} {node_label(node)}"
    if len(node.inputs) != 2:
        raise Refused(f"{label} does not have exactly two inputs")
    index = 1 if node.inputs[0] is tensor else 0
    bound = constant_values(node, index)
    if node.inputs[1 - index] is not tensor or bound is None:
        raise Refused(f"{label} has no constant operand (a join of two tensors)")
    axis_from_end = 1 if layout == "dense" else (rank - 1 if rank is not None else None)
    if bound.size == 1:
        return index, np.full(channels, float(bound.reshape(())))
    if axis_from_end is None or bound.ndim < axis_from_end:
        raise Refused(f"{label} bound is not per channel")
    shape = list(bound.shape)
    channel_dim = len(shape) - axis_from_end
    others = shape[:channel_dim] + shape[channel_dim + 1 :]
    if shape[channel_dim] != channels or any(d != 1 for d in others) or (rank is not None and bound.ndim > rank):
        raise Refused(f"{label} bound of shape {shape} is not one value per channel")
    return index, bound.astype(np.float64).reshape(channels)


def clip_bounds(node: gs.Node) -> tuple[float, float]:
    """(low, high) of a Clip with constant bounds (inputs, or attributes before opset 11)."""
    values = []
    for index, attr, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        if len(node.inputs) > index and not node.inputs[index].is_empty():
            value = constant_values(node, index)
            if value is None:
                raise Refused(f"Clip {node_label(node)} bounds are not constant")
            values.append(float(value.reshape(())))
        else:
            values.append(float(node.attrs.get(attr, default)))
    return values[0], values[1]


def path_refusal(node: gs.Node, tensor: gs.Tensor, channels: int, layout: str, rank: int | None) -> str | None:
    """None if ``node`` (reading ``tensor``) can sit between the two layers of a pair."""
    label = f"{node.op} {node_label(node)}"
    if not is_default_domain(node):
        return f"{label} is a custom op"
    if node.op not in HOMOGENEOUS_ACTIVATIONS | BOUND_OPS | {"Clip"}:
        if node.op in NON_HOMOGENEOUS_OPS:
            return f"{label} is not positively homogeneous (f(x/s) ≠ f(x)/s)"
        return f"{label} is not an activation between two layers (only Relu, LeakyRelu, Identity, Clip, Min/Max/Add/Sub with a constant per channel)"
    if node.inputs[0] is not tensor and node.op not in BOUND_OPS:
        return f"{label} reads the tensor as a parameter"
    try:
        if node.op == "Clip":
            clip_bounds(node)
        elif node.op in BOUND_OPS:
            channel_bound(node, tensor, channels, layout, rank)
    except Refused as reason:
        return str(reason)
    return None


def match_pair(graph: gs.Graph, producer: LayerView, views: dict[int, LayerView]) -> Pair | None:
    """The pair starting at ``producer``; None when its output feeds nothing; Refused with why."""
    node = producer.node
    tensor = node.outputs[0]
    path: list[gs.Node] = []
    tensors = [tensor]
    rank = constant_values(node, 1).ndim if producer.layout == "conv" else (len(tensor.shape) if tensor.shape is not None else None)
    while True:
        if is_graph_output(graph, tensor):
            raise Refused(f"{tensor.name} is a graph output")
        readers = list(tensor.outputs)
        if not readers:
            return None
        if all(r.op in WITHOUT_TRANSPOSE_OPS for r in readers):
            return Pair(producer, [consumer_view(r, tensor, producer, views) for r in readers], path, tensors, np.ones(producer.outputs))
        if len(readers) > 1:
            kinds = ", ".join(sorted({f"{r.op}" for r in readers}))
            raise Refused(f"{tensor.name} has several readers, not all layers ({kinds})")
        reader = readers[0]
        reason = path_refusal(reader, tensor, producer.outputs, producer.layout, rank)
        if reason:
            raise Refused(reason)
        path.append(reader)
        tensor = reader.outputs[0]
        tensors.append(tensor)


def consumer_view(node: gs.Node, tensor: gs.Tensor, producer: LayerView, views: dict[int, LayerView]) -> LayerView:
    label = f"{node.op} {node_label(node)}"
    if node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
        raise Refused(f"{label} reads {tensor.name} as a parameter")
    view = views.get(id(node))
    if view is None:
        view = layer_view(node)
    if view.layout != producer.layout:
        raise Refused(f"{label} and {producer.node.op} {node_label(producer.node)} have different layouts")
    if view.inputs != producer.outputs:
        raise Refused(f"{label} reads {view.inputs} channels, {node_label(producer.node)} writes {producer.outputs}")
    return view


# --------------------------------------------------------------------------- equalization
def balancing_scale(pair: Pair) -> np.ndarray:
    """DFQ's s_c = √(r1_c·r2_c) / r2_c (1 where a range is 0)."""
    r1 = pair.producer.out_range()
    r2 = np.max([c.in_range() for c in pair.consumers], axis=0)
    live = (r1 > ZERO_RANGE * max(r1.max(), 1e-300)) & (r2 > ZERO_RANGE * max(r2.max(), 1e-300))
    scale = np.ones_like(r1)
    scale[live] = np.sqrt(r1[live] * r2[live]) / r2[live]
    return scale


def equalize_pairs(pairs: list[Pair], max_sweeps: int, tolerance: float) -> tuple[int, float]:
    """Sweep DFQ's balancing over ``pairs`` on the working weights until every scale of a
    sweep is within ``tolerance`` of 1: (sweeps run, largest relative move of the last)."""
    moved = 0.0
    for sweep in range(1, max_sweeps + 1):
        moved = 0.0
        for pair in pairs:
            scale = balancing_scale(pair)
            pair.producer.scale_out(scale)
            for consumer in pair.consumers:
                consumer.scale_in(scale)
            pair.scale *= scale
            moved = max(moved, float(np.max(np.abs(scale - 1.0), initial=0.0)))
        if moved <= tolerance:
            return sweep, moved
    return max_sweeps, moved


def per_channel_constant(values: np.ndarray, pair: Pair, dtype: np.dtype) -> np.ndarray:
    """``values`` shaped to broadcast over the channel axis of the pair's tensors."""
    rank = pair.rank
    if pair.producer.layout == "conv":
        return values.reshape(-1, *([1] * (rank - 2))).astype(dtype)
    return values.astype(dtype)


def apply_pair(graph: gs.Graph, pair: Pair, names: NameFactory) -> list[str]:
    """Write the cumulative scales into the graph; the names of the Clips rewritten."""
    inverse = 1.0 / pair.scale
    zero = np.zeros_like(inverse)
    absorb_output(graph, pair.producer.node, inverse, zero, names)
    for consumer in pair.consumers:
        absorb_input(graph, consumer.node, inverse, zero, names)
    dtype = constant_values(pair.producer.node, 1).dtype
    rewritten = []
    for index, node in enumerate(pair.path):
        if node.op in BOUND_OPS:
            slot, bound = channel_bound(node, pair.tensors[index], len(inverse), pair.producer.layout, pair.rank)
            set_constant_input(graph, node, slot, per_channel_constant(bound * inverse, pair, dtype), names, base_name=f"{node_label(node)}_bound")
        elif node.op == "Clip":
            rewrite_clip(graph, node, inverse, pair, dtype, names)
            rewritten.append(node_label(node))
    return rewritten


def rewrite_clip(graph: gs.Graph, clip: gs.Node, inverse: np.ndarray, pair: Pair, dtype: np.dtype, names: NameFactory) -> None:
    """Clip(x, lo, hi) on a scaled channel → Relu (lo = 0) or Max(x, lo/s), then Min(·, hi/s)."""
    low, high = clip_bounds(clip)
    label = node_label(clip)
    steps: list[tuple[str, np.ndarray | None]] = []
    if low == 0.0:
        steps.append(("Relu", None))
    elif np.isfinite(low):
        steps.append(("Max", low * inverse))
    if np.isfinite(high):
        steps.append(("Min", high * inverse))
    if not steps:
        steps.append(("Identity", None))
    source, output = clip.inputs[0], clip.outputs[0]
    detach(clip)
    current = source
    for position, (op, bound) in enumerate(steps):
        last = position == len(steps) - 1
        target = output if last else gs.Variable(names.new(f"{label}_{op.lower()}"), dtype=output.dtype, shape=output.shape)
        inputs = [current]
        if bound is not None:
            inputs.append(gs.Constant(names.new(f"{label}_{op.lower()}_bound"), per_channel_constant(bound, pair, dtype)))
        name = label if position == 0 and clip.name else names.new(f"{label}_{op.lower()}")
        graph.nodes.append(gs.Node(op, name, inputs=inputs, outputs=[target]))
        current = target


def rescale_statistics(metadata: dict[str, str], pairs: list[Pair]) -> int:
    """Divide the kept BN statistics of every path tensor by its s_c; the entries updated."""
    statistics = statistics_from_metadata(metadata)
    if not statistics:
        return 0
    updated = 0
    for pair in pairs:
        axis = 1 if pair.producer.layout == "conv" or pair.rank == 2 else None
        for tensor in pair.tensors:
            entry = statistics.get(tensor.name)
            if entry is None or axis is None or entry.get("axis", 1) != axis or len(entry["mean"]) != len(pair.scale):
                continue
            entry["mean"] = [float(v) for v in np.asarray(entry["mean"]) / pair.scale]
            entry["std"] = [float(v) for v in np.asarray(entry["std"]) / pair.scale]
            updated += 1
    if updated:
        metadata[STATISTICS_KEY] = statistics_to_metadata(statistics)
    return updated


# --------------------------------------------------------------------------- the pass
def find_pairs(graph: gs.Graph, ctx: PassContext, what: str) -> list[Pair]:
    """Every pair of the graph; the layers whose output cannot be one are refused ("<what>: why")."""
    views: dict[int, LayerView] = {}
    for node in graph.nodes:
        if node.op in WITHOUT_TRANSPOSE_OPS and is_default_domain(node):
            try:
                views[id(node)] = layer_view(node)
            except Refused as reason:
                ctx.refuse(f"layer {node_label(node)}", f"{what}: {reason}")
    pairs = []
    for node in graph.nodes:
        producer = views.get(id(node))
        if producer is None:
            continue
        try:
            pair = match_pair(graph, producer, views)
        except Refused as reason:
            ctx.refuse(f"layer {node_label(node)}", f"{what}: {reason}")
            continue
        if pair is not None:
            pairs.append(pair)
    return pairs


@dataclass(frozen=True)
class EqualizeOptions(PassOptions):
    #: the most equalization sweeps over the network
    max_sweeps: int = 50
    #: stop when no scale moves more than this (relative)
    tolerance: float = 1e-4

    def check(self) -> None:
        super().check()
        if self.max_sweeps < 1:
            raise OptionProblem("max_sweeps", f"must be a positive integer, got {self.max_sweeps!r}")
        if not self.tolerance > 0:
            raise OptionProblem("tolerance", f"must be positive, got {self.tolerance!r}")


@dataclass(frozen=True)
class AbsorbHighBiasOptions(PassOptions):
    #: absorb β − sigmas·|γ|, the part of the pre-activation that is almost always positive
    sigmas: float = 3.0

    def check(self) -> None:
        super().check()
        if not self.sigmas >= 0:
            raise OptionProblem("sigmas", f"must be >= 0, got {self.sigmas!r}")

class Equalize(Pass):
    name = "equalize"
    summary = "DFQ cross-layer equalization: balance the weight ranges of consecutive layers through ReLU/ReLU6 (exact rescaling)"
    stage = Stage.PRUNE
    tags = frozenset({"equalize"})
    request = "equalize"
    runs_after = frozenset({"bn-fold", "prune"})
    runs_before = frozenset({"quantize"})
    Options = EqualizeOptions

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cleanup(graph)
        names = NameFactory(graph)
        pairs = find_pairs(graph, ctx, "output not equalized")
        if not pairs:
            return PassResult(False, {"pairs_equalized": 0})
        sweeps, moved = equalize_pairs(pairs, int(self.options["max_sweeps"]), float(self.options["tolerance"]))
        if moved > self.options["tolerance"]:
            ctx.logger.warning("equalize: not converged after %d sweeps (last move %.3g); the rewrite is exact anyway", sweeps, moved)
        clips = [label for pair in pairs for label in apply_pair(graph, pair, names)]
        cleanup(graph)
        updated = rescale_statistics(ctx.metadata, pairs)
        return PassResult(
            True,
            {
                "pairs_equalized": len(pairs),
                "sweeps": sweeps,
                "converged": moved <= self.options["tolerance"],
                "last_move": moved,
                "clips_rewritten": len(clips),
                "statistics_rescaled": updated,
                "pairs": [self._record(pair) for pair in pairs],
            },
        )

    @staticmethod
    def _record(pair: Pair) -> dict[str, Any]:
        return {
            "producer": node_label(pair.producer.node),
            "consumers": [node_label(c.node) for c in pair.consumers],
            "path": [n.op for n in pair.path],
            "scale_min": float(pair.scale.min()),
            "scale_max": float(pair.scale.max()),
        }

# --------------------------------------------------------------------------- high-bias absorption
def absorbable_shift(graph: gs.Graph, pair: Pair, statistics: dict[str, dict[str, Any]], sigmas: float) -> np.ndarray:
    """c_c = min(max(0, β_c − k|γ_c|), m_c) for the pair, or Refused with why."""
    entry = statistics.get(pair.tensors[0].name)
    if entry is None or entry.get("axis", 1) != 1 or len(entry["mean"]) != len(pair.scale):
        raise Refused(f"no kept BN statistics for {pair.tensors[0].name}")
    ops = [n.op for n in pair.path if n.op != "Identity"]
    if not ops or ops[0] != "Relu" or any(op != "Min" for op in ops[1:]):
        hint = " (run equalize first: it rewrites ReLU6 as Relu + Min)" if "Clip" in ops else ""
        raise Refused(f"the path {'→'.join(ops) or 'has no activation'} is not Relu [+ Min]{hint}")
    for consumer in pair.consumers:
        reason = leaf_shift_refusal(consumer.node)
        if reason:
            raise Refused(f"{consumer.node.op} {node_label(consumer.node)}: {reason}")
    shift = np.maximum(0.0, np.asarray(entry["mean"]) - sigmas * np.abs(np.asarray(entry["std"])))
    for index, node in enumerate(pair.path):
        if node.op == "Min":
            _, bound = channel_bound(node, pair.tensors[index], len(shift), pair.producer.layout, pair.rank)
            shift = np.minimum(shift, np.maximum(bound, 0.0))
    return shift


def absorb_shift(graph: gs.Graph, pair: Pair, shift: np.ndarray, names: NameFactory) -> None:
    """Move ``shift`` out of the producer's bias, the Min bounds, into the readers' biases."""
    ones = np.ones_like(shift)
    absorb_output(graph, pair.producer.node, ones, -shift, names)
    dtype = constant_values(pair.producer.node, 1).dtype
    for index, node in enumerate(pair.path):
        if node.op == "Min":
            slot, bound = channel_bound(node, pair.tensors[index], len(shift), pair.producer.layout, pair.rank)
            set_constant_input(graph, node, slot, per_channel_constant(bound - shift, pair, dtype), names, base_name=f"{node_label(node)}_bound")
    for consumer in pair.consumers:
        absorb_input(graph, consumer.node, ones, -shift, names)


class AbsorbHighBias(Pass):
    name = "absorb-high-bias"
    summary = "DFQ high-bias absorption: move the part of a ReLU input that is almost always positive (β − 3|γ|) into the next layer's bias"
    stage = Stage.PRUNE
    lossless = False  # exact wherever the pre-activation stays above β − 3|γ|
    tags = frozenset({"absorb-high-bias"})
    request = "equalize"
    runs_after = frozenset({"bn-fold", "prune", "equalize"})
    runs_before = frozenset({"quantize"})
    Options = AbsorbHighBiasOptions

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cleanup(graph)
        names = NameFactory(graph)
        metadata = ctx.metadata
        statistics = statistics_from_metadata(metadata)
        absorbed, channels = [], 0
        for pair in find_pairs(graph, ctx, "high bias not absorbed"):
            label = node_label(pair.producer.node)
            try:
                shift = absorbable_shift(graph, pair, statistics, float(self.options["sigmas"]))
            except Refused as reason:
                ctx.refuse(f"layer {label}", f"high bias not absorbed: {reason}")
                continue
            if not np.any(shift > 0):
                continue
            absorb_shift(graph, pair, shift, names)
            for tensor in pair.tensors:
                entry = statistics.get(tensor.name)
                if entry is not None and len(entry["mean"]) == len(shift):
                    entry["mean"] = [float(v) for v in np.asarray(entry["mean"]) - shift]
            absorbed.append({"producer": label, "channels": int(np.count_nonzero(shift)), "shift_max": float(shift.max())})
            channels += int(np.count_nonzero(shift))
        if absorbed:
            cleanup(graph)
            metadata[STATISTICS_KEY] = statistics_to_metadata(statistics)
        return PassResult(bool(absorbed), {"pairs_absorbed": len(absorbed), "channels_absorbed": channels, "pairs": absorbed})


__all__ = ["Equalize", "AbsorbHighBias", "LayerView", "layer_view", "balancing_scale"]
