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

import onnx_graphsurgeon as gs

from onnxopt.graph import cleanup, count_ops, is_default_domain
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


class FoldConstants(Pass):
    name = "fold-constants"
    summary = "evaluate pure-constant subgraphs (Q/DQ and random ops excluded) into initializers"
    tags = frozenset({"cleanup"})
    options_spec = {"max_constant_bytes": 64 << 20}

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cleanup(graph)
        before = count_ops(graph.nodes)
        try:
            graph.fold_constants(
                fold_shapes=True,
                partitioning="basic",
                error_ok=False,
                flatten_subgraphs=False,
                size_threshold=self.options["max_constant_bytes"],
                should_exclude_node=excluded_from_folding,
            )
        except Exception as exc:  # ORT could not evaluate the constant subgraph  # noqa: BLE001
            ctx.refuse("graph", f"constant folding failed in ONNX Runtime, graph left as is: {exc}")
            cleanup(graph)
            return PassResult(False)
        cleanup(graph)
        after = count_ops(graph.nodes)
        folded = {op: n - after.get(op, 0) for op, n in before.items() if n > after.get(op, 0)}
        return PassResult(bool(folded), {"nodes_folded": sum(folded.values())})
