"""BN statistics kept in the model metadata, and the per-channel (mean, std) they give.

fold-batchnorm removes the BatchNormalization nodes but keeps the statistics of their outputs
in the metadata ``onnxopt.bn_statistics`` for the tensor now holding those values; equalize
updates them, and quantize, power-quant and hash-weights read them (with the BNs and
LayerNormalizations still in the graph) as the per-channel mean and std of a layer's output.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import all_graphs, constant_values, is_default_domain

STATISTICS_KEY = "onnxopt.bn_statistics"
VECTOR_FIELDS = ("mean", "std")


def read_bn_statistics(model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """The statistics kept by fold-batchnorm: tensor name → {axis, mean, std, source}."""
    return statistics_from_metadata({prop.key: prop.value for prop in model.metadata_props})


def statistics_from_metadata(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Same as :func:`read_bn_statistics`, from a metadata_props mapping (a pass's view)."""
    statistics = json.loads(metadata.get(STATISTICS_KEY, "{}"))
    for entry in statistics.values():
        for field in VECTOR_FIELDS:
            if isinstance(entry.get(field), str):  # little-endian float32, base64
                entry[field] = np.frombuffer(base64.b64decode(entry[field]), dtype="<f4").astype(np.float64).tolist()
    return statistics


def statistics_to_metadata(statistics: Mapping[str, dict[str, Any]]) -> str:
    """The metadata value for ``statistics``: JSON whose per-channel vectors are base64
    float32 (a third of the size of decimal text: BN statistics of EfficientNet-Lite0 take
    ~140 KB instead of ~420 KB)."""
    encoded = {}
    for name, entry in statistics.items():
        encoded[name] = dict(entry)
        for field in VECTOR_FIELDS:
            if field in entry:
                encoded[name][field] = base64.b64encode(np.asarray(entry[field], dtype="<f4").tobytes()).decode("ascii")
    return json.dumps(encoded, separators=(",", ":"))



def bn_statistics(graph: gs.Graph, metadata: Mapping[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tensor name → (mean, std) per channel (axis 1) from kept metadata and remaining BNs
    (those inside If/Loop/Scan bodies too)."""
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, entry in statistics_from_metadata(metadata).items():
        if entry.get("axis", 1) == 1:
            stats[name] = (np.asarray(entry["mean"], np.float64), np.asarray(entry["std"], np.float64))
    for node in (n for scope in all_graphs(graph) for n in scope.nodes):
        if node.op == "BatchNormalization" and is_default_domain(node):
            gamma, beta = constant_values(node, 1), constant_values(node, 2)
            if gamma is not None and beta is not None:
                stats[node.outputs[0].name] = (beta.astype(np.float64), np.abs(gamma.astype(np.float64)))
    stats.update(layernorm_statistics(graph))
    return stats


def layernorm_statistics(graph: gs.Graph) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tensor name → (β, |γ|) per feature (last axis) of every LayerNormalization that
    normalizes the last axis only, with constant 1-D scale γ (and bias β, else 0): its output
    has mean β_c and standard deviation |γ_c| per feature, like a BN output (docs/quantization.md)."""
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in (n for scope in all_graphs(graph) for n in scope.nodes):
        if node.op != "LayerNormalization" or not is_default_domain(node) or len(node.outputs) > 1 and not node.outputs[1].is_empty():
            continue
        gamma = constant_values(node, 1)
        beta = constant_values(node, 2) if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        axis = int(node.attrs.get("axis", -1))
        if gamma is None or gamma.ndim != 1 or rank is None or axis % rank != rank - 1:
            continue
        beta = np.zeros(len(gamma)) if beta is None else beta
        if beta.shape != gamma.shape:
            continue
        stats[node.outputs[0].name] = (beta.astype(np.float64), np.abs(gamma.astype(np.float64)))
    return stats
