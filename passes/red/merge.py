"""merge-neurons: merge redundant output neurons of a layer into one (RED / RED++, thesis §2.1).

Before::   x ── Conv(W: n×…, b) ── Relu ── Conv(V: m×n×…) ── y      (W_j = W_i, b_j = b_i)
After::    x ── Conv(W: (n−1)×…) ── Relu ── Conv(V': m×(n−1)×…) ── y   V'[:, i] = V[:, i] + V[:, j]

Maths (docs/pruning.md, thesis eqs. 2.2 and 2.5):

* **exact**: neurons i, j whose whole per-channel signature is identical (producer weight row
  and bias, and the per-channel parameters of every node on the path: BN rows, depthwise
  kernels, per-channel constants) compute the same activation σ(z_i) = σ(z_j) for any
  element-wise σ, so j is dropped and the consumer's column j is added to column i (eq. 2.2);
* **angular** (option ``angular``, default on): when W_j = λW_i and b_j = λb_i with λ > 0
  and every node on the path is positively homogeneous (Relu, LeakyRelu, Max/AveragePool,
  Flatten — not Clip/ReLU6, Gelu, Sigmoid, HardSwish, BN, ...), σ(λz) = λσ(z) so column i
  receives λ·column j (eq. 2.5);
* **channel alignment** (option ``channel_multiple``, default 8): a layer whose channel count
  is a multiple of 8 keeps a multiple of 8 (fewer merges), because ORT's blocked NCHWc
  kernels need it — unaligned counts made a merged MobileNetV2 2× slower (bench/red.py);
  1 disables it;
* **α relaxation** (option ``alpha`` ∈ [0, 1], default 0, lossy): additionally merge ⌊α·n⌋
  of the remaining neurons: the closest pairs (Euclidean distance of the signatures,
  nearest neighbours from a ``scipy.spatial.cKDTree``), each pair replaced by its
  barycenter and the consumer columns summed.  The stats report the relative change of the
  merged signatures (``alpha_relative_change``).

The producer is a Conv (group 1), a Gemm (transA 0, alpha = beta = 1) or a MatMul with a
constant weight; the path to the single consumer (Conv group 1 / Gemm / MatMul reading the
tensor as its data input, constant weight) may cross element-wise activations, BN, Max/
AveragePool (global too), per-channel constant Add/Sub/Mul, Flatten of a 1×1 map,
Concat on the channel axis (the channels are tracked at their offset; the other inputs are
untouched) and depthwise Convs (their channel is pruned too and ``group`` updated).

Refused (with the reason): a path tensor that is a graph output ("merged channel reaches
a graph output"), fan-out (several readers: residual Adds share the channel
with other branches, so such layers are skipped: merging across a residual Add would need
every producer of the residual stream to merge the same channels), any other op on the path, grouped (non
depthwise) Convs, non-constant weights.  Nothing is mutated before a layer's checks pass;
shared initializers are copied on write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from scipy.spatial import cKDTree

from onnxopt.graph import (
    NameFactory,
    cleanup,
    constant_values,
    is_default_domain,
    is_graph_output,
    node_label,
    optional_input,
    set_constant_input,
)
from onnxopt.options import OptionProblem, PassOptions
from onnxopt.pass_base import Pass, PassContext, PassResult, Stage
from ..common.layers import transposed_weight
from ..common.ops import ELEMENTWISE_OPS, HOMOGENEOUS_OPS, POOL_OPS

CONSTANT_ARITHMETIC = frozenset({"Add", "Sub", "Mul"})


class Refused(Exception):
    """The layer is skipped; the message says why."""


@dataclass
class Component:
    """Per-channel parameters (n × d rows of the producer's channels) and how to write back:
    ``write(rows of the kept channels, kept indices, dropped indices)``."""

    rows: np.ndarray
    write: Callable[[np.ndarray, np.ndarray, np.ndarray], None]


@dataclass
class LayerMatch:
    producer: gs.Node
    channels: int
    components: list[Component]
    consumer: gs.Node | None = None
    consumer_write: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None  # (n × n_keep combination, keep, drop)
    path_tensors: list[tuple[gs.Tensor, int, int]] = field(default_factory=list)  # (tensor, channel axis, channel count)
    path_writes: list[Callable[[int], None]] = field(default_factory=list)  # group updates, given the dropped count
    homogeneous: bool = True


@dataclass
class Channels:
    """Where the producer's channels are in the current tensor: indices ``idx`` on ``axis``
    of a channel dimension of size ``total`` (offsets after a Concat)."""

    axis: int
    idx: np.ndarray
    total: int


# --------------------------------------------------------------------------- match
def _float_constant(node: gs.Node, index: int, what: str) -> np.ndarray:
    tensor = optional_input(node, index)
    if not isinstance(tensor, gs.Constant):
        raise Refused(f"{what} of {node.op} {node_label(node)} is not an initializer")
    values = np.asarray(tensor.values)
    if values.dtype.kind != "f":
        raise Refused(f"{what} of {node.op} {node_label(node)} is not float")
    return values


def _rows(graph, node, index, values, dim, where: Channels, names) -> Component:
    """Rows ``where.idx`` of input ``index`` whose dimension ``dim`` indexes the channels."""
    if values.shape[dim] != where.total:
        raise Refused(f"{node.op} {node_label(node)} parameter has {values.shape[dim]} channels, expected {where.total}")
    moved = np.moveaxis(values, dim, 0)
    idx = where.idx

    def write(rows: np.ndarray, keep: np.ndarray, drop: np.ndarray) -> None:
        full = moved.reshape(where.total, -1).copy()
        full[idx[keep]] = rows
        full = np.delete(full, idx[drop], axis=0).reshape(where.total - drop.size, *moved.shape[1:])
        set_constant_input(graph, node, index, np.moveaxis(full, 0, dim).astype(values.dtype), names)

    return Component(moved.reshape(where.total, -1)[idx], write)


def _columns(graph, node, values, dim, where: Channels, names) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """The consumer's input columns (dimension ``dim`` of its weight): kept ones combined."""
    moved = np.moveaxis(values, dim, 0).astype(np.float64)
    idx = where.idx

    def write(combination: np.ndarray, keep: np.ndarray, drop: np.ndarray) -> None:
        full = moved.copy()
        full[idx[keep]] = np.tensordot(combination.T, moved[idx], axes=1)
        full = np.delete(full, idx[drop], axis=0)
        set_constant_input(graph, node, 1, np.moveaxis(full, 0, dim).astype(values.dtype), names)

    return write


def _producer(graph: gs.Graph, node: gs.Node, names: NameFactory) -> tuple[list[Component], Channels]:
    """Components and channel position of a producer layer's output."""
    if node.op == "Conv":
        if node.attrs.get("group", 1) != 1:
            raise Refused("grouped Conv producer")
        weight = _float_constant(node, 1, "weight")
        where = Channels(1, np.arange(weight.shape[0]), weight.shape[0])
        comps = [_rows(graph, node, 1, weight, 0, where, names)]
        if optional_input(node, 2) is not None:
            comps.append(_rows(graph, node, 2, _float_constant(node, 2, "bias"), 0, where, names))
        return comps, where
    if node.op == "Gemm":
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0:
            raise Refused("Gemm with transA or alpha/beta ≠ 1")
        weight = _float_constant(node, 1, "weight")
        dim = 0 if transposed_weight(node) else 1
        where = Channels(1, np.arange(weight.shape[dim]), weight.shape[dim])
        comps = [_rows(graph, node, 1, weight, dim, where, names)]
        if optional_input(node, 2) is not None:
            bias = _float_constant(node, 2, "bias")
            if bias.size != where.total or bias.shape[-1] != where.total:
                raise Refused("Gemm bias is not per output neuron")
            comps.append(_rows(graph, node, 2, bias, bias.ndim - 1, where, names))
        return comps, where
    if node.op == "MatMul":
        weight = _float_constant(node, 1, "weight")
        if weight.ndim != 2:
            raise Refused("MatMul weight is not 2-D")
        if node.outputs[0].shape is None:
            raise Refused("MatMul output rank unknown")
        where = Channels(len(node.outputs[0].shape) - 1, np.arange(weight.shape[1]), weight.shape[1])
        return [_rows(graph, node, 1, weight, 1, where, names)], where
    raise Refused(f"{node.op} is not a mat-vec layer")


def _path_node(graph, node, tensor, where: Channels, names, match: LayerMatch) -> Channels:
    """Add the per-channel parameters of path node ``node``; return where the channels go."""
    op = node.op
    match.homogeneous &= op in HOMOGENEOUS_OPS
    if op == "Concat":
        return _through_concat(node, tensor, where)
    if node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
        raise Refused(f"{op} {node_label(node)} reads the channel tensor as a parameter")
    if op in ELEMENTWISE_OPS:
        if op == "PRelu":
            raise Refused("PRelu on the path (per-channel slope)")
        return where
    if op in POOL_OPS:
        if where.axis != 1:
            raise Refused(f"{op} on a non-channel-first tensor")
        if op == "MaxPool" and len([t for t in node.outputs if not t.is_empty()]) > 1:
            raise Refused("MaxPool with an indices output")
        return where
    if op == "Flatten":
        shape = node.inputs[0].shape
        if where.axis != 1 or node.attrs.get("axis", 1) != 1 or shape is None or any(d != 1 for d in shape[2:]):
            raise Refused("Flatten of a map larger than 1×1")
        return where
    if op == "BatchNormalization":
        if where.axis != 1 or len([t for t in node.outputs if not t.is_empty()]) > 1:
            raise Refused("BN not on the channel axis 1 / in training mode")
        for index in range(1, 5):
            match.components.append(_rows(graph, node, index, _float_constant(node, index, "BN parameter"), 0, where, names))
        return where
    if op in CONSTANT_ARITHMETIC:
        const = constant_values(node, 1)
        if const is None or node.outputs[0].shape is None:
            raise Refused(f"{op} of two computed tensors (residual branch) on the path")
        if const.size == 1:
            return where
        rank = len(node.outputs[0].shape)
        dim = where.axis - (rank - const.ndim)
        if dim < 0 or not _per_channel_constant(const, dim, where.total):
            raise Refused(f"{op} constant is not per channel")
        match.components.append(_rows(graph, node, 1, const, dim, where, names))
        return where
    if op == "Conv":
        weight = _float_constant(node, 1, "weight")
        if where.axis != 1 or node.attrs.get("group", 1) != where.total or weight.shape[0] != where.total:
            raise Refused("grouped Conv (not depthwise with multiplier 1) on the path")
        match.components.append(_rows(graph, node, 1, weight, 0, where, names))
        if optional_input(node, 2) is not None:
            match.components.append(_rows(graph, node, 2, _float_constant(node, 2, "bias"), 0, where, names))
        match.path_writes.append(lambda dropped, c=node, total=where.total: c.attrs.__setitem__("group", total - dropped))
        match.homogeneous = False
        return where
    raise Refused(f"{op} {node_label(node)} between producer and consumer")


def _per_channel_constant(values: np.ndarray, dim: int, total: int) -> bool:
    return values.shape[dim] == total and all(d == 1 for i, d in enumerate(values.shape) if i != dim)


def _through_concat(node: gs.Node, tensor: gs.Tensor, where: Channels) -> Channels:
    rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
    if rank is None or int(node.attrs.get("axis", 0)) % rank != where.axis:
        raise Refused("Concat not on the channel axis (or of unknown rank)")
    positions = [i for i, t in enumerate(node.inputs) if t is tensor]
    if len(positions) != 1:
        raise Refused("Concat reads the channel tensor more than once")
    sizes = []
    for t in node.inputs:
        dim = t.shape[where.axis] if t.shape is not None else None
        if not isinstance(dim, (int, np.integer)):
            raise Refused(f"Concat input {t.name} has no static channel count")
        sizes.append(int(dim))
    offset = sum(sizes[: positions[0]])
    return Channels(where.axis, where.idx + offset, sum(sizes))


def _consumer_writer(graph, node: gs.Node, tensor: gs.Tensor, where: Channels, names: NameFactory):
    """How to combine the consumer's input columns, or None if ``node`` is not a consumer layer."""
    if node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]) or not isinstance(optional_input(node, 1), gs.Constant):
        return None
    weight = np.asarray(node.inputs[1].values)
    if weight.dtype.kind != "f":
        return None
    if node.op == "Conv" and node.attrs.get("group", 1) == 1 and where.axis == 1 and weight.shape[1] == where.total:
        return _columns(graph, node, weight, 1, where, names)
    if node.op == "Gemm" and not node.attrs.get("transA", 0) and where.axis == 1:
        dim = 1 if transposed_weight(node) else 0
        if weight.shape[dim] == where.total:
            return _columns(graph, node, weight, dim, where, names)
    rank = len(tensor.shape) if tensor.shape is not None else None
    if node.op == "MatMul" and weight.ndim == 2 and weight.shape[0] == where.total and rank is not None and where.axis == rank - 1:
        return _columns(graph, node, weight, 0, where, names)
    return None


