"""rex: residual quantization-error expansion (REx) of quantized layers into parallel branches.

Before (after ``quantize``)::

    X_dq ── Conv(DQ(Q(W)), b) ── [Relu] ── Q ── DQ

After (K = 2, budget γ)::

    X_dq ─┬─ Conv(DQ(R¹), b)           ── Q₁ ── DQ₁ ──────────────────────────┐
          └─ Conv(DQ(R²[sel+0]), b²) ── Q₂ ── Gather(channel map) ── DQ₂ ── Add ── [Relu] ── Q ── DQ

Maths (docs/rex.md, thesis §3.1.4, Algorithm 2): ``R¹ = Q⁻¹(Q(W))`` is the base layer the
quantize pass emitted; order k quantizes the remaining error, ``R^k = Q⁻¹(Q(W − Σ_{j<k} R^j))``
with the same weight operator (:mod:`.common.operators`: uniform per-channel; PowerQuant
plugs in), so ``|W − Σ_k R^k| ≤ (1/(2^{b−1}−1))^{K−1} · s_{R^K}/2`` per weight (eq. 3.18).
Sparse expansion (eq. 3.22): order k ≥ 2 keeps only some output channels (whole groups for
grouped/depthwise Convs), so the extra MACs are γ × the layers' MACs.  With bias correction
(eq. 3.8) in the base layer, branch k carries ``−R^k·E[X]``.

The sub-modules:

* :mod:`.site`: the layers REx expands (:class:`~.site.LayerSite`) and their input statistics.
* :mod:`.expansion`: the numerics, :func:`expand_weight` (Algorithm 2 with sparse orders).
* :mod:`.allocation`: ``rex_allocation``, which units each order expands: ``"uniform"`` (the
  thesis's share γ/(K−1) of every layer) or ``"network"`` (default: γ × Σ_l MACs_l spent
  where the layers' relative error, weighted by E[x²] of the inputs, falls most per MAC:
  :func:`allocate_network`).
* :mod:`.combine`: the branches (QDQ Conv/Gemm/MatMul re-quantized to uint8, so ORT fuses
  them and the Add into QLinear ops) and ``rex_combine``, how each is moved into the full
  channel layout: ``"gather"``, ``"pad"``, ``"scatter"``, ``"dense"``; also the input
  expansion (``rex_input_expansion``, eqs. 3.20–3.21: branches ``R^{k1} ⊗ I^{k2}``).
* :mod:`.layout`: ``rex_combine="permute"``: each channel group is reordered once, exactly,
  so every order's channels are a prefix added with a Pad (no Gather); layers outside a
  permutable group use the Gather form.
* :mod:`.fold`: ``rex_combine="fold"`` (K = 2, ≤ 4-bit weights): ``R¹ + R²`` is one int8
  layer with per-channel scales, no branch; each channel's order-2 step s1/m comes from a
  ladder of divisors allocated by extra BOPs (or one ``rex_fold_divisor``).  ``"auto"``
  (default) is ``"fold"`` where it applies, else ``"permute"``.
* :mod:`.outliers`: ``rex_outliers`` (weight-only mode, Gemm/MatMul; Table 3.14): the
  weights beyond 6σ in a sparse residue added as Gather → Mul → ScatterElements(add).

``rex_weight_only`` = b: without the quantize pass, quantize every constant weight of
Conv/Gemm/MatMul with the operator at b bits (DequantizeLinear weights, float activations)
and expand those.  A layer whose output is not quantized sums the branches in float.

Refused: a pipeline without ``quantize`` before ``rex`` (the float weights are gone after
quantization, so a model quantized in an earlier run cannot be expanded), ConvTranspose,
layers whose output shape rank is unknown, non-default domains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PipelineError
from onnxopt.graph import NameFactory, cleanup, node_label
from onnxopt.options import OptionProblem, PassOptions, option
from onnxopt.pass_base import Pass, PassContext, PassResult, Refusal, Stage

from ..common.operators import WeightOperator, weight_operator
from ..common.quantization import QuantizedLayers, correct_matmul_bias
from .allocation import allocate_network, inferred_shapes, layer_macs, unit_rungs
from .combine import emit_branches
from .expansion import Expansion, Order, channel_units, expand_weight
from .fold import auto_combine, channel_bits, channel_divisors, check_fold_options, fold_layer, prepare_fold, rung_bits
from .layout import permuted_layout
from .outliers import OUTLIER_SIGMAS, emit_outlier_branch, outlier_bits, outlier_mask, residue_codes
from .site import LayerSite, input_moment_weights, layer_sites

COMBINE_MODES = ("permute", "gather", "pad", "scatter", "dense", "fold")
ALLOCATIONS = ("uniform", "network")


# --------------------------------------------------------------------------- the pass
@dataclass(frozen=True)
class RexOptions(PassOptions):
    """REx's options: the expansion order, its budget, where it goes and how it is combined."""

    #: expansion order K (1 = the quantized layer only)
    rex_order: int = option(2, flag="--rex")
    #: extra output channels over all orders >= 2, as a fraction of the layers' (0.5 = 50 %)
    rex_budget: float = option(0.5, flag="--rex-budget")
    #: also expand the activations' quantization error
    rex_input_expansion: bool = option(False, flag="--rex-input-expansion")
    #: weight-only: an outlier residue added in float (True: 8-bit, or its bits 1..8)
    rex_outliers: bool | int = False
    #: the registered weight operator of the branches ("uniform", "power", ...)
    rex_operator: str = "uniform"
    rex_combine: Literal["auto", "permute", "gather", "pad", "scatter", "dense", "fold"] = option("auto", flag="--rex-combine")
    rex_allocation: Literal["network", "uniform"] = option("network", flag="--rex-allocation")
    #: expand float weights directly at this bit-width (no quantize pass before)
    rex_weight_only: int | None = None
    #: requantize each branch's output before the sum (as ORT's integer kernels do)
    rex_requantize: bool = True
    #: rex_combine="fold": one divisor m of the order-2 step s1/m for every expanded channel (None: a ladder, chosen per channel)
    rex_fold_divisor: int | None = None

    def check(self) -> None:
        super().check()
        if self.rex_order < 1:
            raise OptionProblem("rex_order", f"must be an integer K ≥ 1, got {self.rex_order!r}")
        if not 0 <= self.rex_budget <= max(1, self.rex_order - 1):
            raise OptionProblem("rex_budget", f"must be a fraction in [0, K−1] (0.5 = 50 % extra output channels), got {self.rex_budget!r}")
        if self.rex_outliers not in (False, True, *range(1, 9)):
            raise OptionProblem("rex_outliers", f"must be false, true (8-bit residue) or the residue's bits 1..8, got {self.rex_outliers!r}")
        if self.rex_outliers and self.rex_weight_only is None:
            raise OptionProblem("rex_outliers", "needs rex_weight_only (the outlier residue is added in float; transformer linear layers)")
        if self.rex_weight_only is not None and self.rex_weight_only not in range(2, 9):
            raise OptionProblem("rex_weight_only", f"must be None or a bit-width in 2..8, got {self.rex_weight_only!r}")
        if self.rex_fold_divisor is not None and self.rex_fold_divisor < 2:
            raise OptionProblem("rex_fold_divisor", f"must be an integer m ≥ 2 (order-2 step s1/m), got {self.rex_fold_divisor!r}")
        if self.rex_allocation == "network" and self.rex_combine == "pad":
            raise OptionProblem("rex_combine", "'pad' expands a contiguous window per layer; it cannot use rex_allocation='network'")
        weight_operator(self.rex_operator)  # unknown operator → clear error
        if self.rex_combine != "auto":
            check_fold_options(self)


