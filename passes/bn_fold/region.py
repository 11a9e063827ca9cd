"""Find the root/leaf closure of one BatchNormalization and solve the per-tensor maps.

Discovery (the fixpoint of "To Fold or Not to Fold", restated over tensors): starting from
the seed tensor (backward: the BN input X; forward: the BN output Z), every *mapped* tensor
T is examined on both sides:

* its producer: transparent → its data inputs are mapped too; expressive (T is its output)
  → a root; a graph input, a constant or any other op → the fold is impossible;
* its consumers: transparent (T a data input) → their outputs are mapped too; expressive
  with T as data input → a leaf; anything else (activations, T used as a weight, …) → impossible;
* T must not be a graph output.

Discovery stays inside one graph (the main graph or one If/Loop/Scan body): a tensor
computed in an enclosing graph, or read by a node of another (a body reading an outer
tensor), blocks the fold.

Walking up from a leaf finds more roots and walking down from a root more leaves, so the
worklist closure is exactly the fixpoint of the paper.  Roots and leaves must be disjoint.

Solving: channel axes and scale vectors spread from the seed through the transparent nodes
until nothing changes (NaN = unconstrained, filled with 1 at the roots).  Shifts:
backward, the BN shift t is pushed up from X to exactly one root per Add (so several roots
into an Add get it once) and split across Concat inputs; forward, the only shift source is
the removed BN (−t/s on Z).  Then every map is recomputed forwards from the root maps,
which both checks consistency (the seed must get the required map) and enforces each
op's requirement (zero shift through padding and gates, positive scale through max).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import is_graph_output, node_label, producer

from ..common import channels as ch
from ..common.absorb import expressive_refusal, leaf_shift_refusal
from ..common.channels import ChannelMap, FoldImpossible, NotTransparent, input_axis_for
from ..common.layers import input_channel_axis, output_channel_axis
from ..common.ops import EXPRESSIVE_OPS

MAX_SPREAD_ROUNDS = 64



@dataclass
class Region:
    seed: gs.Tensor
    tensors: dict[str, gs.Tensor] = field(default_factory=dict)
    roots: dict[str, gs.Node] = field(default_factory=dict)
    leaves: dict[str, gs.Node] = field(default_factory=dict)
    transparent: dict[str, gs.Node] = field(default_factory=dict)
    #: constant operands of mapped Add/Sub nodes: they absorb the map like roots
    constants: dict[str, tuple[gs.Node, int]] = field(default_factory=dict)
    maps: dict[str, ChannelMap] = field(default_factory=dict)


def _key(node: gs.Node) -> str:
    return f"{id(node)}"


def constant_key(node: gs.Node, index: int) -> str:
    return f"{id(node)}:{index}"


def _enqueue_data_inputs(region: Region, node: gs.Node, indices: list[int], work: deque[gs.Tensor]) -> None:
    """Mapped inputs go on the worklist; a constant operand of an Add/Sub becomes a root."""
    for index in indices:
        tensor = node.inputs[index]
        if isinstance(tensor, gs.Constant):
            if node.op not in ch.JOIN_OPS:
                raise FoldImpossible(f"{node.op} {node_label(node)} has a constant operand")
            region.constants[constant_key(node, index)] = (node, index)
        else:
            work.append(tensor)


# --------------------------------------------------------------------------- discovery
def discover(graph: gs.Graph, bn: gs.Node, backward: bool) -> Region:
    seed = bn.inputs[0] if backward else bn.outputs[0]
    forbidden = bn.outputs[0] if backward else bn.inputs[0]
    region = Region(seed)
    here = {id(node) for node in graph.nodes}  # the fold stays inside ``graph`` (main graph or one body)
    work: deque[gs.Tensor] = deque([seed])
    while work:
        tensor = work.popleft()
        if tensor.name in region.tensors:
            continue
        if tensor is forbidden:
            raise FoldImpossible(f"the map would reach the BN's own {'output' if backward else 'input'}")
        region.tensors[tensor.name] = tensor
        if is_graph_output(graph, tensor):
            raise FoldImpossible(f"path reaches graph output {tensor.name}")
        if not (tensor is seed and not backward):
            if tensor.inputs and id(tensor.inputs[0]) not in here:
                raise FoldImpossible(f"path reaches {tensor.name}, computed in the graph enclosing this If/Loop/Scan body")
            _visit_producer(region, tensor, work)
        for consumer in list(tensor.outputs):
            if consumer is bn:
                continue
            if id(consumer) not in here:
                raise FoldImpossible(f"{tensor.name} is also read inside an If/Loop/Scan body ({consumer.op} {node_label(consumer)})")
            _visit_consumer(region, consumer, tensor, work)
    overlap = set(region.roots) & set(region.leaves)
    if overlap:
        node = region.roots[next(iter(overlap))]
        raise FoldImpossible(f"{node.op} {node_label(node)} would have to absorb the map and its inverse")
    return region


def _visit_producer(region: Region, tensor: gs.Tensor, work: deque[gs.Tensor]) -> None:
    node = producer(tensor)
    if node is None:
        kind = "constant" if isinstance(tensor, gs.Constant) else "graph input"
        raise FoldImpossible(f"path reaches {kind} {tensor.name}")
    if ch.is_transparent_op(node):
        try:
            indices = ch.data_inputs(node, tensor)
        except NotTransparent as exc:
            raise FoldImpossible(str(exc)) from None
        region.transparent[_key(node)] = node
        _enqueue_data_inputs(region, node, indices, work)
        work.extend(t for t in node.outputs if not t.is_empty())
        return
    refusal = expressive_refusal(node)
    if refusal is None and node.outputs[0] is tensor:
        region.roots[_key(node)] = node
        return
    raise FoldImpossible(_blocked(node, refusal or f"{tensor.name} is not its main output"))


def _blocked(node: gs.Node, refusal: str) -> str:
    if node.op not in EXPRESSIVE_OPS:
        return f"path to {node.op} {node_label(node)} blocks"
    return f"path to {node.op} {node_label(node)} blocks: {refusal}"


def _visit_consumer(region: Region, node: gs.Node, tensor: gs.Tensor, work: deque[gs.Tensor]) -> None:
    if ch.is_transparent_op(node):
        indices = ch.data_inputs(node, tensor)
        positions = [i for i, t in enumerate(node.inputs) if t is tensor]
        if not set(positions) <= set(indices):
            raise FoldImpossible(f"{tensor.name} is a parameter of {node.op} {node_label(node)}")
        region.transparent[_key(node)] = node
        _enqueue_data_inputs(region, node, indices, work)
        work.extend(t for t in node.outputs if not t.is_empty())
        return
    refusal = expressive_refusal(node)
    positions = [i for i, t in enumerate(node.inputs) if t is tensor]
    if refusal is None and positions == [0]:
        region.leaves[_key(node)] = node
        return
    raise FoldImpossible(_blocked(node, refusal or f"{tensor.name} is not its data input"))


# --------------------------------------------------------------------------- scales
def _channels(tensor: gs.Tensor, axis: int) -> int:
    channels = ch.channel_count(tensor, axis)
    if channels is None:
        raise FoldImpossible(f"channel count of {tensor.name} is not static (neither shape inference nor a neighbouring layer's weights give it)")
    return channels


def _merge(region: Region, tensor: gs.Tensor, axis: int, scale: np.ndarray) -> bool:
    """Record (axis, scale) for ``tensor``; True if this added information."""
    current = region.maps.get(tensor.name)
    if current is None:
        if len(scale) != _channels(tensor, axis):
            raise FoldImpossible(f"channel count mismatch at {tensor.name}")
        region.maps[tensor.name] = ChannelMap(axis, scale.copy(), np.zeros(len(scale)))
        return True
    if current.axis != axis or len(current.scale) != len(scale):
        raise FoldImpossible(f"channel axis of {tensor.name} is ambiguous")
    both = ~np.isnan(current.scale) & ~np.isnan(scale)
    if not np.allclose(current.scale[both], scale[both], rtol=1e-6, atol=0):
        raise FoldImpossible(f"{tensor.name} would need two different scales")
    fill = np.isnan(current.scale) & ~np.isnan(scale)
    current.scale[fill] = scale[fill]
    return bool(fill.any())


def spread_scales(region: Region, seed_axis: int, seed_scale: np.ndarray) -> None:
    _merge(region, region.seed, seed_axis, seed_scale)
    for _ in range(MAX_SPREAD_ROUNDS):
        changed = False
        for node in region.transparent.values():
            try:
                changed |= _spread_through(region, node)
            except NotTransparent as exc:
                raise FoldImpossible(f"{node.op} {node_label(node)}: {exc}") from None
        if not changed:
            break
    else:
        raise FoldImpossible("channel scales did not settle")
    missing = [t for t in region.tensors if t not in region.maps]
    if missing:
        raise FoldImpossible(f"channel axis of {missing[0]} cannot be determined")
    # Channels nothing constrains (dropped by a Slice on every path) keep scale 1.
    for channel_map in region.maps.values():
        channel_map.scale[np.isnan(channel_map.scale)] = 1.0


def _spread_through(region: Region, node: gs.Node) -> bool:
    indices = ch.data_inputs(node, next((t for t in node.inputs if t.name in region.tensors), None))
    inputs = [node.inputs[i] for i in indices]
    outputs = [t for t in node.outputs if not t.is_empty()]
    known_in = [region.maps.get(t.name) for t in inputs]
    known_out = [region.maps.get(t.name) for t in outputs]
    changed = False
    if node.op in ch.JOIN_OPS:
        source = next((m for m in known_in + known_out if m is not None), None)
        if source is not None:
            for tensor in [t for t in inputs if not isinstance(t, gs.Constant)] + outputs:
                changed |= _merge(region, tensor, source.axis, source.scale)
        return changed
    if node.op == "Concat":
        return _spread_concat(region, node, inputs, known_in, outputs[0], known_out[0])
    if node.op in ("Split", "Slice"):
        return _spread_selection(region, node, inputs[0], known_in[0], outputs, known_out)
    # same-vector ops: one data input, one output, the axis may move
    if known_in[0] is not None:
        changed |= _merge(region, outputs[0], ch.output_axis(node, known_in[0].axis), known_in[0].scale)
    if region.maps.get(outputs[0].name) is not None and known_in[0] is None:
        out = region.maps[outputs[0].name]
        axis = input_axis_for(node, out.axis, inputs[0])
        changed |= _merge(region, inputs[0], axis, out.scale)
    return changed


def _spread_concat(region, node, inputs, known_in, output, known_out) -> bool:  # type: ignore[no-untyped-def]
    axis = next((m.axis for m in [*known_in, known_out] if m is not None), None)
    if axis is None:
        return False
    changed = False
    if ch.concat_axis(node) != axis:
        source = next(m for m in [*known_in, known_out] if m is not None)
        for tensor in [*inputs, output]:
            changed |= _merge(region, tensor, axis, source.scale)
        return changed
    sizes = ch.channel_sizes(node, axis)
    pieces = [m.scale if m is not None else np.full(n, np.nan) for m, n in zip(known_in, sizes)]
    changed |= _merge(region, output, axis, np.concatenate(pieces))
    whole = region.maps[output.name].scale
    for tensor, piece in zip(inputs, np.split(whole, np.cumsum(sizes)[:-1])):
        changed |= _merge(region, tensor, axis, piece)
    return changed


def _spread_selection(region, node, data, known_in, outputs, known_out) -> bool:  # type: ignore[no-untyped-def]
    axis = known_in.axis if known_in is not None else next((m.axis for m in known_out if m is not None), None)
    if axis is None:
        return False
    channels = _channels(data, axis)
    pieces = _selections(node, axis, channels, len(outputs))
    changed = False
    if pieces is None:  # the channel axis is not sliced
        source = known_in or next(m for m in known_out if m is not None)
        for tensor in [data, *outputs]:
            changed |= _merge(region, tensor, axis, source.scale)
        return changed
    whole = known_in.scale.copy() if known_in is not None else np.full(channels, np.nan)
    for out, idx in zip(outputs, pieces):
        out_map = region.maps.get(out.name)
        if out_map is not None:
            missing = np.isnan(whole[idx])
            whole[idx[missing]] = out_map.scale[missing]
    changed |= _merge(region, data, axis, whole)
    for out, idx in zip(outputs, pieces):
        changed |= _merge(region, out, axis, region.maps[data.name].scale[idx])
    return changed


def _selections(node: gs.Node, axis: int, channels: int, n_outputs: int) -> list[np.ndarray] | None:
    if node.op == "Slice":
        idx = ch.slice_indices(node, axis, channels)
        return None if idx is None else [idx]
    rank = ch.tensor_rank(node.inputs[0])
    if rank is None:
        raise FoldImpossible(f"{node.op} {node_label(node)}: rank of its input unknown")
    if int(node.attrs.get("axis", 0)) % rank != axis:
        return None
    sizes = ch.split_sizes(node, axis)
    bounds = np.cumsum([0, *sizes])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(n_outputs)]


# --------------------------------------------------------------------------- shifts
def push_shift(region: Region, tensor: gs.Tensor, need: np.ndarray, root_shifts: dict[str, np.ndarray]) -> None:
    """Backward: give ``tensor`` the extra shift ``need`` by choosing which roots add it."""
    if not np.any(need):
        return
    node = producer(tensor)
    assert node is not None
    key = _key(node)
    if key in region.roots:
        root_shifts[key] = root_shifts.get(key, 0.0) + need
        return
    indices = ch.data_inputs(node, next((t for t in node.inputs if t.name in region.tensors), None))
    constant = next((i for i in indices if constant_key(node, i) in region.constants), None)
    if node.op in ch.JOIN_OPS and constant is not None:  # the cheapest root: a constant operand
        sign = -1.0 if node.op == "Sub" and constant == 1 else 1.0
        key = constant_key(node, constant)
        root_shifts[key] = root_shifts.get(key, 0.0) + sign * need
    elif node.op == "Add":
        push_shift(region, node.inputs[indices[0]], need, root_shifts)
    elif node.op == "Sub":
        push_shift(region, node.inputs[0], need, root_shifts)
    elif node.op == "Concat" and ch.concat_axis(node) == region.maps[tensor.name].axis:
        sizes = ch.channel_sizes(node, region.maps[tensor.name].axis)
        for index, piece in zip(indices, np.split(need, np.cumsum(sizes)[:-1])):
            push_shift(region, node.inputs[index], piece, root_shifts)
    elif node.op in ("Split", "Slice"):
        data = node.inputs[0]
        axis = region.maps[data.name].axis
        pieces = _selections(node, axis, _channels(data, axis), len(node.outputs))
        if pieces is None:
            push_shift(region, data, need, root_shifts)
        else:
            full = np.zeros(_channels(data, axis))
            position = [i for i, t in enumerate(node.outputs) if t is tensor][0]
            full[pieces[position]] = need
            push_shift(region, data, full, root_shifts)
    elif node.op == "Concat":  # joined along another axis: every part needs the shift
        for index in indices:
            push_shift(region, node.inputs[index], need, root_shifts)
    else:
        push_shift(region, node.inputs[indices[0]], need, root_shifts)


def recompute(region: Region, ordered_nodes: list[gs.Node], sources: dict[str, ChannelMap]) -> dict[str, ChannelMap]:
    """Forward evaluation of every mapped tensor from the source maps (roots, forward seed),
    enforcing each transparent op's requirement."""
    values: dict[str, ChannelMap] = dict(sources)
    for node in ordered_nodes:
        if _key(node) not in region.transparent:
            continue
        indices = ch.data_inputs(node, next((t for t in node.inputs if t.name in region.tensors), None))
        inputs = [values[constant_key(node, i)] if constant_key(node, i) in region.constants else values[node.inputs[i].name] for i in indices]
        requirement = ch.requirement(node)
        if requirement == "zero-shift" and any(np.any(m.shift) for m in inputs):
            raise FoldImpossible(f"the shift cannot pass {node.op} {node_label(node)} (zero padding or gate)")
        if requirement == "positive-scale" and any(np.any(m.scale <= 0) for m in inputs):
            raise FoldImpossible(f"a negative scale cannot pass {node.op} {node_label(node)}")
        for out in (t for t in node.outputs if not t.is_empty()):
            target = region.maps[out.name]
            values[out.name] = ChannelMap(target.axis, target.scale.copy(), _output_shift(region, node, indices, inputs, out))
    return values


