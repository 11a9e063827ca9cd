"""decompose-depthwise: uneven depthwise-separable rewrite of a k×k Conv (RED++, thesis §2.2.1).

Before::   x ── Conv(W: n_o×n_i×k×k, b, strides, pads, dilations) ── y
After (padded)::    x ── Conv(D: n_i·m×1×k×k, group = n_i) ── Conv(P: n_o×n_i·m×1×1, b) ── y
After (bucketed)::  x ─┬ Gather(channels of rank r) ── Conv(D_r, group = #channels, multiplier r) ─┐
                       └ … one branch per distinct rank r > 0 …                                    ┴ Concat ── Conv(P, b) ── y

Maths (docs/pruning.md, Fig. 2.5): for each input channel i the n_o kernels A_i = W[:, i]
(n_o × k², a batch SVD A_i = U_i S_i V_iᵀ) span a space of rank r_i (singular values above
``tolerance``·s_max,i; exact after hashing when the kernels are few distinct vectors).  The
depthwise Conv computes the r_i basis kernels S_i,t·V_i,t of channel i, the pointwise Conv
recombines them with U_i: Σ_t U_i[o,t]·(S_i,t V_i,t ∗ x_i) = A_i[o] ∗ x_i, summed over i = y.
Strides, pads and dilations stay on the depthwise Conv; the bias moves to the pointwise one.

ONNX form (option ``layout``): a grouped Conv needs one multiplier for all groups, so the
uneven r_i are either padded to m = max r_i with zero kernels (``padded``) or the channels
are bucketed by rank (``bucketed``: no zero kernels and rank-0 channels disappear, but one
Gather per bucket and a Concat).  ``auto`` (default) buckets when padding would add more than
25 % depthwise channels: measured with ``python -m bench.red_layout`` (ranks 1–4, 64→64
channels, 56×56: padded 6.70 / 2.85 ms, bucketed 5.79 / 2.41 ms at 1 / 2 threads, under load).

Applied only when eq. 2.11 says the decomposition saves parameters
(Σ r_i < k²·n_i·n_o / (k² + n_o)) *and* the emitted form has fewer parameters than the Conv.

Refused (with the reason): grouped Convs, 1×1 kernels, ``auto_pad`` other than NOTSET,
non-constant weights, no parameter saving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import (
    NameFactory,
    cleanup,
    is_default_domain,
    is_graph_output,
    node_label,
    optional_input,
    string_attr,
)
from onnxopt.options import PassOptions
from onnxopt.pass_base import Pass, PassContext, PassResult, Stage

LAYOUTS = ("auto", "padded", "bucketed")
#: auto layout: bucket when padding adds more than this share of depthwise channels
PADDING_WASTE_LIMIT = 0.25


@dataclass
class Plan:
    weight: np.ndarray
    rank: np.ndarray  # r_i per input channel
    basis: np.ndarray  # n_i × q × k²: scaled basis kernels S·Vᵀ
    coefficients: np.ndarray  # n_i × n_o × q: U
    layout: str

    @property
    def kernel(self) -> int:
        return int(np.prod(self.weight.shape[2:]))

    def emitted_parameters(self) -> int:
        n_o, n_i = self.weight.shape[:2]
        channels = n_i * int(self.rank.max()) if self.layout == "padded" else int(self.rank.sum())
        return channels * self.kernel + n_o * channels


def channel_bases(weight: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per input channel: ranks r (n_i), coefficients U (n_i, n_o, q), scaled basis S·Vᵀ (n_i, q, k²)."""
    n_o, n_i = weight.shape[:2]
    stacked = np.moveaxis(weight.reshape(n_o, n_i, -1).astype(np.float64), 1, 0)  # n_i × n_o × k²
    u, s, vt = np.linalg.svd(stacked, full_matrices=False)
    top = s[:, :1]
    rank = np.sum(s > tolerance * np.maximum(top, 1e-300), axis=1) * (top[:, 0] > 0)
    return rank, u, s[:, :, None] * vt


def saves_parameters(rank_sum: int, kernel: int, n_i: int, n_o: int) -> bool:
    """Eq. 2.11: Σ r_i < s1·s2·n_i·n_o / (s1·s2 + n_o)."""
    return rank_sum < kernel * n_i * n_o / (kernel + n_o)


def choose_layout(rank: np.ndarray, option: str) -> str:
    if option != "auto":
        return option
    padded = rank.size * int(rank.max())
    return "bucketed" if padded > (1 + PADDING_WASTE_LIMIT) * int(rank.sum()) else "padded"


@dataclass(frozen=True)
class DepthwiseOptions(PassOptions):
    #: how close to exact the decomposition must be (relative)
    tolerance: float = 1e-6
    #: how the uneven depthwise groups are laid out
    layout: Literal["auto", "padded", "bucketed"] = "auto"

