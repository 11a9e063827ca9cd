"""Channel bookkeeping for the nodes a per-channel affine map can cross.

A per-channel affine map on a tensor is ``(axis, scale, shift)``: the new tensor equals
``scale·old + shift`` broadcast along ``axis``.  A *transparent* node commutes with such a
map: given the map on its data inputs, the map on its outputs is again per-channel (maybe on
another axis, maybe a sub-vector or a concatenation).  This module says, per op type:

* which inputs carry the map (``data_inputs``; the rest are parameters, never mapped);
* where the channel axis goes and which channels survive (``forward``), and the inverse
  relation from an output back to the inputs (``backward``);
* what the op requires of the map to stay exact (``requirement``): the shift must be 0
  through zero padding (Pad, padded AveragePool counting the pad) and through a gate
  (``Mul``: (s·x)·g = s·(x·g) but (s·x + t)·g ≠ s·(x·g) + t), the scale must be positive
  through a max (max(s·x) = s·max(x) only for s > 0).

Vectors use NaN for channels nothing constrains yet (e.g. channels a Slice drops).

Shapes (:func:`tensor_rank`, :func:`channel_count`): ONNX shape inference gives most of
them, but exported models often defeat it (a ``-1`` or symbolic batch, dynamic H/W, a
Reshape or Resize whose shape is computed at run time).  A tensor next to a layer still has
a known rank and channel count: a Conv output has ``W.shape[0]`` channels and rank
``W.ndim``, a Conv input ``W.shape[1]·group``, a BatchNormalization input or output as
many channels as its scale.  Dimensions ≤ 0 (``-1`` written by some exporters) count as
unknown.  A fold that only needs the channel count never depends on the other dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import constant_values, has_padding, is_default_domain, node_label, optional_input, string_attr

SAME_VECTOR_OPS = frozenset(
    {
        "Identity",
        "Dropout",
        "Resize",
        "AveragePool",
        "GlobalAveragePool",
        "MaxPool",
        "GlobalMaxPool",
        "Pad",
        "Flatten",
        "Reshape",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "ReduceMean",
        "Mul",
    }
)
JOIN_OPS = frozenset({"Add", "Sub"})
CHANNEL_SPLITTING_OPS = frozenset({"Concat", "Split", "Slice"})
TRANSPARENT_OPS = SAME_VECTOR_OPS | JOIN_OPS | CHANNEL_SPLITTING_OPS


@dataclass
class ChannelMap:
    """``new = scale·old + shift`` along ``axis`` (vectors of the channel count)."""

    axis: int
    scale: np.ndarray
    shift: np.ndarray

    @staticmethod
    def unknown(axis: int, channels: int) -> "ChannelMap":
        return ChannelMap(axis, np.full(channels, np.nan), np.full(channels, np.nan))


class FoldImpossible(Exception):
    """The map cannot be folded (or permuted) in this direction; the message is the reason."""


class NotTransparent(Exception):
    """The node cannot carry the map; the message says why."""


# --------------------------------------------------------------------------- which inputs
def is_transparent_op(node: gs.Node) -> bool:
    if node.op not in TRANSPARENT_OPS or not is_default_domain(node):
        return False
    if node.op == "Dropout":
        mask_used = len(node.outputs) > 1 and bool(node.outputs[1].outputs)
        training = constant_values(node, 2)
        return not mask_used and (training is None or not bool(training.reshape(-1)[0]))
    if node.op == "MaxPool":
        return len([t for t in node.outputs if not t.is_empty()]) == 1
    if node.op == "Resize":
        transform = string_attr(node, "coordinate_transformation_mode", "half_pixel")
        return string_attr(node, "mode", "nearest") in ("nearest", "linear") and transform != "tf_crop_and_resize"
    if node.op == "Pad":
        value = constant_values(node, 2)
        return string_attr(node, "mode", "constant") in ("constant", "reflect", "edge") and (value is None or not np.any(value))
    return True


def data_inputs(node: gs.Node, via: gs.Tensor | None) -> list[int]:
    """Indices of the inputs of ``node`` that carry the map, knowing it was reached through
    tensor ``via`` (an input, or None/an output when reached from downstream)."""
    if node.op in JOIN_OPS or node.op == "Concat":
        return list(range(len(node.inputs)))
    if node.op == "Mul":
        indices = [i for i, t in enumerate(node.inputs) if t is via]
        if indices:
            return indices[:1]
        variables = [i for i, t in enumerate(node.inputs) if not isinstance(t, gs.Constant)]
        if len(variables) == 1:
            return variables
        raise NotTransparent("Mul of two computed tensors reached from its output: cannot tell the gate")
    return [0]


# --------------------------------------------------------------------------- axis moves
def output_axis(node: gs.Node, axis: int) -> int:
    """Where the channel axis ``axis`` of the data input lands in the output."""
    op = node.op
    if op == "Transpose":
        perm = node.attrs.get("perm")
        if perm is None:
            rank = _rank(node.inputs[0])
            perm = list(range(rank))[::-1]
        return list(perm).index(axis)
    if op == "ReduceMean":
        axes = _reduce_axes(node)
        if axis in axes:
            raise NotTransparent("ReduceMean reduces the channel axis")
        if node.attrs.get("keepdims", 1):
            return axis
        return axis - sum(1 for a in axes if a < axis)
    if op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
        return _reshaped_axis(node, axis)
    return axis


def _rank(tensor: gs.Tensor) -> int:
    rank = tensor_rank(tensor)
    if rank is None:
        raise NotTransparent(f"rank of {tensor.name} unknown")
    return rank


# --------------------------------------------------------------------------- shapes
def static_dim(dim: object) -> int | None:
    """``dim`` as an int when it is a known positive size (symbols, None and ≤ 0 are not)."""
    if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim > 0:
        return int(dim)
    return None


def tensor_rank(tensor: gs.Tensor) -> int | None:
    """The rank of ``tensor``: from its inferred shape, else from the layers around it."""
    if tensor.shape is not None:
        return len(tensor.shape)
    return _layer_facts(tensor)[0]


def channel_count(tensor: gs.Tensor, axis: int) -> int | None:
    """The size of ``tensor`` along ``axis``: from its inferred shape when static, else (axis 1)
    from the weights of the layers producing or reading it; None when nothing tells."""
    shape = tensor.shape
    if shape is not None and axis < len(shape) and static_dim(shape[axis]) is not None:
        return static_dim(shape[axis])
    if axis != 1:
        return None
    return _layer_facts(tensor)[1]


def _layer_facts(tensor: gs.Tensor) -> tuple[int | None, int | None]:
    """(rank, channels on axis 1) of ``tensor`` told by the layers producing or reading it."""
    facts = []
    if tensor.inputs:
        facts.append(_output_facts(tensor.inputs[0], tensor))
    facts.extend(_input_facts(node) for node in tensor.outputs if node.inputs and node.inputs[0] is tensor)
    rank = next((r for r, _ in facts if r is not None), None)
    channels = next((c for _, c in facts if c is not None), None)
    return rank, channels


def _layer_weight(node: gs.Node) -> np.ndarray | None:
    if not is_default_domain(node) or node.op not in ("Conv", "ConvTranspose"):
        return None
    weight = constant_values(node, 1)
    return weight if weight is not None and weight.ndim >= 3 else None


def _bn_channels(node: gs.Node) -> int | None:
    if node.op != "BatchNormalization" or not is_default_domain(node):
        return None
    scale = constant_values(node, 1)
    return None if scale is None else int(scale.size)


def _output_facts(node: gs.Node, tensor: gs.Tensor) -> tuple[int | None, int | None]:
    if not node.outputs or node.outputs[0] is not tensor:
        return None, None
    weight = _layer_weight(node)
    if weight is not None:
        groups = int(node.attrs.get("group", 1))
        channels = weight.shape[0] if node.op == "Conv" else weight.shape[1] * groups
        return weight.ndim, int(channels)
    channels = _bn_channels(node)
    if channels is not None:
        return tensor_rank(node.inputs[0]), channels
    return None, None


def _input_facts(node: gs.Node) -> tuple[int | None, int | None]:
    weight = _layer_weight(node)
    if weight is not None:
        channels = weight.shape[1] * int(node.attrs.get("group", 1)) if node.op == "Conv" else weight.shape[0]
        return weight.ndim, int(channels)
    return None, _bn_channels(node)


def _reduce_axes(node: gs.Node) -> list[int]:
    rank = _rank(node.inputs[0])
    axes = node.attrs.get("axes")
    if axes is None:
        values = constant_values(node, 1)
        if values is None:
            if optional_input(node, 1) is not None:
                raise NotTransparent("ReduceMean axes are not constant")
            raise NotTransparent("ReduceMean over all axes reduces the channel axis")
        axes = values.tolist()
    return [a % rank for a in axes]


def _reshaped_axis(node: gs.Node, axis: int) -> int:
    """The output axis holding the whole channel dimension, from static shapes: the channel
    dimension survives a reshape iff some output axis has its size and the same product of
    trailing dimensions."""
    in_shape, out_shape = node.inputs[0].shape, node.outputs[0].shape
    if in_shape is None or out_shape is None:
        raise NotTransparent(f"{node.op} without known shapes")
    channels = channel_count(node.inputs[0], axis)
    trailing = in_shape[axis + 1 :]
    if channels is None or not all(static_dim(d) for d in trailing):
        raise NotTransparent(f"{node.op}: channel or trailing dimensions are not static")
    inner = int(np.prod(trailing, dtype=np.int64))
    for out_axis, size in enumerate(out_shape):
        out_trailing = out_shape[out_axis + 1 :]
        if static_dim(size) == channels and all(static_dim(d) for d in out_trailing):
            if int(np.prod(out_trailing, dtype=np.int64)) == inner:
                return out_axis
    raise NotTransparent(f"{node.op} mixes the channel axis with other dimensions")


# --------------------------------------------------------------------------- channel selection
def concat_axis(node: gs.Node) -> int:
    rank = _rank(node.outputs[0])
    return int(node.attrs.get("axis", 0)) % rank


def channel_sizes(node: gs.Node, axis: int) -> list[int]:
    """Channel counts of the Concat inputs along ``axis`` (static shapes required)."""
    return _static_counts(node.inputs, axis, "Concat input")


def split_sizes(node: gs.Node, axis: int) -> list[int]:
    """Sizes of the Split outputs along ``axis``."""
    return _static_counts(node.outputs, axis, "Split output")


def _static_counts(tensors: Sequence[gs.Tensor], axis: int, what: str) -> list[int]:
    sizes = []
    for tensor in tensors:
        dim = channel_count(tensor, axis)
        if dim is None:
            raise NotTransparent(f"{what} {tensor.name} has no static channel count")
        sizes.append(dim)
    return sizes


def slice_indices(node: gs.Node, axis: int, channels: int) -> np.ndarray | None:
    """Channel indices a Slice keeps along ``axis`` (None when it does not slice that axis)."""
    starts, ends = constant_values(node, 1), constant_values(node, 2)
    if starts is None or ends is None:
        raise NotTransparent("Slice bounds are not constant")
    rank = _rank(node.inputs[0])
    axes = constant_values(node, 3)
    axes = list(range(len(starts))) if axes is None else [a % rank for a in axes.tolist()]
    steps = constant_values(node, 4)
    steps = [1] * len(starts) if steps is None else steps.tolist()
    if optional_input(node, 3) is not None and constant_values(node, 3) is None:
        raise NotTransparent("Slice axes are not constant")
    if axis not in axes:
        return None
    k = axes.index(axis)
    return np.arange(channels)[slice(*slice(int(starts[k]), int(ends[k]), int(steps[k])).indices(channels))]


# --------------------------------------------------------------------------- requirements
def requirement(node: gs.Node) -> str | None:
    """'zero-shift', 'positive-scale' or None: what the op needs of the map to stay exact."""
    op = node.op
    if op == "Mul":
        return "zero-shift"
    if op == "Pad" and string_attr(node, "mode", "constant") == "constant":
        return "zero-shift"
    if op == "AveragePool" and node.attrs.get("count_include_pad", 0) and (has_padding(node) or node.attrs.get("ceil_mode", 0)):
        return "zero-shift"  # windows counting padding (explicit, or past the border with ceil_mode)
    if op in ("MaxPool", "GlobalMaxPool"):
        return "positive-scale"
    return None


def input_axis_for(node: gs.Node, out_axis: int, data: gs.Tensor) -> int:
    """The input axis that ``output_axis`` maps onto ``out_axis``."""
    rank = tensor_rank(data) or 0
    for axis in range(rank):
        try:
            if output_axis(node, axis) == out_axis:
                return axis
        except NotTransparent:
            continue
    raise FoldImpossible(f"{node.op} {node_label(node)}: cannot trace the channel axis back")