class Rex(Pass):
    name = "rex"
    summary = "REx: expand the quantization error of each quantized layer (orders K, budget γ): folded into one int8 layer (K=2, <= 4 bits) or parallel low-bit branches"
    stage = Stage.EXPAND
    lossless = False
    tags = frozenset({"rex"})
    request = "rex"
    min_opset = 13  # per-axis DequantizeLinear
    runs_after = frozenset({"quantize"})
    Options = RexOptions
    consumes = frozenset({QuantizedLayers})

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        o = self.options
        quantized = ctx.artifact(QuantizedLayers)
        #: the combine form of this run (rex_combine, with "auto" resolved on the quantized layers)
        self.combine = auto_combine(o, quantized.layers if quantized else {}) if o["rex_combine"] == "auto" else o["rex_combine"]
        check_fold_options({**o, "rex_combine": self.combine})
        if o["rex_weight_only"] is None and quantized is None:  # outside a checked pipeline
            raise PipelineError(self.missing_artifact(QuantizedLayers, []))
        if o["rex_weight_only"] is None and not quantized.layers:
            raise PipelineError("rex: the quantize pass before it quantized no layer, so there is no residual to expand (see its refusals)")

    def required_artifacts(self) -> frozenset[type]:
        """The quantized layers, except in weight-only mode (which expands float weights)."""
        return frozenset() if self.options["rex_weight_only"] is not None else frozenset({QuantizedLayers})

    def missing_artifact(self, kind: type, earlier: Sequence[Pass]) -> str:
        if any("power-quant" in p.all_tags() for p in earlier):
            return "rex: expands uniform quantization (the quantize pass); it cannot follow power-quant: drop one of them"
        return (
            "rex: needs the quantize pass earlier in the same pipeline (--quantize wNaM --rex K) and at least one layer "
            "it quantized: REx expands the residual of the float weights, which are gone once a model is quantized "
            "(so a model quantized in an earlier run cannot be expanded; or use rex_weight_only=b for weight-only expansion)"
        )

    def nothing_done(self, result: PassResult, refusals: list[Refusal]) -> str | None:
        """None for the baselines the options ask for (order 1 or no budget: the base layers only)."""
        if self.options["rex_weight_only"] is None and (self.options["rex_order"] == 1 or self.options["rex_budget"] == 0):
            return None
        return super().nothing_done(result, refusals)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        operator = weight_operator(o["rex_operator"])
        names = NameFactory(graph)
        sites = layer_sites(graph, ctx, o["rex_weight_only"], self.combine)
        if self.combine == "fold":
            sites = prepare_fold(sites, o, ctx)
        ladder = self.combine == "fold" and o["rex_fold_divisor"] is None and o["rex_allocation"] == "network"
        shapes = inferred_shapes(graph, ctx)  # shapes behind computed pads may only be known now
        if self.combine == "permute":
            selections = self._permuted_layout(graph, sites, operator, ctx, shapes)
        elif o["rex_allocation"] == "network":
            selections = allocate_network(*self._profile(sites, operator, ctx, shapes, ladder), spend_all=ladder)
        else:
            selections = [None] * len(sites)
        layers, base_bops, extra_bops = [], 0.0, 0.0
        for site, selection in ctx.progress(list(zip(sites, selections)), total=len(sites), label="layers"):
            divisor = None
            if site.fold and ladder:  # each unit's rung of the ladder: its divisor; order 2 expands the units on a rung
                units = channel_units(site.weight.shape[site.out_axis], site.groups)
                rungs = unit_rungs(selection, int(units.max()) + 1)
                selection, divisor = [np.flatnonzero(rungs)], channel_divisors(site.fold, rungs, units)
            elif site.fold:  # one divisor: the explicit m, or the top rung (m = 2L) under the uniform allocation
                divisor = site.fold[-1]
            expansion = expand_weight(
                site.weight, site.bits, site.axis, site.out_axis, operator, o["rex_order"], float(o["rex_budget"]), site.groups,
                outliers=self._outliers(site), window=site.combine == "pad" and selection is None, selections=selection,
                step_divisor=divisor,
            )
            if o["rex_weight_only"] is not None:  # weight-only mode: the base layer's DQ weight is emitted here
                site.node.inputs[1] = operator.emit(graph, expansion.orders[0].q, names, f"{node_label(site.node)}_weight")
            if site.node.op == "MatMul" and site.mean is not None:  # its bias is in the Add after it: correct there
                self._correct_matmul_branches(graph, site, expansion, names)
            c = site.weight.shape[site.out_axis]
            macs = layer_macs(site, shapes.get(site.node.outputs[0].name))
            base_bops += macs * site.bits
            folded = None
            if site.fold and len(expansion.orders) > 1:  # one int8 layer: each channel costs MACs × its code bits
                branches, folded = [], fold_layer(graph, site, expansion, names)
                extra_bops += macs * float(np.mean(channel_bits(folded, site.out_axis) - site.bits))
                folded_divisors = np.broadcast_to(expansion.orders[1].q.params["divisor"], (len(expansion.orders[1].channels),))
            else:
                branches = self._emit(graph, site, expansion, operator, names)
                extra_bops += macs * site.bits * sum(len(ch) / c for ch in branches)
            layers.append(
                {
                    "layer": node_label(site.node),
                    "order": len(expansion.orders),
                    "channels": c,
                    "kept_channels": [len(order.channels) for order in expansion.orders],
                    "residual_error": [round(e, 6) for e in expansion.errors],
                    "outliers": 0 if expansion.outliers is None else len(expansion.outliers[0]),
                    "branches": len(branches),
                    **({"folded_channels": len(expansion.orders[1].channels), "folded_bits": int(channel_bits(folded, site.out_axis).max()),
                        "folded_divisors": _counts(folded_divisors)} if folded else {}),
                }
            )
        cleanup(graph)
        return PassResult(
            bool(extra_bops) or o["rex_weight_only"] is not None and bool(sites),
            {
                "layers_expanded": sum(1 for layer in layers if layer["branches"] or layer.get("folded_channels")),
                "order": o["rex_order"],
                "budget": o["rex_budget"],
                "bops_relative_to_base": round((base_bops + extra_bops) / base_bops, 4) if base_bops else 1.0,
                **({"folded_channels": _rung_line(layer.get("folded_divisors", {}) for layer in layers)} if self.combine == "fold" else {}),
                "layers": layers,
            },
        )

    def _correct_matmul_branches(self, graph: gs.Graph, site: LayerSite, expansion: Expansion, names: NameFactory) -> None:
        """A MatMul has no bias input for its branches' ``−R^k·E[X]``: subtract their sum from
        the constant of the Add after the layer, where quantize put the base's correction
        (the same rule finds that Add, so both corrections land together or not at all)."""
        added = np.zeros(site.weight.shape)
        for order in expansion.orders[1:]:
            added[:, order.channels] += order.dequantized
        correct_matmul_bias(graph, site.node, -(site.mean @ added), names)

    def _outliers(self, site: LayerSite) -> int:
        """Bits of the outlier residue codes for this layer (0: no residue)."""
        return outlier_bits(site, self.options["rex_outliers"])

    def _profile(self, sites: list[LayerSite], operator: WeightOperator, ctx: PassContext, shapes: dict,
                 ladder: bool = False) -> tuple[list, np.ndarray, list, float]:
        """Every layer expanded densely once: the [K, units] error table of each (what each
        order removes from each unit), its weight energy and the MACs of one unit,
        and the budget γ × the layers' MACs (``shapes``: the inferred tensor shapes): the
        arguments of :func:`allocate_network`.
        ``ladder`` (the fold's default): the table's rows are the base and each rung of
        the layer's divisor ladder, a step costs the unit's MACs × the rung's extra code
        bits, and the budget is γ × the layers' base BOPs (Σ MACs × bits)."""
        order, unit_errors, signals, costs, total = self.options["rex_order"], [], [], [], 0.0
        for site in ctx.progress(sites, total=len(sites), label="profiling layers"):
            weights = input_moment_weights(site)
            if ladder:
                table = self._rung_errors(site, operator, weights)
            else:
                dense = expand_weight(site.weight, site.bits, site.axis, site.out_axis, operator, order, float(order - 1), site.groups,
                                      outliers=self._outliers(site), error_weights=weights, step_divisor=site.fold[-1] if site.fold else None)
                table = np.array(dense.unit_errors)
            unit_errors.append(table)
            energy = np.square(site.weight, dtype=np.float64)
            signals.append(float((energy if weights is None else energy * weights).sum()))
            macs = layer_macs(site, shapes.get(site.node.outputs[0].name))
            unit_macs = macs / table.shape[1]
            costs.append(unit_macs * np.diff(rung_bits(site.bits, site.fold)) if ladder else unit_macs)
            total += macs * (site.bits if ladder else 1)
        return unit_errors, np.array(signals), costs, float(self.options["rex_budget"]) * total

    @staticmethod
    def _rung_errors(site: LayerSite, operator: WeightOperator, weights: np.ndarray | None) -> np.ndarray:
        """The [1 + rungs, units] error table of the fold's ladder: the base, then every unit
        folded with each rung's divisor (each row a dense order-2 expansion on step s1/m; the
        base is quantized once, by the first rung's expansion, and reused by the others)."""
        rows, first = [], None
        for m in site.fold:
            dense = expand_weight(site.weight, site.bits, site.axis, site.out_axis, operator, 2, 1.0, site.groups,
                                  error_weights=weights, step_divisor=m, first_order=first)
            first = dense.orders[0] if first is None else first
            rows = rows or [dense.unit_errors[0]]
            rows.append(dense.unit_errors[1])
        return np.array(rows)

    def _permuted_layout(self, graph: gs.Graph, sites: list[LayerSite], operator: WeightOperator, ctx: PassContext, shapes: dict) -> list:
        """rex_combine="permute": the selections after reordering the channel groups (:func:`.layout.permuted_layout`)."""
        o = self.options
        if o["rex_order"] < 2 or not o["rex_budget"]:
            return [None] * len(sites)  # no branch to place: keep the channel order
        return permuted_layout(graph, sites, self._profile(sites, operator, ctx, shapes), o, ctx)

    def _emit(self, graph: gs.Graph, site: LayerSite, expansion: Expansion, operator: WeightOperator, names: NameFactory) -> list[np.ndarray]:
        """Add the outlier residue and the branches of orders ≥ 2 (and input-expansion branches);
        returns the channel sets of the added branches."""
        if expansion.outliers is not None:
            emit_outlier_branch(graph, site, expansion.outliers, names)
        o = self.options
        return emit_branches(graph, site, expansion, operator, names, o["rex_input_expansion"], o["rex_requantize"])


def _counts(values: np.ndarray) -> dict[str, int]:
    """How many times each value occurs, keyed by the value (a JSON-friendly histogram)."""
    kinds, counts = np.unique(np.asarray(values), return_counts=True)
    return {str(int(k)): int(n) for k, n in zip(kinds, counts)}


def _rung_line(histograms) -> str:
    """The summed histograms of :func:`_counts` as one summary field: ``"m=2:12 m=14:300"``
    (channels folded with each divisor; ``"none"`` when none folded)."""
    total: dict[int, int] = {}
    for histogram in histograms:
        for key, n in histogram.items():
            total[int(key)] = total.get(int(key), 0) + n
    return " ".join(f"m={k}:{total[k]}" for k in sorted(total)) or "none"


__all__ = [
    "Expansion", "Order", "Rex", "RexOptions", "allocate_network", "channel_units", "expand_weight", "outlier_mask", "residue_codes",
    "OUTLIER_SIGMAS",
]
