"""fold-constants: evaluate pure-constant subgraphs once, at optimization time.

Before::    W ─┐
               Mul ── Reshape(shape = Concat(Constant, Constant)) ── Conv(x, ·)
            s ─┘
After::     W' = W·s (initializer), Reshape's shape an initializer ── Conv(x, W'')

A node is foldable when all its inputs are constants (initializers, Constant nodes, or
outputs of foldable nodes); ``Shape`` of a tensor whose shape is fully static counts as a
constant too.  All foldable nodes of a graph are evaluated together in one ONNX Runtime
session (so the values are exactly what the runtime would compute), then only the results
some remaining node reads are stored as initializers; the rest of the folded subgraph
disappears.

Never folded (the node and everything downstream of it stay in the graph):

* QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear: QDQ pairs on constant weights
  are how ORT recognizes quantized weights; folding them would dequantize the model.
* random generators (RandomNormal, RandomUniform, …, Bernoulli, Multinomial): not constant.
* nodes of non-default domains (custom ops, model-local functions).

Results that would bloat the file stay computed at run time (their producer is kept, the
small constants it reads are folded):

* results larger than ``max_constant_bytes``;
* *generated* results: larger than ``max_constant_growth`` times the constants they are
  computed from (and than ``GROWTH_FLOOR_BYTES``), e.g. ConstantOfShape / Expand / Tile /
  Range of a few bytes producing a whole weight tensor.  ``max_constant_growth = 0`` turns
  this limit off.  A generated intermediate that a later folded node reduces again (Expand
  then ReduceSum) is not stored, so it does not stop that fold.

Subgraph bodies (If / Loop / Scan) are folded the same way, each in its own session, with
constants of enclosing graphs visible to them (never copied into the body).

When ORT cannot evaluate the constant subgraph the pass changes nothing and records why.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt.graph import cleanup, count_ops, has_subgraph, is_default_domain, static_shape
from onnxopt.options import PassOptions
from onnxopt.pass_base import Pass, PassContext, PassResult

NEVER_FOLDED = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Bernoulli",
        "Multinomial",
    }
)

#: Results up to this size are stored whatever their growth (shape tensors, small masks).
GROWTH_FLOOR_BYTES = 256


def excluded_from_folding(node: gs.Node) -> bool:
    return node.op in NEVER_FOLDED or not is_default_domain(node)


class FoldingFailed(Exception):
    """ONNX Runtime could not evaluate the constant subgraph."""


# --------------------------------------------------------------------------- analysis
@dataclass
class FoldPlan:
    """The foldable nodes of one graph, in topological order, and what they are made of.

    ``known`` holds values computed without ORT (static shapes); ``sources`` maps every
    constant-valued tensor name to the bytes of the original constants it is computed from.
    """

    nodes: list[gs.Node] = field(default_factory=list)
    known: dict[str, np.ndarray] = field(default_factory=dict)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)

    def source_bytes(self, name: str) -> int:
        return sum(self.sources.get(name, {}).values())


def tensor_nbytes(tensor: gs.Constant) -> int:
    """Bytes of a constant's payload, read from its shape and dtype (lazy values stay lazy)."""
    try:
        itemsize = np.dtype(tensor.dtype).itemsize
    except TypeError:
        itemsize = 1
    return int(np.prod(tensor.shape, dtype=np.int64)) * itemsize


def constant_node_bytes(node: gs.Node) -> int:
    """Bytes of a Constant node's value attribute."""
    for value in node.attrs.values():
        if isinstance(value, gs.Constant):
            return tensor_nbytes(value)
        if isinstance(value, (int, float, list, tuple, np.ndarray)):
            return np.asarray(value).nbytes
    return 0


def static_shape_value(node: gs.Node) -> np.ndarray | None:
    """The value of ``Shape(x)`` when x's shape is fully static (start/end honoured), else None.

    Done here rather than with graphsurgeon's ``fold_shapes``, which also runs a "shape tensor
    cast elision" that rewrites Cast(int→float) → Mul/Add/... → Cast(float→int) into integer
    arithmetic by casting the float constants to int (x·0.5 becomes x·0): not exact.
    """
    if node.op != "Shape" or not is_default_domain(node) or len(node.outputs) != 1 or not node.inputs:
        return None
    shape = static_shape(node.inputs[0])
    if shape is None:
        return None
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    return np.array(shape, dtype=np.int64)[start : None if end is None else int(end)]


