"""Graph helpers on onnx-graphsurgeon, shared by every pass.

Passes work on a :class:`onnx_graphsurgeon.Graph`; import makes repeated node names unique
(``name__2``, ...).  The helpers here cover the hazards the pass contract lists:
producers/consumers and graph-output checks, constant access that copies an initializer
shared with nodes outside the match before editing it, per-channel broadcasting on a
chosen axis, unique name generation, and cleanup + toposort.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .errors import UnsupportedModelError
from .external import attach, is_lazy

DEFAULT_DOMAINS = (None, "", "ai.onnx")

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- import/export
def import_graph(model: onnx.ModelProto, *, copy: bool = True) -> gs.Graph:
    """Import a copy of ``model`` into a graphsurgeon graph (tensor payloads stay lazy).

    The copy matters: graphsurgeon's exporter reuses the TensorProtos behind lazy constants
    and renames them in place, which would otherwise edit the caller's model (e.g. the value
    of every lowered Constant node).  ``copy=False`` only for a proto nobody else holds.
    """
    if copy:
        working = onnx.ModelProto()
        working.CopyFrom(model)
        model = working
    renamed = make_node_names_unique(model.graph)
    if renamed:
        logger.info("renamed %d node(s) whose names repeat an earlier node's (e.g. %s)", len(renamed), renamed[0])
    graph = gs.import_onnx(model)
    attach(graph)  # lazy initializers read from the input's data file, on demand
    return graph


#: Value types graphsurgeon can export (optional and map values it cannot write back).
EXPORTABLE_VALUE_TYPES = frozenset({"tensor_type", "sequence_type", "sparse_tensor_type"})


def proto_bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs of ``node`` (If branches, Loop/Scan bodies), from its graph attributes."""
    return [body for attribute in node.attribute for body in ([attribute.g] if attribute.HasField("g") else attribute.graphs)]


def subgraph_nodes(graph: gs.Graph) -> list[gs.Node]:
    """Every node of every subgraph of ``graph`` (If branches, Loop/Scan bodies), nested too."""
    return [inner for node in graph.nodes for body in node.subgraphs() for inner in [*body.nodes, *subgraph_nodes(body)]]


def all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """``graph`` and every subgraph nested in it (If branches, Loop/Scan bodies), outer first."""
    return [graph, *(inner for node in graph.nodes for body in node.subgraphs() for inner in all_graphs(body))]


def check_value_types(graph: onnx.GraphProto) -> None:
    """Raise UnsupportedModelError for a value of a type graphsurgeon cannot export
    (optional, map), in ``graph`` or any body.  Checked before a rewritten graph is
    exported, so such a model passes through unchanged when no pass rewrites it."""
    for info in [*graph.input, *graph.output, *graph.value_info]:
        kind = info.type.WhichOneof("value")
        if kind is not None and kind not in EXPORTABLE_VALUE_TYPES:
            raise UnsupportedModelError(f"value {info.name!r} has {kind.replace('_type', '')} type, which onnxopt cannot rewrite (tensors and sequences only)")
    for node in graph.node:
        for body in proto_bodies(node):
            check_value_types(body)


def make_node_names_unique(graph: onnx.GraphProto) -> list[str]:
    """Rename the later nodes of ``graph`` whose name repeats an earlier one's: ``name__2``,
    ``name__3``, ... (a name no other node has).  Exporters may repeat names (the ONNX checker
    accepts it), but the passes' names and the validation need them unique.  Empty names stay
    empty.  Returns ``"old -> new"`` for each renamed node."""
    taken = {node.name for node in graph.node}
    seen: set[str] = set()
    renamed = []
    for node in graph.node:
        if not node.name:
            continue
        if node.name in seen:
            suffix = itertools.count(2)
            fresh = next(f"{node.name}__{i}" for i in suffix if f"{node.name}__{i}" not in taken)
            taken.add(fresh)
            renamed.append(f"{node.name} -> {fresh}")
            node.name = fresh
        seen.add(node.name)
    return renamed


