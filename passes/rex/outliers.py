"""rex_outliers (weight-only mode, Gemm/MatMul; Table 3.14): the sparse outlier residue.

Weights with |w − mean| ≥ 6σ (:func:`outlier_mask`) are taken out of order 1 and carried
in a residue of int8 codes with one scale (:func:`residue_codes`: binary or b bits), added
on the layer's output by :func:`emit_outlier_branch` (Gather → Mul → ScatterElements(add)).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import NameFactory, node_label

from ..common.numerics import checked_scales
from .site import LayerSite

OUTLIER_SIGMAS = 6.0


def residue_codes(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.float32]:
    """Int8 codes and one scale for the outlier residue: binary (bits = 1: sign · mean|v|,
    the least-squares scale of sign codes, Table 3.14) or symmetric b-bit (max|v| / (2^{b−1} − 1))."""
    if bits == 1:
        return np.where(values < 0, -1, 1).astype(np.int8), np.float32(max(np.abs(values).mean(), 1e-12))
    top = 2 ** (bits - 1) - 1
    scale = np.float32(max(np.abs(values).max() / top, 1e-12))
    return np.clip(np.round(values / scale), -top, top).astype(np.int8), scale


def outlier_mask(weight: np.ndarray, sigmas: float = OUTLIER_SIGMAS) -> np.ndarray:
    """Weights with |w − mean| ≥ ``sigmas``·σ (Table 3.14's outliers)."""
    w = np.asarray(weight, np.float64)
    return np.abs(w - w.mean()) >= sigmas * (w.std() or np.inf)


def outlier_bits(site: LayerSite, bits: bool | int) -> int:
    """Bits of the outlier residue codes for this layer (0: no residue); ``bits`` is rex_outliers."""
    if not bits or site.node.op not in ("Gemm", "MatMul"):
        return 0
    return 8 if bits is True else int(bits)


def emit_outlier_branch(graph: gs.Graph, site: LayerSite, outliers: tuple, names: NameFactory) -> None:
    """y[..., j] += x[..., i]·DQ(code) for every outlier (i, j): Gather → Mul → ScatterElements(add)
    on the layer's output, O(#outliers) MACs per row."""
    flat, codes, scale = outliers
    rows, cols = np.unravel_index(flat, site.weight.shape)
    inputs_index, outputs_index = (cols, rows) if site.out_axis == 0 else (rows, cols)  # Gemm transB: W is [N, K]
    base, label = site.node, f"{node_label(site.node)}_rex_outliers"
    out = base.outputs[0]
    y = gs.Variable(names.new(f"{label}_before"), dtype=np.float32, shape=out.shape)
    base.outputs[0] = y
    picked = gs.Variable(names.new(f"{label}_inputs"), dtype=np.float32, shape=None)
    graph.nodes.append(gs.Node("Gather", names.new(f"{label}_Gather"), attrs={"axis": -1},
                               inputs=[base.inputs[0], gs.Constant(names.new(f"{label}_rows"), inputs_index.astype(np.int64))], outputs=[picked]))
    values = gs.Variable(names.new(f"{label}_values"), dtype=np.float32, shape=None)
    graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{label}_DequantizeLinear"),
                               inputs=[gs.Constant(names.new(f"{label}_codes"), codes), gs.Constant(names.new(f"{label}_scale"), checked_scales(scale, label))],
                               outputs=[values]))
    products = gs.Variable(names.new(f"{label}_products"), dtype=np.float32, shape=None)
    graph.nodes.append(gs.Node("Mul", names.new(f"{label}_Mul"), inputs=[picked, values], outputs=[products]))
    shape = gs.Variable(names.new(f"{label}_shape"), dtype=np.int64, shape=None)
    graph.nodes.append(gs.Node("Shape", names.new(f"{label}_Shape"), inputs=[products], outputs=[shape]))
    index = gs.Variable(names.new(f"{label}_index"), dtype=np.int64, shape=None)
    graph.nodes.append(gs.Node("Expand", names.new(f"{label}_Expand"), inputs=[gs.Constant(names.new(f"{label}_columns"), outputs_index.astype(np.int64)), shape], outputs=[index]))
    graph.nodes.append(gs.Node("ScatterElements", names.new(f"{label}_ScatterElements"), attrs={"axis": -1, "reduction": "add"},
                               inputs=[y, index, products], outputs=[out]))