def match_layer(graph: gs.Graph, producer: gs.Node, names: NameFactory) -> LayerMatch:
    components, where = _producer(graph, producer, names)
    tensor = producer.outputs[0]
    match = LayerMatch(producer, where.idx.size, components)
    for _ in range(64):  # paths are short; bounded walk
        if is_graph_output(graph, tensor):
            raise Refused("merged channel reaches a graph output")
        match.path_tensors.append((tensor, where.axis, where.total))
        readers = list(tensor.outputs)
        if len(readers) != 1:
            raise Refused(f"{tensor.name} has {len(readers)} readers (residual Add / fan-out: channels shared with other branches)")
        node = readers[0]
        if not is_default_domain(node):
            raise Refused(f"custom-domain node {node_label(node)} on the path")
        if node.op in ("Conv", "Gemm", "MatMul") and (node.op != "Conv" or node.attrs.get("group", 1) == 1):
            writer = _consumer_writer(graph, node, tensor, where, names)
            if writer is None:
                raise Refused(f"{node.op} {node_label(node)} reads the channels but cannot absorb the merge")
            match.consumer, match.consumer_write = node, writer
            return match
        where = _path_node(graph, node, tensor, where, names, match)
        tensor = node.outputs[0]
    raise Refused("path too long")


# --------------------------------------------------------------------------- grouping
@dataclass
class Grouping:
    target: np.ndarray  # channel → kept channel it merges into
    scale: np.ndarray  # λ of the channel in its target's consumer column
    exact: int = 0
    angular: int = 0
    relaxed: int = 0
    relative_change: float = 0.0
    relaxed_sources: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    undone: int = 0


