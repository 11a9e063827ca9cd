"""Permute the output channels of a layer and of every tensor that shares them, exactly.

Maths.  Let ``order`` be a permutation of the C channels (new channel i = old channel
``order[i]``).  A layer whose output channel c is computed by its weight row c and bias b_c
(dense Conv, Gemm, MatMul with a constant weight) outputs ``y[order]`` when its rows are
reordered: ``W' = W[order]``, ``b' = b[order]``.  A *channel-wise* op g (each channel
computed from the same channel only, with per-channel constants k) commutes with the
reordering: ``g(y[order]; k[order]) = g(y; k)[order]`` — activations, per-tensor
Quantize/DequantizeLinear, pooling, Pad/Slice/Resize off the channel axis, depthwise Conv
(``W[order]``, ``b[order]``), Add/Sub/Mul/Div (a per-channel constant operand is permuted,
a scalar one is not; both computed operands must carry the same order).  A layer reading
the channels as its input, ``z = Σ_c W[:, c]·y_c``, computes the same z from ``y[order]``
with its input columns reordered, ``W'[:, i] = W[:, order[i]]``; its own output is unchanged.

Hence the tensors that must carry one order form a connected component (a *channel group*):
starting from the layer's output, walk every tensor's producer and consumers; channel-wise
nodes join all their data tensors to the group (so a residual Add joins the stream: every
projection Conv feeding a MobileNetV2 stage is in one group), layers producing a group
tensor are *producers* (rows permuted), layers reading one are *consumers* (columns
permuted).  The group is closed when every tensor's producer and consumers are classified;
anything else refuses the permutation (:class:`PermutationRefused`, with the reason).

Weights and per-channel constants may be initializers or ``DequantizeLinear`` of
initializers (what the quantize pass emits: ``DQ(codes, scale[C], zp[C], axis=0)``, biases
``DQ(int32 codes, scale[C])``): the codes are permuted on the weight's axis, the scale and
zero point too when the DequantizeLinear is per-channel on that axis.  A constant (or a
DequantizeLinear) also read by a node outside the rewrite is copied first.

Channel axis: 1 for NCHW Conv tensors and Gemm outputs, the last axis for MatMul; moved
through Flatten/Reshape/Squeeze/Unsqueeze/Transpose/ReduceMean by the same bookkeeping as
fold-batchnorm (:mod:`.channels`) — Flatten of ``[N, C, 1, 1]`` keeps the channels,
Flatten of ``[N, C, H, W]`` mixes them and is refused.

Refused: a group tensor that is a graph input or output, grouped Conv with 1 < group < C,
Concat/Split/Slice/Pad on the channel axis, any other op, non-constant weights, unknown
shapes, a channel count mismatch, a tensor reached on two different channel axes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import (
    NameFactory,
    is_default_domain,
    is_graph_input,
    is_graph_output,
    node_label,
    producer,
    set_constant_input,
    string_attr,
)

from . import channels as ch
from .channels import FoldImpossible
from .channels import input_axis_for as reshaped_input_axis
from .layers import input_channel_axis, output_channel_axis, transposed_weight
from .ops import POOLING_OPS, QDQ_OPS, WITHOUT_TRANSPOSE_OPS

UNARY_OPS = frozenset(
    {
        "Identity", "Dropout", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu",
        "Selu", "Celu", "Tanh", "Softplus", "Softsign", "Gelu", "Erf", "Mish", "Neg", "Abs", "Exp", "Log",
        "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Cast", "ThresholdedRelu", "Shrink",
    }
)  # fmt: skip
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "PRelu"})
RESHAPING_OPS = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "ReduceMean"})
OFF_CHANNEL_OPS = frozenset({"Pad", "Slice", "Concat", "Split", "Resize"})  # exact unless they act on the channel axis
SAME_AXIS_OPS = UNARY_OPS | POOLING_OPS | QDQ_OPS | OFF_CHANNEL_OPS | {"Conv"}  # Conv: depthwise


class PermutationRefused(Exception):
    """The channels cannot be permuted exactly; the message is the reason."""


@dataclass
class Rewrite:
    """Input ``index`` of ``node`` (an initializer or a DequantizeLinear of initializers) is
    permuted along its own axis ``axis``."""

    node: gs.Node
    index: int
    axis: int


@dataclass
class ChannelGroup:
    """Tensors that share one channel order (a connected component), and what must be rewritten."""

    channels: int
    #: layers whose OUTPUT channels are the group's: weight rows and bias permuted
    producers: list[gs.Node] = field(default_factory=list)
    #: channel-wise nodes (depthwise Conv, activations, Q/DQ, pooling, Add/Mul…): per-channel constants permuted
    passthrough: list[gs.Node] = field(default_factory=list)
    #: layers reading a group tensor as data input: weight input columns permuted
    consumers: list[gs.Node] = field(default_factory=list)
    tensors: list[gs.Tensor] = field(default_factory=list)
    #: tensor name -> its channel axis
    axes: dict[str, int] = field(default_factory=dict)
    rewrites: list[Rewrite] = field(default_factory=list)


# --------------------------------------------------------------------------- public API
def channel_group(graph: gs.Graph, layer: gs.Node) -> ChannelGroup:
    """The channel group of ``layer``'s output channels (``layer``: dense Conv, Gemm or MatMul
    with a constant weight).  Raises :class:`PermutationRefused` when it cannot be permuted."""
    if _layer_kind(layer) != "dense":
        raise PermutationRefused(f"{_label(layer)} is not a dense Conv/Gemm/MatMul with a constant weight")
    walk = _Walk(graph, _output_channels(layer))
    walk.add_producer(layer, layer.outputs[0])
    walk.run()
    return walk.group


def permute(graph: gs.Graph, group: ChannelGroup, order: np.ndarray) -> None:
    """Reorder the group's channels in place: new channel i = old channel ``order[i]``.
    The graph computes the same outputs afterwards."""
    order = np.asarray(order, dtype=np.int64)
    if order.shape != (group.channels,) or not np.array_equal(np.sort(order), np.arange(group.channels)):
        raise ValueError(f"order must be a permutation of {group.channels} channels")
    names = NameFactory(graph)
    for rewrite in group.rewrites:
        _permute_input(graph, rewrite.node, rewrite.index, rewrite.axis, order, names)


# --------------------------------------------------------------------------- layers
def _label(node: gs.Node) -> str:
    return f"{node.op} {node_label(node)}"


def _constant_source(tensor: gs.Tensor | None) -> gs.Node | gs.Constant | None:
    """``tensor`` itself if it is an initializer, its DequantizeLinear if that reads only
    initializers (no blocked quantization), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor
    node = producer(tensor) if tensor is not None else None
    if node is None or node.op != "DequantizeLinear" or not is_default_domain(node) or node.attrs.get("block_size", 0):
        return None
    if all(isinstance(t, gs.Constant) or t.is_empty() for t in node.inputs):
        return node
    return None