def tensor_names(graph: gs.Graph) -> set[str]:
    """Names of every tensor the graph references (subgraphs included)."""
    names = set(graph.tensors(check_duplicates=False).keys())
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                names |= tensor_names(value)
    return names


def unused_initializers(model: onnx.ModelProto, graph: gs.Graph) -> list[str]:
    """Initializers of ``model`` that no node of its imported ``graph`` reads.

    graphsurgeon drops them on import, so they vanish at the first export whatever the pass.
    """
    used = tensor_names(graph)
    return sorted(t.name for t in model.graph.initializer if t.name not in used)


def export_model(graph: gs.Graph, template: onnx.ModelProto, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Export ``graph`` keeping the template model's IR version and opsets; the metadata
    properties are ``metadata`` when given, else the template's."""
    check_value_types(template.graph)
    model = gs.export_onnx(graph, do_type_check=True)
    model.ir_version = template.ir_version
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    exported_domains = {entry.domain for entry in model.opset_import}
    for entry in template.opset_import:
        if entry.domain not in exported_domains and entry.domain not in DEFAULT_DOMAINS:
            model.opset_import.append(entry)
    _keep_overridable_initializers(model, template)
    _keep_template_value_info(model, template)
    model.graph.initializer.extend(OnnxExporter.export_tensor_proto(t) for t in constants_shared_by_bodies(graph))
    drop_outer_scope_copies(model.graph)
    del model.metadata_props[:]
    if metadata is None:
        model.metadata_props.extend(template.metadata_props)
    else:
        onnx.helper.set_model_props(model, metadata)
    return model


def constants_shared_by_bodies(graph: gs.Graph) -> list[gs.Constant]:
    """Constants that two or more bodies read but no node of ``graph`` itself does.

    graphsurgeon has no notion of the scope a constant lives in: it exports such a constant
    inside every body that reads it.  Exported once in the main graph instead, the bodies'
    copies go (``drop_outer_scope_copies``).  A name any other tensor also uses stays as is.
    """
    readers: dict[int, set[int]] = {}
    tensors: dict[int, gs.Constant] = {}
    by_name: dict[str, set[int]] = {}

    def visit(level: gs.Graph) -> None:
        for tensor in level.tensors(check_duplicates=False).values():
            by_name.setdefault(tensor.name, set()).add(id(tensor))
        for node in level.nodes:
            for body in node.subgraphs():
                for inner in body.nodes:
                    for tensor in inner.inputs:
                        if isinstance(tensor, gs.Constant):
                            readers.setdefault(id(tensor), set()).add(id(body))
                            tensors[id(tensor)] = tensor
                visit(body)

    visit(graph)
    top = {id(t) for t in graph.tensors(check_duplicates=False).values()}
    return [
        tensor
        for key, tensor in tensors.items()
        if len(readers[key]) > 1 and key not in top and by_name[tensor.name] == {key}
    ]


def drop_outer_scope_copies(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> None:
    """Remove the copies of enclosing-scope constants from the bodies nested in ``graph``.

    graphsurgeon exports every constant a body reads as an initializer *of that body*, those
    of the enclosing graphs included: one more copy of a shared weight per If/Loop/Scan body
    (ONNX forbids a body to redefine an outer name, so such an initializer is always a copy).
    The body reads the enclosing graph's tensor again once the copy is gone.
    """
    if outer:
        for field in (graph.initializer, graph.sparse_initializer):
            kept = [t for t in field if _initializer_name(t) not in outer]
            if len(kept) != len(field):
                del field[:]
                field.extend(kept)
    visible = outer | _defined_names(graph)
    for node in graph.node:
        for body in proto_bodies(node):
            drop_outer_scope_copies(body, visible)


def _initializer_name(tensor: onnx.TensorProto | onnx.SparseTensorProto) -> str:
    return tensor.values.name if isinstance(tensor, onnx.SparseTensorProto) else tensor.name


def _defined_names(graph: onnx.GraphProto) -> frozenset[str]:
    """Names a graph defines: its inputs, initializers and node outputs."""
    names = {info.name for info in graph.input}
    names.update(t.name for t in graph.initializer)
    names.update(t.values.name for t in graph.sparse_initializer)
    names.update(out for node in graph.node for out in node.output)
    return frozenset(names)


def _keep_template_value_info(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Drop the value_info the template did not have.  The passes work on shape-inferred
    graphs, but shipping the inferred shapes changes which fusions ORT applies (measured on
    a small ViT: fewer nodes, 8 % slower), so the output carries only the template's."""
    known = {info.name for info in template.graph.value_info}
    kept = [info for info in model.graph.value_info if info.name in known]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


#: Before IR version 4 every initializer must also be declared as a graph input.
IR_INITIALIZERS_OPTIONAL = 4


def _keep_overridable_initializers(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """List initializers as graph inputs where the model needs it: all of them below IR 4
    (onnx.checker: "in initializer but not in graph input"), else the ones the template
    listed (overridable defaults, kept as part of the interface).  graphsurgeon's export drops
    them all from the inputs; an initializer a pass removed is not listed again.  The type and
    shape come from the initializer itself (a pass may have reshaped it), in the template's
    order first, then the new initializers in their own order."""
    initializers = {t.name: t for t in model.graph.initializer}
    present = {i.name for i in model.graph.input}
    listed = dict.fromkeys(i.name for i in template.graph.input if i.name in initializers)
    if model.ir_version < IR_INITIALIZERS_OPTIONAL:
        listed.update(dict.fromkeys(initializers))
    for name in listed:
        if name not in present:
            tensor = initializers[name]
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))


def with_inferred_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with ONNX shape inference's value_info added (passes need channel counts);
    the model itself when inference fails (e.g. unknown custom ops).

    Inference runs on a *skeleton* of the model whose large initializers are replaced by
    graph inputs of the same type and shape: ``infer_shapes`` serializes the whole model
    twice, which on ResNet-50 (100 MB of weights) cost ~0.8 s per call, while shapes never
    depend on weight values.  Small initializers (shape tensors, axes) keep their data for
    data propagation.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(payload_free_skeleton(model), strict_mode=False, data_prop=True)
    except Exception:  # best effort: passes refuse what needs a missing shape  # noqa: BLE001
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    known = {info.name for info in result.graph.value_info}
    result.graph.value_info.extend(info for info in inferred.graph.value_info if info.name not in known)
    return result


SKELETON_MAX_ELEMENTS = 64  # initializers up to this size keep their data in the skeleton


def payload_free_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A shallow stand-in of ``model`` for shape inference: its large initializers (and the
    lazy ones, still in the input's data file) become typed graph inputs (no payload),
    everything else is kept."""
    skeleton = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, field, getattr(model, field))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    source, graph = model.graph, skeleton.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.input.extend(source.input)
    listed = {info.name for info in source.input}
    for tensor in source.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) <= SKELETON_MAX_ELEMENTS and not is_lazy(tensor):
            graph.initializer.append(tensor)
        elif tensor.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    graph.sparse_initializer.extend(source.sparse_initializer)
    return skeleton


def cleanup(graph: gs.Graph) -> gs.Graph:
    """Drop dead nodes/tensors (graph inputs are kept) and restore topological order."""
    return graph.cleanup(remove_unused_graph_inputs=False).toposort()


# --------------------------------------------------------------------------- structure
def is_default_domain(node: gs.Node) -> bool:
    return node.domain in DEFAULT_DOMAINS


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes ``tensor`` (None for graph inputs and constants)."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """Every node (subgraph nodes included) that reads ``tensor``."""
    return list(tensor.outputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(inp is tensor for inp in graph.inputs)


def has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(value, gs.Graph) for value in node.attrs.values())


def string_attr(node: gs.Node, name: str, default: str) -> str:
    """A string attribute as ``str`` (graphsurgeon may hand back bytes)."""
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def has_padding(node: gs.Node) -> bool:
    """True if a Conv/pooling node pads its input (explicit pads or SAME auto-padding)."""
    return string_attr(node, "auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER") or any(node.attrs.get("pads", []))


def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` of ``node``, or None when absent or given as the empty name."""
    if index >= len(node.inputs):
        return None
    tensor = node.inputs[index]
    return None if tensor.is_empty() else tensor


def constant_values(node: gs.Node, index: int) -> np.ndarray | None:
    """Values of input ``index`` if it is a constant (initializer), else None."""
    tensor = optional_input(node, index)
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def substitute(tensors: list[gs.Tensor], old: gs.Tensor, new: gs.Tensor) -> None:
    """Replace ``old`` by ``new`` in a node's inputs/outputs list, element by element
    (graphsurgeon's synchronized lists keep producer/consumer links only that way)."""
    for index, tensor in enumerate(tensors):
        if tensor is old:
            tensors[index] = new


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of ``old`` read ``new`` instead (graph outputs included)."""
    for node in consumers(old):
        substitute(node.inputs, old, new)
    substitute(graph.outputs, old, new)


def detach(node: gs.Node) -> None:
    """Disconnect ``node`` so that the next cleanup removes it."""
    node.inputs.clear()
    node.outputs.clear()


# --------------------------------------------------------------------------- names
class NameFactory:
    """Generates names unused by any node or tensor of a graph (subgraphs included)."""

    def __init__(self, graph: gs.Graph) -> None:
        self._taken: set[str] = set()
        self._collect(graph)

    def _collect(self, graph: gs.Graph) -> None:
        self._taken.update(graph.tensors(check_duplicates=False).keys())
        for node in graph.nodes:
            self._taken.add(node.name)
            for value in node.attrs.values():
                if isinstance(value, gs.Graph):
                    self._collect(value)

    def new(self, base: str) -> str:
        """A fresh name starting with ``base`` (``base`` itself if unused)."""
        candidates = itertools.chain([base], (f"{base}_{i}" for i in itertools.count(1)))
        name = next(c for c in candidates if c not in self._taken)
        self._taken.add(name)
        return name


# --------------------------------------------------------------------------- constants
def set_constant_input(
    graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray, names: NameFactory, base_name: str | None = None
) -> gs.Constant:
    """Give input ``index`` of ``node`` the new ``values``.

    The existing Constant is updated in place only if ``node`` is its single reader and it is
    not a graph output; otherwise (a shared initializer) a fresh Constant is created for
    ``node`` so the other readers keep the old values.  A missing optional input is created.
    """
    values = np.ascontiguousarray(values)
    current = optional_input(node, index)
    exclusive = (
        isinstance(current, gs.Constant)
        and all(reader is node for reader in current.outputs)
        and sum(tensor is current for tensor in node.inputs) == 1
        and not is_graph_output(graph, current)
    )
    if exclusive:
        current.values = values
        return current
    name = names.new(base_name or (current.name if current is not None else f"{node.name or node.op}_input{index}"))
    fresh = gs.Constant(name, values)
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = fresh
    return fresh


# --------------------------------------------------------------------------- channels
def per_channel(vector: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of a rank-``rank`` array."""
    shape = [1] * rank
    shape[axis] = -1
    return np.reshape(vector, shape)


def count_ops(nodes: Iterable[gs.Node]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def node_label(node: gs.Node) -> str:
    """Readable identity for reports: the node's name, else op and first output."""
    if node.name:
        return node.name
    first = node.outputs[0].name if node.outputs else "?"
    return f"{node.op}->{first}"


def static_shape(tensor: gs.Tensor) -> Sequence[int] | None:
    """The tensor's shape if every dimension is a known integer, else None."""
    shape = tensor.shape
    if shape is None or any(not isinstance(dim, (int, np.integer)) or dim < 0 for dim in shape):
        return None
    return [int(dim) for dim in shape]