def exact_groups(signature: np.ndarray) -> Grouping:
    _, first, inverse = np.unique(signature, axis=0, return_index=True, return_inverse=True)
    target = first[inverse.reshape(-1)]
    return Grouping(target, np.ones(len(signature)), exact=int(np.sum(target != np.arange(len(signature)))))


def angular_groups(signature: np.ndarray, grouping: Grouping, rtol: float = 1e-6) -> None:
    """Merge kept channels whose signatures are positive multiples of each other."""
    kept = np.flatnonzero(grouping.target == np.arange(len(signature)))
    norms = np.linalg.norm(signature[kept], axis=1)
    kept, norms = kept[norms > 0], norms[norms > 0]
    if kept.size < 2:
        return
    unit = signature[kept] / norms[:, None]
    _, first, inverse = np.unique(np.round(unit, 6), axis=0, return_index=True, return_inverse=True)
    rep = kept[first[inverse.reshape(-1)]]
    lam = norms / np.linalg.norm(signature[rep], axis=1)
    ok = (rep != kept) & np.all(np.abs(lam[:, None] * signature[rep] - signature[kept]) <= rtol * norms[:, None], axis=1)
    _redirect(grouping, kept[ok], rep[ok], lam[ok])
    grouping.angular += int(ok.sum())