def _is_constant(tensor: gs.Tensor, plan: FoldPlan, outer: set[str]) -> bool:
    return tensor.is_empty() or isinstance(tensor, gs.Constant) or tensor.name in plan.sources or tensor.name in outer


def _subgraph_reads_only_constants(node: gs.Node, plan: FoldPlan, outer: set[str]) -> bool:
    """A node with bodies is foldable only if everything its bodies read from outside is a
    Constant tensor (those are self-contained when the node is exported alone)."""
    for subgraph in node.subgraphs():
        if not all(isinstance(t, gs.Constant) or t.name in outer for t in subgraph._foreign_tensors().values()):
            return False
    return True


def plan_folding(graph: gs.Graph, outer_constants: dict[str, int]) -> FoldPlan:
    """Which nodes of ``graph`` (topologically sorted) compute constants.

    ``outer_constants`` are the constant tensors of enclosing graphs (name → bytes) a body may
    read; they count as constants but are never copied into it.
    """
    plan = FoldPlan()
    outer = set(outer_constants)
    for node in graph.nodes:
        shape = static_shape_value(node)
        if shape is not None:
            plan.known[node.outputs[0].name] = shape
            plan.sources[node.outputs[0].name] = {node.outputs[0].name: shape.nbytes}
            plan.nodes.append(node)
            continue
        if excluded_from_folding(node) or any(isinstance(v, gs.Node.AttributeRef) for v in node.attrs.values()):
            continue
        if not all(_is_constant(t, plan, outer) for t in node.inputs):
            continue
        if has_subgraph(node) and not _subgraph_reads_only_constants(node, plan, outer):
            continue
        origin: dict[str, int] = {}
        for tensor in node.inputs:
            if tensor.is_empty():
                continue
            if isinstance(tensor, gs.Constant):
                origin[tensor.name] = tensor_nbytes(tensor)
            elif tensor.name in outer:
                origin[tensor.name] = outer_constants[tensor.name]
            else:
                origin.update(plan.sources[tensor.name])
        if node.op == "Constant" and node.outputs:
            origin = {node.outputs[0].name: constant_node_bytes(node)}
        for out in node.outputs:
            plan.sources[out.name] = origin
        plan.nodes.append(node)
    return plan


# --------------------------------------------------------------------------- evaluation
def _evaluation_model(graph: gs.Graph, nodes: list[gs.Node], plan: FoldPlan, names: list[str], outer: dict[str, gs.Constant]) -> onnx.ModelProto:
    """A model computing ``names`` from ``nodes`` alone: their constant inputs (and the
    outer-scope constants they read) become initializers, known values too."""
    initializers: dict[str, onnx.TensorProto] = {}
    for node in nodes:
        for tensor in node.inputs:
            if tensor.is_empty() or tensor.name in initializers:
                continue
            if isinstance(tensor, gs.Constant):
                initializers[tensor.name] = OnnxExporter.export_tensor_proto(tensor)
            elif tensor.name in plan.known:
                initializers[tensor.name] = onnx.numpy_helper.from_array(plan.known[tensor.name], tensor.name)
            elif tensor.name in outer:
                initializers[tensor.name] = OnnxExporter.export_tensor_proto(outer[tensor.name])
    body = onnx.helper.make_graph(
        [OnnxExporter.export_node(node) for node in nodes],
        "fold-constants",
        inputs=[],
        outputs=[onnx.ValueInfoProto(name=name) for name in names],
        initializer=list(initializers.values()),
    )
    opsets = [onnx.helper.make_opsetid("", graph.opset)]
    return onnx.helper.make_model(body, opset_imports=opsets, ir_version=max(4, onnx.helper.find_min_ir_version_for(opsets)))


def evaluate(graph: gs.Graph, nodes: list[gs.Node], plan: FoldPlan, outer: dict[str, gs.Constant]) -> dict[str, np.ndarray | None]:
    """Values of every tensor ``nodes`` (a topologically sorted part of the plan) compute,
    from one ORT session."""
    values = dict(plan.known)
    evaluated = [node for node in nodes if not any(out.name in plan.known for out in node.outputs)]
    names = [out.name for node in evaluated for out in node.outputs if not out.is_empty()]
    if not names:
        return values
    model = _evaluation_model(graph, evaluated, plan, names, outer)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        results = session.run(names, {})
    except Exception as exc:  # noqa: BLE001 - any ORT failure means: fold nothing
        raise FoldingFailed(str(exc)) from exc
    # A sequence or optional (a list or None from ORT) is no initializer: see ``choose``.
    values.update(zip(names, (r if isinstance(r, np.ndarray) else None for r in results)))
    return values