class DecomposeDepthwise(Pass):
    name = "decompose-depthwise"
    summary = "RED++ uneven depthwise-separable decomposition of k×k Convs (per-input-channel kernel basis), where eq. 2.11 saves parameters"
    stage = Stage.PRUNE
    lossless = False  # exact up to `tolerance` (rank truncation)
    tags = frozenset({"prune", "red"})
    request = "prune"
    runs_after = frozenset({"bn-fold", "hash-weights", "merge-neurons"})
    runs_before = frozenset({"quantize"})
    Options = DepthwiseOptions

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = NameFactory(graph)
        layers = []
        for conv in ctx.progress([n for n in graph.nodes if n.op == "Conv" and is_default_domain(n)], label="convs"):
            plan = self._check(graph, conv, float(self.options["tolerance"]), self.options["layout"])
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
    def _check(graph: gs.Graph, conv: gs.Node, tolerance: float, layout: str) -> Plan | str:
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
        rank, u, basis = channel_bases(values, tolerance)
        if not saves_parameters(int(rank.sum()), kernel, n_i, n_o):
            return f"no parameter saving (eq. 2.11: Σr_i = {int(rank.sum())} ≥ {kernel * n_i * n_o / (kernel + n_o):.1f})"
        if rank.max() == 0:
            return "all-zero kernel (left to constant folding)"
        plan = Plan(values, rank, basis, u, choose_layout(rank, layout))
        if plan.emitted_parameters() >= values.size:
            return f"the {plan.layout} form has no fewer parameters"
        return plan

    @staticmethod
    def _rewrite(graph: gs.Graph, conv: gs.Node, plan: Plan, names: NameFactory) -> dict:
        n_o, n_i = plan.weight.shape[:2]
        spatial = plan.weight.shape[2:]
        label = node_label(conv)
        dtype = plan.weight.dtype
        attrs = {k: v for k, v in conv.attrs.items() if k in ("strides", "pads", "dilations")}
        out_shape = conv.outputs[0].shape
        buckets = [np.arange(n_i)] if plan.layout == "padded" else [np.flatnonzero(plan.rank == r) for r in np.unique(plan.rank) if r > 0]
        multipliers = [int(plan.rank.max())] if plan.layout == "padded" else [int(r) for r in np.unique(plan.rank) if r > 0]
        new_nodes, branches, columns = [], [], []
        for channels, m in zip(buckets, multipliers):
            source = conv.inputs[0]
            if plan.layout == "bucketed" and not np.array_equal(channels, np.arange(n_i)):
                index = gs.Constant(names.new(f"{label}_rank{m}_channels"), channels.astype(np.int64))
                source = gs.Variable(names.new(f"{label}_rank{m}_in"), dtype=dtype)
                new_nodes.append(gs.Node("Gather", names.new(f"{label}_rank{m}_gather"), attrs={"axis": 1}, inputs=[conv.inputs[0], index], outputs=[source]))
            valid = (np.arange(m)[None, :] < plan.rank[channels, None]).astype(np.float64)  # zero kernels beyond r_i
            kernels = np.zeros((channels.size, m, plan.basis.shape[-1]))
            q = min(m, plan.basis.shape[1])
            kernels[:, :q] = plan.basis[channels, :q] * valid[:, :q, None]
            coefficients = np.zeros((n_o, channels.size, m))
            coefficients[:, :, :q] = np.moveaxis(plan.coefficients[channels, :, :q] * valid[:, None, :q], 0, 1)
            weight = gs.Constant(names.new(f"{label}_dw{m}_weight"), kernels.reshape(channels.size * m, 1, *spatial).astype(dtype))
            out = gs.Variable(names.new(f"{label}_dw{m}_out"), dtype=dtype)
            if out_shape is not None and len(out_shape) > 1:
                out.shape = [out_shape[0], channels.size * m, *out_shape[2:]]
            new_nodes.append(gs.Node("Conv", names.new(f"{label}_dw{m}"), attrs={**attrs, "group": int(channels.size), "kernel_shape": list(spatial)}, inputs=[source, weight], outputs=[out]))
            branches.append(out)
            columns.append(coefficients.reshape(n_o, channels.size * m))
        middle = branches[0]
        if len(branches) > 1:
            middle = gs.Variable(names.new(f"{label}_dw_concat"), dtype=dtype)
            new_nodes.append(gs.Node("Concat", names.new(f"{label}_dw_concat"), attrs={"axis": 1}, inputs=branches, outputs=[middle]))
        pointwise = np.concatenate(columns, axis=1)
        p_weight = gs.Constant(names.new(f"{label}_pw_weight"), pointwise.reshape(*pointwise.shape, *([1] * len(spatial))).astype(dtype))
        pw_inputs = [middle, p_weight] + ([conv.inputs[2]] if optional_input(conv, 2) is not None else [])
        outputs = list(conv.outputs)
        conv.outputs.clear()
        conv.inputs.clear()
        new_nodes.append(gs.Node("Conv", names.new(f"{label}_pw"), attrs={"kernel_shape": [1] * len(spatial)}, inputs=pw_inputs, outputs=outputs))
        graph.nodes.extend(new_nodes)
        return {
            "layer": label,
            "rank_sum": int(plan.rank.sum()),
            "max_rank": int(plan.rank.max()),
            "layout": plan.layout,
            "params_before": int(plan.weight.size),
            "params_after": plan.emitted_parameters(),
        }
