"""Model size figures for the report: parameters, MACs, node counts, serialized size.

MACs (multiply-accumulates) are counted per sample for the compute nodes, from shapes given
by ONNX shape inference; the batch dimension and the symbolic dimensions the model declares
(e.g. a sequence length) count as 1.  A dimension shape inference could not determine (its
made-up ``unk__N`` names) makes the node's count unknown rather than a wrong number:

* Conv:            N · C_out · ∏ spatial_out · (C_in / group) · ∏ kernel
* ConvTranspose:   N · C_in · ∏ spatial_in · (C_out / group) · ∏ kernel
* Gemm / MatMul:   ∏ output · K       (K = the reduced dimension)

Nodes whose shapes cannot be inferred are counted as 0 and listed in ``unknown_macs``, and so
are custom ops whose function body computes (PowerQuant, modular accumulators). A ``-1``/``0``
``dim_value`` (how some exporters write a dynamic dim) is dynamic, never a negative count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import with_inferred_shapes
from .io import EXTERNAL_DATA_THRESHOLD, lazy_bytes, serialized_size, tensor_bytes

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "MatMulNBits")


@dataclass
class ModelMetrics:
    nodes: int
    op_counts: dict[str, int]
    parameters: int
    macs: int
    size_bytes: int
    unknown_macs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "nodes": self.nodes,
            "op_counts": dict(sorted(self.op_counts.items())),
            "parameters": self.parameters,
            "macs": self.macs,
            "size_bytes": self.size_bytes,
            "unknown_macs": self.unknown_macs,
        }


def measure(model: onnx.ModelProto, *, inferred: onnx.ModelProto | None = None) -> ModelMetrics:
    """Compute the metrics of ``model`` (its main graph); ``inferred`` is the same model with
    shape inference already run (saves running it again)."""
    op_counts: dict[str, int] = {}
    for node in model.graph.node:
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
    macs, unknown = count_macs(model, inferred=inferred)
    bulk = tensor_bytes(model)
    size = bulk if bulk > EXTERNAL_DATA_THRESHOLD else serialized_size(model) + lazy_bytes(model)
    return ModelMetrics(
        nodes=len(model.graph.node),
        op_counts=op_counts,
        parameters=count_parameters(model),
        macs=macs,
        size_bytes=size,
        unknown_macs=unknown,
    )


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements held in initializers and Constant nodes."""
    total = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    total += int(np.prod(attr.t.dims, dtype=np.int64))
    return total


def tensor_shapes(inferred: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes of every tensor of a shape-inferred model: declared symbolic dims and the batch
    axis -> 1, dims inference could not determine -> None."""
    graph = inferred.graph
    shapes: dict[str, list[int | None]] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = [_dim(dim, axis) for axis, dim in enumerate(tensor_type.shape.dim)]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _dim(dim: onnx.TensorShapeProto.Dimension, axis: int) -> int | None:
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return dim.dim_value
    if dim.HasField("dim_value"):  # -1 or 0, as some exporters write a dynamic dim
        return 1 if axis == 0 else None
    if axis == 0 or (dim.dim_param and not dim.dim_param.startswith(UNDETERMINED_DIM_PREFIX)):
        return 1
    return None


UNDETERMINED_DIM_PREFIX = "unk__"  # what ONNX shape inference names the dims it cannot determine


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return default


def count_macs(model: onnx.ModelProto, *, inferred: onnx.ModelProto | None = None) -> tuple[int, list[str]]:
    """Total MACs of the main graph and the nodes whose MACs are not counted: shapes not
    inferred, or custom ops whose function body holds MAC ops (their inputs' shapes inside
    the body are unknown to shape inference)."""
    computing_functions = {(f.domain, f.name) for f in model.functions if any(n.op_type in MAC_OPS for n in f.node)}
    custom = [node for node in model.graph.node if (node.domain, node.op_type) in computing_functions]
    unknown = [_label(node) + " (custom op)" for node in custom]
    if not any(node.op_type in MAC_OPS for node in model.graph.node):
        return 0, unknown
    shapes = tensor_shapes(inferred if inferred is not None else with_inferred_shapes(model))
    total = 0
    for node in model.graph.node:
        if node.op_type not in MAC_OPS or node.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        macs = _node_macs(node, shapes)
        if macs is None:
            unknown.append(_label(node))
        else:
            total += macs
    return total, unknown


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0]}"


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int | None:
    op = node.op_type
    if op == "MatMulNBits":  # com.microsoft: x[..., K] × W[K, N] with K, N as attributes (no inferred output shape)
        x = shapes.get(node.input[0])
        return None if x is None or None in x else int(np.prod(x[:-1], dtype=np.int64) * _attr(node, "K", 0) * _attr(node, "N", 0))
    weight_index = 3 if op in ("QLinearConv", "QLinearMatMul") else 1
    data_index = 0
    names = list(node.input)
    if len(names) <= weight_index:
        return None
    x, w = shapes.get(names[data_index]), shapes.get(names[weight_index])
    y = shapes.get(node.output[0])
    if x is None or w is None or y is None or None in x or None in w or None in y:
        return None
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        return int(np.prod(y, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if op == "ConvTranspose":
        return int(np.prod(x, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if op == "Gemm":
        k = x[0] if _attr(node, "transA", 0) else x[-1]
        return int(np.prod(y, dtype=np.int64) * k)
    # MatMul family: the reduced dimension is the last axis of the first input.
    return int(np.prod(y, dtype=np.int64) * x[-1])