def _redirect(grouping: Grouping, sources: np.ndarray, targets: np.ndarray, lam: np.ndarray) -> None:
    """Channels currently merged into ``sources`` (and the sources) now go to ``targets``."""
    if sources.size == 0:
        return
    mapping = np.arange(len(grouping.target))
    factor = np.ones(len(grouping.target))
    mapping[sources], factor[sources] = targets, lam
    grouping.scale = grouping.scale * factor[grouping.target]
    grouping.target = mapping[grouping.target]


def relaxed_groups(signature: np.ndarray, grouping: Grouping, alpha: float, multiple: int = 1) -> np.ndarray:
    """α relaxation: merge the closest pairs of kept channels into their barycenter; returns
    the updated signature.  With ``multiple`` > 1 the budget is rounded so that the kept
    count lands on the nearest multiple (when the layer had one)."""
    kept = np.flatnonzero(grouping.target == np.arange(len(signature)))
    budget = int(np.floor(alpha * len(kept)))
    if multiple > 1 and len(signature) % multiple == 0 and budget > 0:
        # the nearest multiple (not the lower one: for a 32-channel layer α = 5 % would become 25 %)
        target = max(int(round((kept.size - budget) / multiple)) * multiple, multiple)
        budget = max(kept.size - target, 0)
    if budget == 0 or kept.size < 2:
        return signature
    distance, neighbour = cKDTree(signature[kept]).query(signature[kept], k=2)
    order = np.argsort(distance[:, 1], kind="stable")
    used = np.zeros(kept.size, dtype=bool)
    sources, targets = [], []
    for a in order:  # greedy disjoint pairs over at most #kept candidates
        b = neighbour[a, 1]
        if used[a] or used[b]:
            continue
        used[a] = used[b] = True
        keep, drop = min(a, b), max(a, b)
        sources.append(kept[drop]), targets.append(kept[keep])
        if len(sources) == budget:
            break
    sources, targets = np.asarray(sources), np.asarray(targets)
    updated = signature.copy()
    updated[targets] = 0.5 * (signature[targets] + signature[sources])
    moved = np.linalg.norm(updated[targets] - signature[targets]) + np.linalg.norm(updated[targets] - signature[sources])
    grouping.relative_change = float(moved / max(np.linalg.norm(signature[np.r_[targets, sources]]), 1e-30))
    _redirect(grouping, sources, targets, np.ones(sources.size))
    grouping.relaxed += int(sources.size)
    grouping.relaxed_sources = np.flatnonzero(np.isin(grouping.target, targets) & (grouping.target != np.arange(len(signature))))
    return updated