# --------------------------------------------------------------------------- decision
@dataclass
class Decision:
    """Which tensors become constants, and which generated ones stay computed at run time."""

    stored: set[str] = field(default_factory=set)
    kept: dict[str, str] = field(default_factory=dict)  # tensor name -> producer op
    values: dict[str, np.ndarray] = field(default_factory=dict)


def estimated_nbytes(tensor: gs.Tensor) -> int | None:
    """Bytes of a tensor whose static shape and dtype are known (from shape inference)."""
    shape = static_shape(tensor)
    if shape is None or tensor.dtype is None:
        return None
    try:
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize
    except TypeError:
        return None


def _too_large(nbytes: int | None, source_bytes: int, max_bytes: int, max_growth: float) -> bool:
    if nbytes is None:  # unknown before evaluation: find out
        return False
    if nbytes > max_bytes:
        return True
    return max_growth > 0 and nbytes > GROWTH_FLOOR_BYTES and nbytes > max_growth * source_bytes


def decide(
    graph: gs.Graph, nodes: list[gs.Node], plan: FoldPlan, sizes: dict[str, int | None], max_bytes: int, max_growth: float
) -> Decision:
    """Walk the folded ``nodes`` backwards: a result some kept or non-foldable node (or the
    graph's output list, or a body) reads is stored if small enough, else its producer is
    kept, which makes that producer's own inputs needed in turn."""
    folded = {id(node) for node in nodes}
    outputs = {id(tensor) for tensor in graph.outputs}
    decision = Decision()
    for node in reversed(nodes):
        needed = [out for out in node.outputs if not out.is_empty() and _is_needed(out, folded, outputs)]
        if any(_too_large(sizes.get(out.name), plan.source_bytes(out.name), max_bytes, max_growth) for out in needed):
            folded.discard(id(node))
            decision.kept.update({out.name: node.op for out in needed})
            continue
        decision.stored.update(out.name for out in needed)
    return decision


def _is_needed(tensor: gs.Tensor, folded: set[int], graph_outputs: set[int]) -> bool:
    """A graph output, or read by a node that stays (in this graph or in a body)."""
    return id(tensor) in graph_outputs or any(id(reader) not in folded for reader in tensor.outputs)


def producers_of(names: set[str], plan: FoldPlan) -> list[gs.Node]:
    """The plan's nodes ``names`` are computed from (ancestors included), in plan order."""
    wanted: set[int] = set()
    pending = set(names)
    for node in reversed(plan.nodes):
        if any(out.name in pending for out in node.outputs):
            wanted.add(id(node))
            pending.update(t.name for t in node.inputs if not t.is_empty())
    return [node for node in plan.nodes if id(node) in wanted]


def choose(graph: gs.Graph, plan: FoldPlan, outer: dict[str, gs.Constant], max_bytes: int, max_growth: float) -> Decision:
    """Decide from the inferred sizes first, so that results known to stay unfolded are never
    computed (a generated weight may be large), then evaluate the rest and decide again on
    the actual sizes."""
    estimated = {out.name: estimated_nbytes(out) for node in plan.nodes for out in node.outputs}
    first = decide(graph, plan.nodes, plan, estimated, max_bytes, max_growth)
    nodes = producers_of(first.stored, plan)
    values = evaluate(graph, nodes, plan, outer)
    sizes = {name: max_bytes + 1 if value is None else value.nbytes for name, value in values.items()}
    final = decide(graph, nodes, plan, sizes, max_bytes, max_growth)
    final.kept.update(first.kept)
    final.values = {name: values[name] for name in final.stored}
    return final


def apply(graph: gs.Graph, decision: Decision) -> None:
    """Turn every stored tensor into a constant (its producer then dies at cleanup)."""
    tensors = graph.tensors()
    for name, value in decision.values.items():
        tensor = tensors[name]
        tensor.to_constant(np.asarray(value, order="C"))  # (ascontiguousarray would make scalars 1-D)
        tensor.inputs.clear()