def _constant_shape(tensor: gs.Tensor | None) -> tuple[int, ...] | None:
    source = _constant_source(tensor)
    if source is None:
        return None
    values = source if isinstance(source, gs.Constant) else source.inputs[0]
    return tuple(values.shape)


def _layer_kind(node: gs.Node) -> str | None:
    """'dense', 'depthwise' or None (not a layer with constant weights); refuses grouped Convs."""
    if node.op not in WITHOUT_TRANSPOSE_OPS or not is_default_domain(node) or len(node.inputs) < 2:
        return None
    weight = _constant_shape(node.inputs[1])
    if weight is None or (node.op != "Conv" and len(weight) != 2):
        return None
    if any(_constant_shape(t) is None for t in node.inputs[2:] if not t.is_empty()):
        return None
    groups = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
    if groups == 1:
        return "dense"
    if groups == weight[0] and weight[1] == 1:
        return "depthwise"
    raise PermutationRefused(f"{_label(node)} is a grouped Conv (group={groups}, {weight[0]} output channels)")


def _output_channels(layer: gs.Node) -> int:
    weight = _constant_shape(layer.inputs[1])
    if layer.op == "Conv" or transposed_weight(layer):
        return int(weight[0])
    return int(weight[1])


def _weight_output_axis(layer: gs.Node) -> int:
    return 0 if layer.op == "Conv" or transposed_weight(layer) else 1


def _bias_axis(layer: gs.Node, channels: int) -> int | None:
    """Axis of the bias (Conv B, Gemm C) holding the output channels; None when absent or broadcast."""
    shape = _constant_shape(layer.inputs[2]) if len(layer.inputs) > 2 and not layer.inputs[2].is_empty() else None
    if not shape or shape[-1] == 1:
        return None
    if shape[-1] != channels:
        raise PermutationRefused(f"{_label(layer)}: bias shape {list(shape)} does not match {channels} channels")
    return len(shape) - 1


