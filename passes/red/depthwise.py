"""decompose-depthwise: uneven depthwise-separable rewrite of a k×k Conv (RED++, thesis §2.2.1).

Before::   x ── Conv(W: n_o×n_i×k×k, b, strides, pads, dilations) ── y
After::    x ── Conv(D: n_i·m×1×k×k, group = n_i, same strides/pads/dilations)
             ── Conv(P: n_o×n_i·m×1×1, b) ── y

Maths (METHODS.md §2, Fig. 2.5): for each input channel i the n_o kernels A_i = W[:, i]
(n_o × k², a batch SVD A_i = U_i S_i V_iᵀ) span a space of rank r_i (singular values above
``tolerance``·s_max,i; exact after hashing when the kernels are few distinct vectors).  The
depthwise Conv computes the r_i basis kernels S_i,t·V_i,t of channel i, the pointwise Conv
recombines them with U_i: Σ_t U_i[o,t]·(S_i,t V_i,t ∗ x_i) = A_i[o] ∗ x_i, summed over i = y.

ONNX form: a grouped Conv needs the same multiplier per group, so the uneven r_i are padded
to m = max r_i with zero kernels (and zero pointwise columns).  Applied only when eq. 2.11
says the decomposition saves parameters (Σ r_i < k²·n_i·n_o / (k² + n_o)) *and* the emitted
padded form has fewer parameters than the Conv.

Refused (with the reason): grouped Convs, 1×1 kernels, ``auto_pad`` other than NOTSET,
non-constant or shared-with-a-graph-output weights, no parameter saving.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import NameFactory, cleanup, is_default_domain, is_graph_output, node_label, optional_input, string_attr
from onnxopt.pass_base import Pass, PassContext, PassResult


def channel_bases(weight: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per input channel: ranks r (n_i), coefficients U (n_i, n_o, q), scaled basis SV (n_i, q, k²)."""
    n_o, n_i = weight.shape[:2]
    stacked = np.moveaxis(weight.reshape(n_o, n_i, -1).astype(np.float64), 1, 0)  # n_i × n_o × k²
    u, s, vt = np.linalg.svd(stacked, full_matrices=False)
    top = s[:, :1]
    rank = np.sum(s > tolerance * np.maximum(top, 1e-300), axis=1) * (top[:, 0] > 0)
    return rank, u, s, vt


def saves_parameters(rank_sum: int, kernel: int, n_i: int, n_o: int) -> bool:
    """Eq. 2.11: Σ r_i < s1·s2·n_i·n_o / (s1·s2 + n_o)."""
    return rank_sum < kernel * n_i * n_o / (kernel + n_o)


