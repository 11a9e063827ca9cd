"""The calibration probe: a copy of the model whose outputs also carry the tensors to
measure (:func:`expose_tensors`), threaded out of If/Loop/Scan bodies level by level, and
the same probe with every If condition forced to a constant (:func:`forced_if`) for the
branches no calibration sample takes.  Used by :func:`.measured_ranges.calibrated_ranges`.
"""

from __future__ import annotations

import numpy as np
import onnx


def has_if(graph: onnx.GraphProto) -> bool:
    """``graph`` or one of its bodies (nested too) holds an If."""
    return any(node.op_type == "If" or any(has_if(body) for body in _bodies(node)) for node in graph.node)


def _bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [body for a in node.attribute for body in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def forced_if(probe: onnx.ModelProto, value: bool) -> onnx.ModelProto:
    """``probe`` with every If condition replaced by the constant ``value``: the branches the
    calibration samples never take are computed on the same samples."""
    forced = onnx.ModelProto()
    forced.CopyFrom(probe)
    name = _fresh(_all_names(forced.graph), f"calibration_forced_{str(value).lower()}")
    forced.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value), name))

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type == "If":
                node.input[0] = name
            for body in _bodies(node):
                visit(body)

    visit(forced.graph)
    return forced


#: Where a requested tensor's values come out of the calibration probe: (probe output, the
#: number of Loop/Scan levels that stacked the iterations in front of its own axes).
Source = tuple[str, int]


def expose_tensors(model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, dict[str, list[Source]]]:
    """A copy of ``model`` whose outputs also carry ``tensors``, and where to read each one.

    A tensor of the main graph becomes a graph output.  A tensor inside an If/Loop/Scan body
    cannot: it is threaded out through every enclosing node (docs/quantization.md): an
    Identity of it becomes an extra body output and an extra output of the node, level by
    level up to the main graph.  If: the other branch outputs an empty float tensor (shape
    [0]: skipped, that branch did not compute the tensor); Loop/Scan: an extra scan output,
    so the iterations are stacked on a new leading axis.  A tensor defined in several sibling
    bodies is read from each of them."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = set(tensors)
    taken = _all_names(probe.graph)
    sources: dict[str, list[Source]] = {name: [] for name in tensors}
    existing = {o.name for o in probe.graph.output}
    main = _defined_here(probe.graph, top=True)
    for name in tensors:
        if name in main:
            sources[name].append((name, 0))
            if name not in existing:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                existing.add(name)
    for name, out, depth in _thread_bodies(probe.graph, wanted, taken):
        probe.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
        sources[name].append((out, depth))
    return probe, sources


def _thread_bodies(graph: onnx.GraphProto, wanted: set[str], taken: set[str]) -> list[tuple[str, str, int]]:
    """(tensor, output of a node of ``graph`` carrying it, stacking depth) for the wanted
    tensors defined in the bodies of ``graph``'s nodes (nested ones too); the nodes and bodies
    get the extra outputs."""
    found = []
    for node in list(graph.node):
        bodies = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        if node.op_type == "If" and {"then_branch", "else_branch"} <= set(bodies):
            then_found = _in_body(bodies["then_branch"], wanted, taken)
            else_found = _in_body(bodies["else_branch"], wanted, taken)
            for branch, other, pairs in ((bodies["then_branch"], bodies["else_branch"], then_found),
                                         (bodies["else_branch"], bodies["then_branch"], else_found)):
                for name, inner, depth in pairs:
                    out = _fresh(taken, f"{name}__calibration")
                    _add_body_output(branch, inner, out, taken)
                    _add_empty_output(other, out, taken)
                    node.output.append(out)
                    found.append((name, out, depth))
        elif node.op_type in ("Loop", "Scan") and "body" in bodies:
            for name, inner, depth in _in_body(bodies["body"], wanted, taken):
                out = _fresh(taken, f"{name}__calibration")
                _add_body_output(bodies["body"], inner, out, taken)
                node.output.append(out)
                if node.op_type == "Scan":
                    for attribute in node.attribute:
                        if attribute.name in ("scan_output_axes", "scan_output_directions"):
                            attribute.ints.append(0)
                found.append((name, out, depth + 1))
    return found


def _in_body(body: onnx.GraphProto, wanted: set[str], taken: set[str]) -> list[tuple[str, str, int]]:
    """The wanted tensors defined in ``body`` itself (depth 0) and in its nested bodies."""
    here = [(name, name, 0) for name in sorted(wanted & _defined_here(body, top=False))]
    return here + _thread_bodies(body, wanted, taken)


def _defined_here(graph: onnx.GraphProto, *, top: bool) -> set[str]:
    """Names computed in ``graph``: node outputs, and the inputs (a body's per-iteration values;
    the main graph's inputs, which are ordinary outputs once requested)."""
    names = {name for node in graph.node for name in node.output if name}
    names.update(info.name for info in graph.input)
    if top:
        names -= {t.name for t in graph.initializer}
    return names


def _add_body_output(body: onnx.GraphProto, inner: str, out: str, taken: set[str]) -> None:
    """``out = Identity(inner)`` as the last output of ``body`` (an Identity, because a body
    output may not repeat a body input nor another output)."""
    body.node.append(onnx.helper.make_node("Identity", [inner], [out], name=_fresh(taken, f"{out}_identity")))
    body.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))


def _add_empty_output(body: onnx.GraphProto, out: str, taken: set[str]) -> None:
    """An empty float output of the If branch that does not compute the tensor."""
    empty = onnx.helper.make_tensor(f"{out}_empty", onnx.TensorProto.FLOAT, [0], [])
    body.node.append(onnx.helper.make_node("Constant", [], [out], name=_fresh(taken, f"{out}_empty"), value=empty))
    body.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {info.name for info in [*graph.input, *graph.output, *graph.value_info]}
    names.update(t.name for t in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
        for attribute in node.attribute:
            for body in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs):
                names |= _all_names(body)
    return names


def _fresh(taken: set[str], base: str) -> str:
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    taken.add(name)
    return name
