"""Which quantized layers ONNX Runtime actually runs as integer kernels: checked, not assumed.

A QDQ layer is only fast when ORT's graph optimizer fuses it (QLinearConv, QGemm,
QLinearMatMul, MatMulIntegerToFloat, DynamicQuantizeMatMul, …); otherwise ORT computes the
DequantizeLinear of the weight and runs the float op, slower than the FP32 model.  Whether a
fusion happens depends on the ORT version and on details of the graph (e.g. ORT's
MatMul+Add → Gemm fusion rewrites a MatMul on a fully static rank-3 input into
Reshape → Gemm → Reshape before the QDQ fusions run, and the DequantizeLinear then no longer
feeds the Gemm directly).

:func:`check_fusion` builds an ORT session on the CPU provider (``ORT_ENABLE_ALL``, the level
ORT uses by default) with ``optimized_model_filepath`` set, loads the graph ORT built and looks
up each layer by the name of its weight-codes initializer (in the main graph or in an
If/Loop/Scan body, where ORT applies the same fusions): the node reading it is the kernel
ORT runs.  A weight read by a DequantizeLinear (or no longer present) means the layer was not
fused.  A fused layer's output is *dequantized only* when every reader of its kernel's output
is a DequantizeLinear (through ORT's NHWC Transposes): only float ops read it, and nothing
gains from its integer output.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

import onnx

#: ORT nodes that compute a layer with integer arithmetic.
INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearConvTranspose", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "MatMulInteger", "ConvInteger", "QAttention", "MatMulNBits",
})


@dataclass
class FusionCheck:
    """The kernel ORT runs for each layer (``fused``: label → op type) and why the others are
    not integer (``not_fused``: label → reason); ``dequantized_only``: the fused QLinearConvs whose
    output ORT only dequantizes; ``error`` when the check could not run."""

    fused: dict[str, str] = field(default_factory=dict)
    not_fused: dict[str, str] = field(default_factory=dict)
    dequantized_only: set[str] = field(default_factory=set)
    error: str | None = None

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.fused.values()).most_common())

    def stats(self) -> dict[str, object]:
        """The ``fused_by_ort`` / ``not_fused`` entries of the quantize stats."""
        if self.error is not None:
            return {"fusion_check": f"not run: {self.error}"}
        return {
            "fusion_check": f"onnxruntime {_ort_version()} CPU, ORT_ENABLE_ALL",
            "fused_by_ort": self.counts(),
            "not_fused": [{"layer": label, "reason": reason} for label, reason in self.not_fused.items()],
        }


def check_fusion(model: onnx.ModelProto, weights: Mapping[str, str]) -> FusionCheck:
    """For ``weights`` (layer label → name of its quantized weight initializer), what ORT's CPU
    provider runs after its optimizations; ``error`` set (and nothing claimed) if ORT cannot
    build a session for ``model``."""
    try:
        optimized = ort_optimized_graph(model)
    except Exception as exc:  # noqa: BLE001 - any ORT failure means: not checked
        return FusionCheck(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in _all_nodes(optimized.graph):
        for name in node.input:
            readers.setdefault(name, []).append(node)
    result = FusionCheck()
    for label, weight in weights.items():
        kernel, reason = classify(readers.get(weight, []), readers)
        if kernel is not None:
            result.fused[label] = kernel
            node = next(n for n in readers[weight] if n.op_type == kernel)
            if kernel == "QLinearConv" and _dequantized_only(node, readers):
                result.dequantized_only.add(label)
        else:
            result.not_fused[label] = reason
    return result


def _dequantized_only(kernel: onnx.NodeProto, readers: Mapping[str, list[onnx.NodeProto]]) -> bool:
    """Every reader of ``kernel``'s output is a DequantizeLinear, looking through Transposes."""
    pending, seen = list(kernel.output[:1]), 0
    while pending:
        for reader in readers.get(pending.pop(), []):
            if reader.op_type == "Transpose":
                pending.append(reader.output[0])
            elif reader.op_type == "DequantizeLinear":
                seen += 1
            else:
                return False
    return seen > 0


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` and of the If/Loop/Scan bodies nested in it (ORT fuses inside them too)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                nodes += _all_nodes(body)
    return nodes


def classify(nodes: list[onnx.NodeProto], readers: Mapping[str, list[onnx.NodeProto]]) -> tuple[str | None, str]:
    """(integer op, "") for a weight read by an integer kernel, else (None, why)."""
    for node in nodes:
        if node.op_type in INTEGER_OPS:
            return node.op_type, ""
    if not nodes:
        return None, "ORT folded the weight's DequantizeLinear into a float constant"
    dq = next((n for n in nodes if n.op_type == "DequantizeLinear"), None)
    if dq is None:
        return None, f"ORT reads the weight with {nodes[0].op_type}"
    after = sorted({n.op_type for n in readers.get(dq.output[0], [])})
    return None, f"ORT kept DequantizeLinear → float {'/'.join(after) or 'op'} (no integer kernel)"


def ort_optimized_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph ORT's CPU provider runs for ``model`` at ORT_ENABLE_ALL."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="onnxopt_fusion_") as tmp:
        source, built = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "ort.onnx")
        onnx.save_model(model, source)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = built
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return onnx.load(built)


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


__all__ = ["FusionCheck", "INTEGER_OPS", "check_fusion", "classify", "ort_optimized_graph"]