class DecomposeDepthwise(Pass):
    name = "decompose-depthwise"
    summary = "RED++ uneven depthwise-separable decomposition of k×k Convs (per-input-channel kernel basis), where eq. 2.11 saves parameters"
    lossless = False  # exact up to `tolerance` (rank truncation)
    tags = frozenset({"prune", "red"})
    runs_after = frozenset({"bn-fold", "hash-weights", "merge-neurons"})
    runs_before = frozenset({"quantize"})
    options_spec = {"tolerance": 1e-6}

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = NameFactory(graph)
        layers = []
        for conv in ctx.progress([n for n in graph.nodes if n.op == "Conv" and is_default_domain(n)], label="convs"):
            plan = self._check(graph, conv, float(self.options["tolerance"]))
            if isinstance(plan, str):
                ctx.refuse(f"Conv {node_label(conv)}", plan)
                continue
            layers.append(self._rewrite(graph, conv, plan, names))
        if layers:
            cleanup(graph)
        before = sum(l["params_before"] for l in layers)
        after = sum(l["params_after"] for l in layers)
        return PassResult(bool(layers), {"convs_decomposed": len(layers), "params_before": before, "params_after": after, "layers": layers})

    @staticmethod
    def _check(graph: gs.Graph, conv: gs.Node, tolerance: float):
        weight = optional_input(conv, 1)
        if not isinstance(weight, gs.Constant) or is_graph_output(graph, weight):
            return "weight is not an initializer"
        values = np.asarray(weight.values)
        if values.dtype.kind != "f" or values.ndim < 3:
            return "weight is not a float conv kernel"
        if conv.attrs.get("group", 1) != 1:
            return "grouped Conv"
        kernel = int(np.prod(values.shape[2:]))
        if kernel == 1:
            return "1×1 kernel"
        if string_attr(conv, "auto_pad", "NOTSET") != "NOTSET":
            return "auto_pad"
        if optional_input(conv, 2) is not None and not isinstance(conv.inputs[2], gs.Constant):
            return "bias is not an initializer"
        n_o, n_i = values.shape[:2]
        rank, u, s, vt = channel_bases(values, tolerance)
        multiplier = max(int(rank.max()), 1)
        padded = n_i * multiplier * kernel + n_o * n_i * multiplier
        if not saves_parameters(int(rank.sum()), kernel, n_i, n_o):
            return f"no parameter saving (eq. 2.11: Σr_i = {int(rank.sum())} ≥ {kernel * n_i * n_o / (kernel + n_o):.1f})"
        if padded >= n_o * n_i * kernel:
            return f"padded form (multiplier {multiplier}) has no fewer parameters"
        return values, rank, u, s, vt, multiplier

    @staticmethod
    def _rewrite(graph: gs.Graph, conv: gs.Node, plan, names: NameFactory) -> dict:
        values, rank, u, s, vt, m = plan
        n_o, n_i = values.shape[:2]
        spatial = values.shape[2:]
        mask = np.arange(m)[None, :] < rank[:, None]  # n_i × m
        depthwise = np.zeros((n_i, m, vt.shape[-1]))
        q = min(m, vt.shape[1])
        depthwise[:, :q] = (s[:, :q, None] * vt[:, :q]) * mask[:, :q, None]
        pointwise = np.zeros((n_o, n_i, m))
        pointwise[:, :, :q] = np.moveaxis(u[:, :, :q] * mask[:, None, :q], 0, 1)
        dtype = values.dtype
        label = node_label(conv)
        d_weight = gs.Constant(names.new(f"{label}_dw_weight"), depthwise.reshape(n_i * m, 1, *spatial).astype(dtype))
        p_weight = gs.Constant(names.new(f"{label}_pw_weight"), pointwise.reshape(n_o, n_i * m, *([1] * len(spatial))).astype(dtype))
        middle = gs.Variable(names.new(f"{label}_dw_out"), dtype=dtype)
        x_shape = conv.outputs[0].shape
        if x_shape is not None and len(x_shape) > 1:
            middle.shape = [x_shape[0], n_i * m, *x_shape[2:]]
        attrs = {k: v for k, v in conv.attrs.items() if k in ("strides", "pads", "dilations")}
        attrs.update(group=n_i, kernel_shape=list(spatial))
        dw = gs.Node("Conv", names.new(f"{label}_dw"), attrs=attrs, inputs=[conv.inputs[0], d_weight], outputs=[middle])
        pw_inputs = [middle, p_weight] + ([conv.inputs[2]] if optional_input(conv, 2) is not None else [])
        outputs = list(conv.outputs)
        conv.outputs.clear()
        conv.inputs.clear()
        pw = gs.Node("Conv", names.new(f"{label}_pw"), attrs={"kernel_shape": [1] * len(spatial)}, inputs=pw_inputs, outputs=outputs)
        graph.nodes.extend([dw, pw])
        kernel = int(np.prod(spatial))
        return {
            "layer": label,
            "rank_sum": int(rank.sum()),
            "multiplier": m,
            "params_before": int(values.size),
            "params_after": int(d_weight.values.size + p_weight.values.size),
        }