# --------------------------------------------------------------------------- rewrite
def align_kept(grouping: Grouping, multiple: int) -> None:
    """Undo exact/angular merges (their channels keep their own, unchanged rows) until the
    kept count is a multiple of ``multiple``, for layers whose count was one: ORT's blocked
    NCHWc kernels need channel counts that are multiples of 8 (measured: a MobileNetV2 with
    ragged channel counts ran 2× slower)."""
    n = grouping.target.size
    if multiple <= 1 or n % multiple:
        return
    dropped = np.flatnonzero(grouping.target != np.arange(n))
    kept = n - dropped.size
    undo = (-kept) % multiple
    if undo == 0:
        return
    restorable = dropped[grouping.scale[dropped] > 0]  # exact/angular members (α barycenters are kept merged)
    restorable = restorable[np.isin(restorable, grouping.relaxed_sources, invert=True)]
    chosen = restorable[::-1][:undo]
    if chosen.size < undo:
        return
    grouping.target[chosen] = chosen
    grouping.scale[chosen] = 1.0
    grouping.undone = int(chosen.size)


def apply(match: LayerMatch, signature: np.ndarray, grouping: Grouping) -> int:
    n = match.channels
    keep = np.flatnonzero(grouping.target == np.arange(n))
    drop = np.flatnonzero(grouping.target != np.arange(n))
    position = np.full(n, -1)
    position[keep] = np.arange(keep.size)
    combination = np.zeros((n, keep.size))
    combination[np.arange(n), position[grouping.target]] = grouping.scale
    offset = 0
    for component in match.components:
        width = component.rows.shape[1]
        component.write(signature[keep, offset : offset + width], keep, drop)
        offset += width
    match.consumer_write(combination, keep, drop)
    for write in match.path_writes:
        write(int(drop.size))
    for tensor, axis, total in match.path_tensors:
        if tensor.shape is not None and len(tensor.shape) > axis:
            shape = list(tensor.shape)
            shape[axis] = total - int(drop.size)
            tensor.shape = shape
    return int(keep.size)