def _rank(tensor: gs.Tensor) -> int:
    if tensor.shape is None:
        raise PermutationRefused(f"rank of {tensor.name} is unknown")
    return len(tensor.shape)


# --------------------------------------------------------------------------- discovery
class _Walk:
    """Worklist closure over (tensor, channel axis) pairs."""

    def __init__(self, graph: gs.Graph, channels: int) -> None:
        self.graph = graph
        self.group = ChannelGroup(channels)
        self.work: deque[tuple[gs.Tensor, int]] = deque()
        self.seen: set[tuple[int, str]] = set()  # (id(node), role)

    def run(self) -> None:
        while self.work:
            tensor, axis = self.work.popleft()
            known = self.group.axes.get(tensor.name)
            if known is not None:
                if known != axis:
                    raise PermutationRefused(f"{tensor.name} is reached on channel axes {known} and {axis}")
                continue
            self._add_tensor(tensor, axis)
            self._visit_producer(tensor, axis)
            for node in list(tensor.outputs):
                self._visit_consumer(node, tensor, axis)

    def _add_tensor(self, tensor: gs.Tensor, axis: int) -> None:
        if is_graph_output(self.graph, tensor) or is_graph_input(self.graph, tensor):
            kind = "output" if is_graph_output(self.graph, tensor) else "input"
            raise PermutationRefused(f"{tensor.name} is a graph {kind}: its channel order is part of the interface")
        if tensor.shape is None or axis >= len(tensor.shape) or not isinstance(tensor.shape[axis], (int, np.integer)):
            raise PermutationRefused(f"channel count of {tensor.name} is unknown")
        if int(tensor.shape[axis]) != self.group.channels:
            raise PermutationRefused(f"{tensor.name} has {tensor.shape[axis]} channels on axis {axis}, the group {self.group.channels}")
        self.group.axes[tensor.name] = axis
        self.group.tensors.append(tensor)

    def _first_visit(self, node: gs.Node, role: str) -> bool:
        key = (id(node), role)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    # ----------------------------------------------------------------- roles
    def add_producer(self, layer: gs.Node, output: gs.Tensor) -> None:
        axis = output_channel_axis(layer) % _rank(output)
        if self._first_visit(layer, "producer"):
            self.group.producers.append(layer)
            self.group.rewrites.append(Rewrite(layer, 1, _weight_output_axis(layer)))
            bias_axis = _bias_axis(layer, self.group.channels)
            if bias_axis is not None:
                self.group.rewrites.append(Rewrite(layer, 2, bias_axis))
        self.work.append((output, axis))

    def _add_consumer(self, layer: gs.Node, tensor: gs.Tensor, axis: int) -> None:
        expected = input_channel_axis(layer) % _rank(tensor)
        if axis != expected:
            raise PermutationRefused(f"{_label(layer)} reads {tensor.name} with the channels on axis {axis}, not {expected}")
        if self._first_visit(layer, "consumer"):
            self.group.consumers.append(layer)
            weight_input_axis = 1 - _weight_output_axis(layer) if layer.op != "Conv" else 1
            self.group.rewrites.append(Rewrite(layer, 1, weight_input_axis))

    def _visit_producer(self, tensor: gs.Tensor, axis: int) -> None:
        node = producer(tensor)
        if node is None:
            raise PermutationRefused(f"{tensor.name} is a constant")
        kind = _layer_kind(node)
        if kind == "dense" and node.outputs[0] is tensor:
            if axis != output_channel_axis(node) % _rank(tensor):
                raise PermutationRefused(f"{_label(node)}: the group's channels are not its output channels")
            self.add_producer(node, tensor)
            return
        self._visit_passthrough(node, tensor, axis)

    def _visit_consumer(self, node: gs.Node, tensor: gs.Tensor, axis: int) -> None:
        positions = [i for i, t in enumerate(node.inputs) if t is tensor]
        if _layer_kind(node) == "dense":
            if positions != [0]:
                raise PermutationRefused(f"{tensor.name} is a parameter of {_label(node)}")
            self._add_consumer(node, tensor, axis)
            return
        if not set(positions) <= set(_data_inputs(node)):
            raise PermutationRefused(f"{tensor.name} is a parameter of {_label(node)}")
        self._visit_passthrough(node, tensor, axis)

    # ----------------------------------------------------------------- channel-wise nodes
    def _visit_passthrough(self, node: gs.Node, via: gs.Tensor, axis: int) -> None:
        refusal = _passthrough_refusal(node)
        if refusal:
            raise PermutationRefused(f"{_label(node)}: {refusal}")
        if not self._first_visit(node, "passthrough"):
            return
        self.group.passthrough.append(node)
        try:
            out_axis = axis if any(t is via for t in node.outputs) else _forward_axis(node, via, axis)
            outputs = [t for t in node.outputs if not t.is_empty()]
            joined = [(t, out_axis) for t in outputs]
            for index in _data_inputs(node):
                tensor = node.inputs[index]
                in_axis = _backward_axis(node, tensor, out_axis, outputs[0])
                if in_axis is None:
                    continue  # broadcast along the channels: not part of the group
                if _constant_source(tensor) is not None:
                    self._permute_constant_operand(node, index, in_axis)
                else:
                    joined.append((tensor, in_axis))
            self._check_channel_axis(node, out_axis)
        except (ch.NotTransparent, FoldImpossible) as exc:
            raise PermutationRefused(f"{_label(node)}: {exc}") from None
        self._add_parameter_rewrites(node, out_axis)
        self.work.extend(joined)

    def _permute_constant_operand(self, node: gs.Node, index: int, axis: int) -> None:
        if node.op not in BINARY_OPS:
            raise PermutationRefused(f"{_label(node)} has a constant data input")
        size = _constant_shape(node.inputs[index])[axis]
        if size != self.group.channels:
            raise PermutationRefused(f"{_label(node)}: constant operand has {size} channels, the group {self.group.channels}")
        self.group.rewrites.append(Rewrite(node, index, axis))

    def _check_channel_axis(self, node: gs.Node, axis: int) -> None:
        """Ops that are channel-wise only off the channel axis (``axis``: the same on input and output)."""
        op = node.op
        if op == "Pad":
            pads = _pads(node)
            if pads is None:
                raise PermutationRefused(f"{_label(node)}: pads are not constant")
            if pads[axis] or pads[axis + len(pads) // 2]:
                raise PermutationRefused(f"{_label(node)} pads the channel axis")
        elif op == "Slice" and ch.slice_indices(node, axis, self.group.channels) is not None:
            raise PermutationRefused(f"{_label(node)} slices the channel axis")
        elif op in ("Concat", "Split") and int(node.attrs.get("axis", 0)) % _rank(node.inputs[0]) == axis:
            raise PermutationRefused(f"{op} {node_label(node)} joins or splits the channel axis")

    def _add_parameter_rewrites(self, node: gs.Node, out_axis: int) -> None:
        if node.op == "Conv":  # depthwise: one filter per channel
            self.group.rewrites.append(Rewrite(node, 1, 0))
            if _bias_axis(node, self.group.channels) is not None:
                self.group.rewrites.append(Rewrite(node, 2, 0))
        elif node.op in QDQ_OPS and _is_per_channel_on(node, out_axis):
            for index in (1, 2):
                if len(node.inputs) > index and not node.inputs[index].is_empty():
                    self.group.rewrites.append(Rewrite(node, index, 0))


# --------------------------------------------------------------------------- op rules
def _passthrough_refusal(node: gs.Node) -> str | None:
    if not is_default_domain(node) or node.op not in SAME_AXIS_OPS | BINARY_OPS | RESHAPING_OPS:
        return "not an op the channel order can pass"
    if node.op == "Conv" and _layer_kind(node) != "depthwise":
        return "not a depthwise Conv with constant weights"
    if node.op in ("Dropout", "MaxPool") and len([t for t in node.outputs if not t.is_empty() and t.outputs]) > 1:
        return "its second output is used"
    if node.op == "Resize" and string_attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        return "tf_crop_and_resize"
    if node.op in QDQ_OPS and node.attrs.get("block_size", 0):
        return "blocked quantization"
    return None


def _data_inputs(node: gs.Node) -> list[int]:
    """Inputs carrying the channels (the others are parameters: weights, scales, shapes)."""
    if node.op in BINARY_OPS or node.op == "Concat":
        return list(range(len(node.inputs)))
    return [0]


def _forward_axis(node: gs.Node, tensor: gs.Tensor, axis: int) -> int:
    """The output's channel axis given input ``tensor`` has it on ``axis``."""
    if node.op in RESHAPING_OPS:
        return ch.output_axis(node, axis)
    if node.op in BINARY_OPS:
        return axis + _rank(node.outputs[0]) - _rank(tensor)
    return axis


def _backward_axis(node: gs.Node, tensor: gs.Tensor, out_axis: int, output: gs.Tensor) -> int | None:
    """The channel axis of input ``tensor`` given the output has it on ``out_axis``; None when
    the input broadcasts along the channels."""
    if node.op in RESHAPING_OPS:
        return reshaped_input_axis(node, out_axis, tensor)
    if node.op not in BINARY_OPS:
        return out_axis
    shape = _constant_shape(tensor) or tensor.shape
    if shape is None:
        raise PermutationRefused(f"rank of {tensor.name} is unknown")
    axis = out_axis - (_rank(output) - len(shape))
    return None if axis < 0 or shape[axis] == 1 else axis


def _is_per_channel_on(node: gs.Node, axis: int) -> bool:
    """A Quantize/DequantizeLinear whose scale is a vector along the data's ``axis``."""
    scale = node.inputs[1]
    if scale.shape is None or len(scale.shape) == 0 or int(np.prod(scale.shape)) == 1:
        return False
    return int(node.attrs.get("axis", 1)) % _rank(node.inputs[0]) == axis


def _pads(node: gs.Node) -> list[int] | None:
    if "pads" in node.attrs:
        pads = list(node.attrs["pads"])
    else:
        tensor = node.inputs[1] if len(node.inputs) > 1 else None
        if not isinstance(tensor, gs.Constant):
            return None
        pads = np.asarray(tensor.values).reshape(-1).tolist()
    if len(node.inputs) > 3 and not node.inputs[3].is_empty():  # opset 18 axes: expand to every axis
        axes_tensor = node.inputs[3]
        if not isinstance(axes_tensor, gs.Constant):
            return None
        rank = _rank(node.inputs[0])
        full = [0] * (2 * rank)
        axes = [int(a) % rank for a in np.asarray(axes_tensor.values).reshape(-1)]
        for k, a in enumerate(axes):
            full[a], full[a + rank] = pads[k], pads[k + len(axes)]
        return full
    return pads


# --------------------------------------------------------------------------- rewriting
def _permute_input(graph: gs.Graph, node: gs.Node, index: int, axis: int, order: np.ndarray, names: NameFactory) -> None:
    tensor = node.inputs[index]
    if isinstance(tensor, gs.Constant):
        set_constant_input(graph, node, index, np.take(np.asarray(tensor.values), order, axis=axis), names)
        return
    dequantize = _exclusive_dequantize(graph, node, index, names)
    codes_rank = len(dequantize.inputs[0].shape)
    _permute_input(graph, dequantize, 0, axis, order, names)
    if _is_per_channel_on(dequantize, axis % codes_rank):
        for parameter in (1, 2):
            if len(dequantize.inputs) > parameter and not dequantize.inputs[parameter].is_empty():
                _permute_input(graph, dequantize, parameter, 0, order, names)


def _exclusive_dequantize(graph: gs.Graph, node: gs.Node, index: int, names: NameFactory) -> gs.Node:
    """The DequantizeLinear feeding input ``index`` of ``node``, cloned first when another
    node (or another input) reads it."""
    tensor = node.inputs[index]
    dequantize = producer(tensor)
    readers = [(reader, i) for reader in tensor.outputs for i, t in enumerate(reader.inputs) if t is tensor]
    if len(readers) == 1 and readers[0][0] is node and readers[0][1] == index and not is_graph_output(graph, tensor):
        return dequantize
    output = gs.Variable(names.new(f"{tensor.name}_permuted"), dtype=tensor.dtype, shape=tensor.shape)
    label = names.new(f"{dequantize.name or tensor.name}_permuted")
    clone = gs.Node("DequantizeLinear", label, dict(dequantize.attrs), list(dequantize.inputs), [output])
    graph.nodes.insert(graph.nodes.index(dequantize) + 1, clone)
    node.inputs[index] = output
    return clone