# --------------------------------------------------------------------------- driver
@contextlib.contextmanager
def _quiet_runtime() -> Iterator[None]:
    """Silence ORT's warnings about its own optimizations on the temporary model."""
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # ORT's default; it has no getter to restore from


def graph_constants(graph: gs.Graph) -> dict[str, gs.Constant]:
    return {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}


def fold_graph(graph: gs.Graph, outer: dict[str, gs.Constant], max_bytes: int, max_growth: float) -> Decision:
    """Fold ``graph`` (not its bodies); raise FoldingFailed without touching it when ORT fails."""
    plan = plan_folding(graph, {name: tensor_nbytes(t) for name, t in outer.items()})
    if not plan.nodes:
        return Decision()
    decision = choose(graph, plan, outer, max_bytes, max_growth)
    apply(graph, decision)
    return decision


def fold_recursively(graph: gs.Graph, outer: dict[str, gs.Constant], max_bytes: int, max_growth: float) -> list[Decision]:
    """Fold ``graph``, then the bodies of its nodes with ``graph``'s constants visible to them."""
    decisions = [fold_graph(graph, outer, max_bytes, max_growth)]
    cleanup(graph)
    visible = {**outer, **graph_constants(graph)}
    for node in graph.nodes:
        for subgraph in node.subgraphs():
            decisions += fold_recursively(subgraph, visible, max_bytes, max_growth)
    return decisions


def count_all_ops(graph: gs.Graph) -> dict[str, int]:
    """Op counts of ``graph`` and of every body nested in it."""
    counts = count_ops(graph.nodes)
    for node in graph.nodes:
        for subgraph in node.subgraphs():
            for op, n in count_all_ops(subgraph).items():
                counts[op] = counts.get(op, 0) + n
    return counts


@dataclass(frozen=True)
class FoldConstantsOptions(PassOptions):
    #: the largest constant a fold may produce
    max_constant_bytes: int = 64 << 20
    #: a fold may not grow the constants it comes from more than this many times
    max_constant_growth: float = 4.0

class FoldConstants(Pass):
    name = "fold-constants"
    summary = "evaluate pure-constant subgraphs (Q/DQ and random ops excluded) into initializers"
    tags = frozenset({"cleanup"})
    Options = FoldConstantsOptions

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cleanup(graph)
        before = count_all_ops(graph)
        # A body is folded after its parent graph was changed: keep a copy to put back when
        # ORT fails on a body.
        snapshot = graph.copy() if any(has_subgraph(node) for node in graph.nodes) else None
        try:
            with _quiet_runtime():
                decisions = fold_recursively(
                    graph, {}, int(self.options["max_constant_bytes"]), float(self.options["max_constant_growth"])
                )
        except FoldingFailed as exc:
            if snapshot is not None:
                graph.nodes, graph.inputs, graph.outputs = snapshot.nodes, snapshot.inputs, snapshot.outputs
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            ctx.refuse("graph", f"constant folding failed in ONNX Runtime, graph left as is: {first_line}")
            return PassResult(False)
        cleanup(graph)
        self._report_kept(decisions, ctx)
        after = count_all_ops(graph)
        folded = {op: n - after.get(op, 0) for op, n in before.items() if n > after.get(op, 0)}
        return PassResult(bool(folded), {"nodes_folded": sum(folded.values())})

    def _report_kept(self, decisions: list[Decision], ctx: PassContext) -> None:
        """One counted line for the constant results left to run time because of their size."""
        kept = count_ops_by_name(decisions)
        if not kept:
            return
        ops = ", ".join(f"{op}×{n}" for op, n in sorted(kept.items()))
        ctx.refuse(
            "graph",
            f"{sum(kept.values())} constant result(s) left to be computed at run time ({ops}): storing them "
            f"would grow the file beyond max_constant_growth={self.options['max_constant_growth']} times the "
            f"constants they come from or max_constant_bytes={self.options['max_constant_bytes']} "
            "(--set max_constant_growth=0 / a larger max_constant_bytes folds them)",
        )


def count_ops_by_name(decisions: list[Decision]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for decision in decisions:
        for op in decision.kept.values():
            counts[op] = counts.get(op, 0) + 1
    return counts