@dataclass(frozen=True)
class MergeOptions(PassOptions):
    #: also merge this fraction of the closest neurons (lossy; 0 merges exact duplicates only)
    alpha: float = 0.0
    #: merge neurons equal up to a positive factor (through homogeneous activations)
    angular: bool = True
    #: keep the merged layer's width a multiple of this
    channel_multiple: int = 8

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.alpha <= 1.0:
            raise OptionProblem("alpha", f"must be in [0, 1], got {self.alpha}")
        if self.channel_multiple < 1:
            raise OptionProblem("channel_multiple", f"must be an integer >= 1, got {self.channel_multiple}")

class MergeNeurons(Pass):
    name = "merge-neurons"
    summary = "RED merge of identical (after hashing) / collinear (ReLU paths) / α-closest output neurons; the consumer's columns are summed"
    stage = Stage.PRUNE
    lossless = False  # exact unless alpha > 0; declared lossy because alpha may be set
    tags = frozenset({"prune", "red"})
    request = "prune"
    runs_after = frozenset({"bn-fold", "hash-weights"})
    runs_before = frozenset({"quantize"})
    Options = MergeOptions

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        alpha = self.options["alpha"]
        names = NameFactory(graph)
        layers = []
        for node in ctx.progress([n for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul") and is_default_domain(n)], label="layers"):
            try:
                match = match_layer(graph, node, names)
            except Refused as reason:
                ctx.refuse(f"{node.op} {node_label(node)}", str(reason))
                continue
            signature = np.concatenate([c.rows.astype(np.float64) for c in match.components], axis=1)
            grouping = exact_groups(signature)
            if self.options["angular"] and match.homogeneous:
                angular_groups(signature, grouping)
            multiple = int(self.options["channel_multiple"])
            if alpha > 0:
                signature = relaxed_groups(signature, grouping, alpha, multiple)
            align_kept(grouping, multiple)
            merged = grouping.exact + grouping.angular + grouping.relaxed - grouping.undone
            if merged == 0:
                continue
            kept = apply(match, signature, grouping)
            layers.append(
                {
                    "layer": node_label(node),
                    "neurons_before": match.channels,
                    "neurons_after": kept,
                    "exact": grouping.exact,
                    "angular": grouping.angular,
                    "alpha": grouping.relaxed,
                    "alpha_relative_change": grouping.relative_change,
                    "undone_for_alignment": grouping.undone,
                }
            )
        if layers:
            cleanup(graph)
        return PassResult(
            bool(layers),
            {
                "layers_merged": len(layers),
                "neurons_removed": sum(l["neurons_before"] - l["neurons_after"] for l in layers),
                "exact": sum(l["exact"] for l in layers),
                "angular": sum(l["angular"] for l in layers),
                "alpha_merged": sum(l["alpha"] for l in layers),
                "alpha_relative_change_max": max((l["alpha_relative_change"] for l in layers), default=0.0),
                "undone_for_alignment": sum(l["undone_for_alignment"] for l in layers),
                "layers": layers,
            },
        )
