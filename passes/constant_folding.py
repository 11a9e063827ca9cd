"""fold-constants: evaluate pure-constant subgraphs once, at optimization time.

Before::    W ─┐
               Mul ── Reshape(shape = Concat(Constant, Constant)) ── Conv(x, ·)
            s ─┘
After::     W' = W·s (initializer), Reshape's shape an initializer ── Conv(x, W'')

A node is folded when all its inputs are constants (initializers, Constant nodes, or
outputs of folded nodes).  ``Shape`` of a tensor whose shape is fully static is folded too.
The values come from ONNX Runtime (via onnx-graphsurgeon's folder), so they are exactly
what the runtime would compute.

Never folded (the node and everything downstream of it stay in the graph):

* QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear: QDQ pairs on constant weights
  are how ORT recognizes quantized weights; folding them would dequantize the model.
* random generators (RandomNormal, RandomUniform, …, Bernoulli, Multinomial): not constant.
* nodes of non-default domains (custom ops, model-local functions).
* results larger than ``max_constant_bytes`` (Expand/Tile of a small constant would bloat
  the file).

When ORT cannot evaluate the constant subgraph the pass changes nothing and records why.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxopt.graph import cleanup, count_ops, detach, is_default_domain, is_graph_output, static_shape
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


def excluded_from_folding(node: gs.Node) -> bool:
    return node.op in NEVER_FOLDED or not is_default_domain(node)


def fold_static_shapes(graph: gs.Graph) -> int:
    """Turn ``Shape(x)`` into a constant when x's shape is fully static; return how many.

    Done here rather than with graphsurgeon's ``fold_shapes``, which also runs a "shape tensor
    cast elision" that rewrites Cast(int→float) → Mul/Add/... → Cast(float→int) into integer
    arithmetic by casting the float constants to int (x·0.5 becomes x·0): not exact.
    """
    folded = 0
    for node in list(graph.nodes):
        if node.op != "Shape" or not is_default_domain(node) or len(node.outputs) != 1 or not node.inputs:
            continue
        shape, result = static_shape(node.inputs[0]), node.outputs[0]
        if shape is None or is_graph_output(graph, result):
            continue
        start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
        values = np.array(shape, dtype=np.int64)[start : None if end is None else int(end)]
        detach(node)
        result.to_constant(values)
        folded += 1
    return folded


@contextlib.contextmanager
def _quiet_folder() -> Iterator[None]:
    """Silence graphsurgeon's and ORT's warnings while graphsurgeon evaluates constants (ORT
    warns about its own optimizations on the temporary model; they say nothing about ours)."""
    previous = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        gs.logger.G_LOGGER.severity = previous
        ort.set_default_logger_severity(2)  # ORT's default; it has no getter to restore from


class FoldConstants(Pass):
    name = "fold-constants"
    summary = "evaluate pure-constant subgraphs (Q/DQ and random ops excluded) into initializers"
    tags = frozenset({"cleanup"})
    options_spec = {"max_constant_bytes": 64 << 20}

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cleanup(graph)
        before = count_ops(graph.nodes)
        # graphsurgeon edits the graph in place before evaluating (it lowers Constant nodes):
        # keep a copy to put back when the evaluation fails.
        snapshot = graph.copy()
        try:
            fold_static_shapes(graph)
            with _quiet_folder():
                graph.fold_constants(
                    fold_shapes=False,
                    partitioning="basic",
                    error_ok=False,
                    flatten_subgraphs=False,
                    size_threshold=self.options["max_constant_bytes"],
                    should_exclude_node=excluded_from_folding,
                )
        except Exception as exc:  # ORT could not evaluate the constant subgraph  # noqa: BLE001
            graph.nodes, graph.inputs, graph.outputs = snapshot.nodes, snapshot.inputs, snapshot.outputs
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            ctx.refuse("graph", f"constant folding failed in ONNX Runtime, graph left as is: {first_line}")
            return PassResult(False)
        cleanup(graph)
        after = count_ops(graph.nodes)
        folded = {op: n - after.get(op, 0) for op, n in before.items() if n > after.get(op, 0)}
        return PassResult(bool(folded), {"nodes_folded": sum(folded.values())})