def _output_shift(region: Region, node: gs.Node, indices: list[int], inputs: list[ChannelMap], out: gs.Tensor) -> np.ndarray:
    if node.op == "Add":
        return sum((m.shift for m in inputs), np.zeros_like(inputs[0].shift))
    if node.op == "Sub":
        return inputs[0].shift - inputs[1].shift
    if node.op == "Concat":
        if ch.concat_axis(node) == inputs[0].axis:
            return np.concatenate([m.shift for m in inputs])
        if any(not np.allclose(m.shift, inputs[0].shift) for m in inputs):
            raise FoldImpossible(f"Concat {node_label(node)} joins different shifts")
        return inputs[0].shift.copy()
    if node.op in ("Split", "Slice"):
        data = node.inputs[0]
        pieces = _selections(node, inputs[0].axis, _channels(data, inputs[0].axis), len(node.outputs))
        if pieces is None:
            return inputs[0].shift.copy()
        position = [i for i, t in enumerate(node.outputs) if t is out][0]
        return inputs[0].shift[pieces[position]]
    return inputs[0].shift.copy()


def root_axis_refusal(node: gs.Node, axis: int) -> str | None:
    rank = ch.tensor_rank(node.outputs[0])
    if rank is None or axis != output_channel_axis(node) % rank:
        return f"{node.op} {node_label(node)}: the map is not on its output channels"
    return None


def leaf_refusal(node: gs.Node, value: ChannelMap) -> str | None:
    rank = ch.tensor_rank(node.inputs[0])
    if rank is None or value.axis != input_channel_axis(node) % rank:
        return f"{node.op} {node_label(node)}: the map is not on its input channels"
    if np.any(value.shift):
        reason = leaf_shift_refusal(node)
        if reason:
            return f"{node.op} {node_label(node)}: {reason}"
    return None
