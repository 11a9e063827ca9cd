"""Cleanup family: dead-code elimination and Identity/no-op elimination.

eliminate-dead
    Removes nodes whose outputs reach no graph output, and initializers nobody reads.  Graph
    inputs are kept even when unused: they are the model's interface.

eliminate-identity
    Removes nodes that return one of their inputs unchanged.  The rules are data, one per
    line in :data:`NO_OP_RULES`; each returns the index of the input passed through, or None:

    =============================  ===============================================
    Identity                       always
    Dropout                        inference (training_mode absent/false, mask unused)
    Cast                           to the input's own element type
    Transpose                      perm = 0, 1, …, r−1
    Concat / Sum / Mean / Max /
    Min                            a single input
    Add / Sub (x − 0) / Mul / Div  the other operand a constant of 0 (Add/Sub) or 1
    (x ∘ c)                        (Mul/Div) whose shape broadcasts without growing x
    Pad                            all pads zero
    Reshape                        target shape constant and equal to x's static shape
    =============================  ===============================================

    Before: ``A ── Identity ── B``   After: ``A ── B``.  When the no-op's output is a graph
    output, the producer of its input is renamed to write the graph output directly; when
    that is impossible (the input is itself a graph input or output, or a constant) the
    node is kept and the refusal is recorded.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from onnxopt.graph import (
    cleanup,
    constant_values,
    count_ops,
    is_default_domain,
    is_graph_input,
    is_graph_output,
    node_label,
    producer,
    replace_all_uses,
    static_shape,
    substitute,
)
from onnxopt.pass_base import Pass, PassContext, PassResult, Stage


class EliminateDead(Pass):
    name = "eliminate-dead"
    summary = "remove nodes that reach no graph output and unused initializers"
    stage = Stage.FINISH
    tags = frozenset({"cleanup"})

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes_before = count_ops(graph.nodes)
        constants_before = _constant_names(graph)
        cleanup(graph)
        nodes_after = count_ops(graph.nodes)
        removed_nodes = sum(nodes_before.values()) - sum(nodes_after.values())
        removed_constants = len(constants_before - _constant_names(graph))
        # Initializers nothing reads never reach the graphsurgeon graph (the manager lists them).
        removed_constants += len(ctx.take_unused_initializers())
        modified = bool(removed_nodes or removed_constants)
        return PassResult(modified, {"nodes_removed": removed_nodes, "initializers_removed": removed_constants})


def _constant_names(graph: gs.Graph) -> set[str]:
    return {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}


# --------------------------------------------------------------------------- no-op rules
NoOpRule = Callable[[gs.Node], "int | None"]


def _always(node: gs.Node) -> int | None:
    return 0


def _dropout(node: gs.Node) -> int | None:
    training = constant_values(node, 2)
    if training is not None and bool(training.reshape(-1)[0]):
        return None
    if len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant) and not node.inputs[2].is_empty():
        return None
    mask_used = len(node.outputs) > 1 and bool(node.outputs[1].outputs)
    return None if mask_used else 0


def _cast(node: gs.Node) -> int | None:
    source = node.inputs[0].dtype
    target = node.attrs.get("to")
    if source is None or target is None:
        return None
    try:
        same = helper.tensor_dtype_to_np_dtype(target) == np.dtype(source)
    except (KeyError, TypeError):  # types numpy cannot name (bfloat16, float8, ...)
        return None
    return 0 if same else None


def _transpose(node: gs.Node) -> int | None:
    perm = node.attrs.get("perm")
    return 0 if perm is not None and list(perm) == list(range(len(perm))) else None


def _single_input(node: gs.Node) -> int | None:
    return 0 if len(node.inputs) == 1 else None


def _neutral_operand(neutral: float, commutative: bool) -> NoOpRule:
    """x ∘ c where c is constant ``neutral`` everywhere and broadcasting cannot enlarge x."""

    def rule(node: gs.Node) -> int | None:
        for keep, other in ((0, 1), (1, 0)) if commutative else ((0, 1),):
            values = constant_values(node, other)
            kept_shape = static_shape(node.inputs[keep])
            if values is None or kept_shape is None or values.ndim > len(kept_shape):
                continue
            fits = all(c == 1 or c == k for c, k in zip(values.shape[::-1], kept_shape[::-1]))
            if fits and values.size and np.all(values == neutral) and node.inputs[keep].dtype == values.dtype:
                return keep
        return None

    return rule


def _pad(node: gs.Node) -> int | None:
    pads = constant_values(node, 1) if len(node.inputs) > 1 else np.asarray(node.attrs.get("pads", []))
    return 0 if pads is not None and pads.size and not np.any(pads) else None


def _reshape(node: gs.Node) -> int | None:
    target = constant_values(node, 1)
    shape = static_shape(node.inputs[0])
    if target is None or shape is None:
        return None
    return 0 if list(target.reshape(-1)) == list(shape) and 0 not in shape else None


NO_OP_RULES: dict[str, NoOpRule] = {
    "Identity": _always,
    "Dropout": _dropout,
    "Cast": _cast,
    "Transpose": _transpose,
    "Concat": _single_input,
    "Sum": _single_input,
    "Mean": _single_input,
    "Max": _single_input,
    "Min": _single_input,
    "Add": _neutral_operand(0.0, commutative=True),
    "Sub": _neutral_operand(0.0, commutative=False),
    "Mul": _neutral_operand(1.0, commutative=True),
    "Div": _neutral_operand(1.0, commutative=False),
    "Pad": _pad,
    "Reshape": _reshape,
}


class EliminateIdentity(Pass):
    name = "eliminate-identity"
    summary = "remove Identity and no-op nodes (Dropout at inference, Cast to same type, x*1, ...)"
    tags = frozenset({"cleanup"})

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        removed: dict[str, int] = {}
        for node in list(graph.nodes):
            rule = NO_OP_RULES.get(node.op)
            if rule is None or not is_default_domain(node) or not node.outputs:
                continue
            if any(is_graph_output(graph, extra) for extra in node.outputs[1:]):
                continue  # an extra output (Dropout's mask) is part of the interface: not a no-op
            kept = rule(node)
            if kept is None:
                continue
            reason = self._blocker(graph, node, kept)
            if reason:
                ctx.refuse(node_label(node), reason)
                continue
            self._bypass(graph, node, kept)
            removed[node.op] = removed.get(node.op, 0) + 1
        if removed:
            cleanup(graph)
        return PassResult(bool(removed), {"removed": removed} if removed else {})

    @staticmethod
    def _blocker(graph: gs.Graph, node: gs.Node, kept: int) -> str | None:
        """Why the no-op ``node`` cannot be removed, or None."""
        if not is_graph_output(graph, node.outputs[0]):
            return None
        source = node.inputs[kept]
        if isinstance(source, gs.Constant) or is_graph_input(graph, source) or is_graph_output(graph, source):
            return "output is a graph output fed directly by a graph input, output or constant"
        return None

    @staticmethod
    def _bypass(graph: gs.Graph, node: gs.Node, kept: int) -> None:
        source, result = node.inputs[kept], node.outputs[0]
        if is_graph_output(graph, result):
            # Keep the graph output's name: the source's producer writes ``result`` directly.
            origin = producer(source)
            assert origin is not None
            substitute(origin.outputs, source, result)
            node.outputs.clear()
            node.inputs.clear()
            replace_all_uses(graph, source, result)
        else:
            node.inputs.clear()
            replace_all_uses(graph, result, source)
            node.outputs.clear()
