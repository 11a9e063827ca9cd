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
Sparse expansion (eq. 3.22): order k ≥ 2 keeps only the ``round(γ/(K−1)·C)`` output channels
with the largest residual norm (structured, magnitude importance), so its branch computes
only those channels and the extra MACs are γ × the layer's MACs (Lemma 3.1.4: more sparse
orders beat fewer dense ones at equal budget).  For grouped/depthwise Convs whole groups are
selected and the branch reads the selected groups' input channels (a Gather of the uint8
codes).

Budget allocation (``rex_allocation``): ``"uniform"`` is the thesis's rule above, the same
share γ/(K−1) of every layer per order.  ``"network"`` (default) spends the same total,
γ × Σ_l MACs_l, across the network: every layer is expanded densely once to measure what
order k removes from each unit, ``E_{k−1,u} − E_{k,u}`` with ``E`` the squared residual
weighted by E[x_i²] of the input each weight multiplies (data-free, from the BN statistics
the quantize pass used), normalised by the layer's weight energy ``Σ W²·E[x²]`` (the share
of the layer's noise-to-signal ratio it removes; to first order those add up along the
network), and units are taken by gain per MAC until the budget is spent
(:func:`allocate_network`).  Cheap layers with large relative errors (depthwise Convs, the
classifier) are expanded in full first.  Measured on MobileNetV2 / EfficientNet-Lite0 W4A8
(bench/results/rex.md): lower KL than uniform at all six model × budget points (permute form).

With bias correction (eq. 3.8) in the base layer, branch k carries ``−R^k·E[X]`` so
the corrected bias stays exact for the expanded weight.

Input expansion (``rex_input_expansion``, eqs. 3.20–3.21): the quantization error of the
input ``X − DQ(Q(X))`` is quantized again (per tensor, step S_x/254) and branches
``R^{k1} ⊗ I^{k2}`` with ``k1 + k2 ≤ K + 1`` (k2 ≥ 2) are added; a pair of total order k
computes the channels kept for weight order k (order 1: all) — it costs extra MACs beyond γ.

Emission (ORT): every branch is a standard QDQ Conv/Gemm/MatMul that ORT fuses into
QLinearConv/QGemm; its output is re-quantized to uint8 (range: the output quantizer's
range widened by the residual bounds for the base, ``±B·max_c‖R^k_c‖/‖R¹_c‖`` for order k),
moved into the full channel layout on the uint8 codes and summed with an Add that ORT fuses
into QLinearAdd.  The branches share only their input, so ORT's parallel executor can run
them concurrently.  Moving a branch into place (``rex_combine``, measured in bench/rex.py):

``"auto"`` (default) is ``"fold"`` where it applies (K = 2, uniform operator, ≤ 4-bit base,
no input expansion or outliers), else ``"permute"``.

* ``"permute"``: each channel group — a layer's output channels and every tensor
  sharing their order, through activations, Q/DQ, depthwise Convs and residual Adds, up to
  the consumers' input channels (:mod:`.common.channel_permutation`) — is reordered once, exactly,
  so every order's channels are a prefix; branches are added with a Pad of the uint8 codes:
  no Gather, so no Transposes in ORT's NHWC graph.  The layers of one group share the
  order (channels sorted by their summed share of relative error removed), each keeping
  its own number of units per order.  Layers outside a permutable group (e.g. one writing
  a graph output) use the Gather form; the report says why.
* ``"gather"``: the branch also computes one unselected unit with zero weights, whose
  output is exactly 0, and one Gather with a constant channel map reads every unexpanded
  channel from it (ORT wraps the Gather in Transposes).
* ``"pad"``: each order expands the contiguous window of channels with the largest
  residual energy (Slice of the input for grouped Convs, Pad of the output): no Gather
  and no permutation, but a window captures less error than the top channels.
* ``"scatter"``: ScatterElements with reduction="add" into the base output (opset ≥ 16).
* ``"dense"``: a full-width branch with zero rows: correct, but full MACs.
* ``"fold"`` (K = 2, ≤ 4-bit weights): no branch at all; order 2 uses the step s1/m of the
  base scale so ``R¹ + R²`` is one int8 weight with per-channel scales (:mod:`.fold`);
  layers whose codes would not fit int8 are refused and keep their base quantization.

A layer whose output is not quantized (e.g. the classifier producing the graph output)
sums the branches in float.

``rex_weight_only`` = b: without the quantize pass, quantize every constant weight of
Conv/Gemm/MatMul with the operator at b bits (DequantizeLinear weights, float activations)
and expand those (weight-only W4 of transformers such as MiniLM, whose linear layers after
GELU and attention have no data-free activation ranges).

``rex_outliers`` (weight-only mode, Gemm/MatMul; Table 3.14): weights with |w − mean| ≥ 6σ are
taken out of order 1 (which then quantizes the weights clipped to the inliers' range, so the
outliers no longer stretch the scale) and carried in a sparse residue with one scale:
``rex_outliers=1`` binary codes (sign · mean|r|, the thesis's form), ``True`` (= 8) or b
bits (with outliers from 6σ to 175σ in MiniLM one binary magnitude represents them badly:
bench/results/rex.md), added as Gather → Mul → ScatterElements(add): O(#outliers)
multiplications per row.

Refused: a pipeline without ``quantize`` before ``rex`` (the float weights are gone after
quantization, so a model quantized in an earlier run cannot be expanded), ConvTranspose,
layers whose output shape rank is unknown, non-default domains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PipelineError
from onnxopt.graph import (
    NameFactory,
    cleanup,
    constant_values,
    is_default_domain,
    node_label,
    optional_input,
    producer,
    with_inferred_shapes,
)
from onnxopt.metrics import tensor_shapes
from onnxopt.options import OptionProblem, PassOptions, option
from onnxopt.pass_base import Pass, PassContext, PassResult, Refusal, Stage

from ..common.channel_permutation import ChannelGroup, PermutationRefused, channel_group, permute
from ..common.emit import quantize_layer_bias
from ..common.layers import weight_axis
from ..common.numerics import checked_scales
from ..common.operators import QuantizedWeight, WeightOperator, weight_operator
from ..common.ops import FOLLOWING_ACTIVATIONS, WITHOUT_TRANSPOSE_OPS
from ..common.quantization import QuantizedLayers, correct_matmul_bias
from .fold import auto_combine, base_step_quantize, channel_bits, check_fold_options, fold_layer, prepare_fold
from .site import LayerSite, input_moment_weights, mean_shift, scalar_value

COMBINE_MODES = ("permute", "gather", "pad", "scatter", "dense", "fold")
ALLOCATIONS = ("uniform", "network")
OUTLIER_SIGMAS = 6.0


# --------------------------------------------------------------------------- numerics
@dataclass
class Order:
    """One expansion term: its order, the kept output channels (sorted) and the quantized
    sub-weight (the weight restricted to those channels, in the layer's layout)."""

    order: int
    channels: np.ndarray
    q: QuantizedWeight
    dequantized: np.ndarray


@dataclass
class Expansion:
    orders: list[Order]
    errors: list[float] = field(default_factory=list)  #: relative Frobenius error after each order
    max_errors: list[float] = field(default_factory=list)  #: max |W − Σ R| after each order
    #: outlier residue (rex_outliers): flat indices into the weight, int8 codes and their scale
    outliers: tuple[np.ndarray, np.ndarray, np.float32] | None = None
    #: squared residual norm of every unit (channel, or group) after each order (rows: orders)
    unit_errors: list[np.ndarray] = field(default_factory=list)


def channel_units(out_channels: int, groups: int) -> np.ndarray:
    """The selection unit of each output channel: itself (groups = 1) or its group."""
    return np.arange(out_channels) if groups == 1 else np.arange(out_channels) // (out_channels // groups)


def expand_weight(
    weight: np.ndarray, bits: int, axis: int | None, out_axis: int, operator: WeightOperator, order: int, budget: float, groups: int = 1,
    outliers: int = 0, window: bool = False, selections: list[np.ndarray] | None = None,
    error_weights: np.ndarray | None = None, step_divisor: int | None = None,
) -> Expansion:
    """Algorithm 2 with sparse orders (eq. 3.22): order 1 dense, orders 2..K each keep the
    ``round(budget/(K−1))`` share of output units (channels, or groups) with the largest
    residual norm, or the units ``selections[k − 2]`` when given (a network-wide allocation).
    ``axis`` is the scale axis (None: per tensor), ``out_axis`` the output channel axis of
    ``weight``; ``error_weights`` (broadcast to the weight, e.g. E[x_i²] of the input each
    weight multiplies) weights the squared residuals of :attr:`Expansion.unit_errors`.
    ``step_divisor`` m: order k uses the step ``s1/m^{k−1}`` of the base scale instead of
    the residual's own ``max|r|/(2^{b−1}−1)`` (the fold's operator, :mod:`.fold`)."""
    weight = np.asarray(weight, np.float64)
    out_channels = weight.shape[out_axis]
    units = channel_units(out_channels, groups)
    n_units = int(units.max()) + 1
    keep = _uniform_keep(n_units, order, budget)
    norm = float(np.linalg.norm(weight)) or 1.0
    mask = outlier_mask(weight) if outliers else np.zeros(weight.shape, bool)
    base = weight
    if mask.any():  # order 1 on the weights clipped to the inliers' range: the outliers no longer stretch the scale
        spread = np.abs(weight - weight.mean())[~mask].max(initial=0.0)
        base = np.clip(weight, weight.mean() - spread, weight.mean() + spread)
    q1 = operator.quantize(base.astype(np.float32), bits, axis)
    r1 = operator.dequantize(q1).astype(np.float64)
    residual = weight - r1
    result = Expansion([Order(1, np.arange(out_channels), q1, r1)])
    if mask.any():  # sparse residue: codes of W − R¹ at the outliers, one scale
        flat = np.flatnonzero(mask)
        values = residual.reshape(-1)[flat]
        codes, scale = residue_codes(values, int(outliers))
        residual.reshape(-1)[flat] -= codes.astype(np.float64) * scale
        result.outliers = (flat, codes, scale)
    def record() -> None:
        result.errors.append(float(np.linalg.norm(residual)) / norm)
        result.max_errors.append(float(np.abs(residual).max(initial=0.0)))
        energy = np.square(residual) if error_weights is None else np.square(residual) * error_weights
        moved = np.moveaxis(energy, out_axis, 0).reshape(out_channels, -1)
        result.unit_errors.append(np.bincount(units, weights=moved.sum(axis=1), minlength=n_units))

    record()
    for k in range(2, order + 1):
        if selections is not None:
            keep = len(selections[k - 2]) if k - 2 < len(selections) else 0
        if keep == 0:
            break
        importance = result.unit_errors[-1]
        if selections is not None:
            chosen = np.sort(np.asarray(selections[k - 2], np.int64))
        elif window:  # the contiguous run of ``keep`` units with the largest importance (combine="pad")
            sums = np.convolve(importance, np.ones(keep), mode="valid")
            start = int(np.argmax(sums))
            chosen = np.arange(start, start + keep)
        else:
            chosen = np.sort(np.argsort(-importance, kind="stable")[:keep])
        channels = np.flatnonzero(np.isin(units, chosen))
        sub = np.take(residual, channels, axis=out_axis).astype(np.float32)
        if step_divisor:
            qk = base_step_quantize(sub, q1, channels, step_divisor ** (k - 1))
        else:
            qk = operator.quantize(sub, bits, axis)
        rk = operator.dequantize(qk).astype(np.float64)
        index = [slice(None)] * residual.ndim
        index[out_axis] = channels
        residual[tuple(index)] -= rk
        result.orders.append(Order(k, channels, qk, rk))
        record()
    return result


def allocate_network(unit_errors: list[np.ndarray], signals: np.ndarray, costs: np.ndarray, budget: float) -> list[list[np.ndarray]]:
    """Network-wide sparse expansion: which units each order k ≥ 2 expands in every layer.

    ``unit_errors[l]`` is the [K, units] table of :attr:`Expansion.unit_errors` of layer l
    expanded densely (per-channel scales make the units independent: the error an order
    removes from a unit does not depend on which other units are expanded), ``signals[l]``
    the layer's weight energy ‖W_l‖² (weighted like the errors), ``costs[l]`` the MACs of one unit and ``budget`` the
    extra MACs allowed.  Candidate (l, u, k) gains ``(E_{k−1,u} − E_{k,u}) / ‖W_l‖²``, the
    share of layer l's relative weight error it removes (first order, the layers'
    noise-to-signal ratios add up along the network), and candidates are taken by gain per
    MAC until the budget is spent (greedy knapsack).  Gains are made non-increasing in k
    and ties keep k ascending, so a unit's orders are taken in order (nested selections).
    Returns, per layer, the sorted units of orders 2..K."""
    gains, layer_of, unit_of, order_of, cost_of = [], [], [], [], []
    for layer, errors in enumerate(unit_errors):
        errors = np.asarray(errors, np.float64)
        if len(errors) < 2:
            continue
        reduction = np.minimum.accumulate(np.maximum(errors[:-1] - errors[1:], 0.0), axis=0)
        n_orders, n_units = reduction.shape
        gains.append((reduction / max(float(signals[layer]), 1e-30) / max(float(costs[layer]), 1e-30)).reshape(-1))
        layer_of.append(np.full(reduction.size, layer))
        unit_of.append(np.tile(np.arange(n_units), n_orders))
        order_of.append(np.repeat(np.arange(n_orders), n_units))
        cost_of.append(np.full(reduction.size, float(costs[layer])))
    selections = [[np.zeros(0, np.int64) for _ in range(max(len(e) - 1, 0))] for e in unit_errors]
    if not gains:
        return selections
    gain, layer, unit, order, cost = (np.concatenate(a) for a in (gains, layer_of, unit_of, order_of, cost_of))
    ranking = np.lexsort((order, -gain))  # best gain per MAC first; lower orders first on ties
    taken = ranking[np.cumsum(cost[ranking]) <= budget]
    taken = taken[gain[taken] > 0]
    for l in np.unique(layer[taken]):
        mine = taken[layer[taken] == l]
        for k in range(len(selections[l])):
            selections[l][k] = np.sort(unit[mine[order[mine] == k]])
    return selections


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
    #: rex_combine="fold": the divisor m of the order-2 step s1/m (None: the default 7)
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
        sites = self._sites(graph, ctx, operator, names)
        if self.combine == "fold":
            sites = prepare_fold(sites, o, ctx)
        if self.combine == "permute":
            selections = self._permuted_layout(graph, sites, operator, ctx)
        elif o["rex_allocation"] == "network":
            selections = allocate_network(*self._profile(graph, sites, operator, ctx))
        else:
            selections = [None] * len(sites)
        layers, base_bops, extra_bops = [], 0.0, 0.0
        for site, selection in ctx.progress(list(zip(sites, selections)), total=len(sites), label="layers"):
            expansion = expand_weight(
                site.weight, site.bits, site.axis, site.out_axis, operator, o["rex_order"], float(o["rex_budget"]), site.groups,
                outliers=self._outliers(site), window=site.combine == "pad" and selection is None, selections=selection,
                step_divisor=site.fold,
            )
            if o["rex_weight_only"] is not None:  # weight-only mode: the base layer's DQ weight is emitted here
                site.node.inputs[1] = operator.emit(graph, expansion.orders[0].q, names, f"{node_label(site.node)}_weight")
            if site.node.op == "MatMul" and site.mean is not None:  # its bias is in the Add after it: correct there
                self._correct_matmul_branches(graph, site, expansion, names)
            c = site.weight.shape[site.out_axis]
            macs = _layer_macs(site)
            base_bops += macs * site.bits
            folded = None
            if site.fold and len(expansion.orders) > 1:  # one int8 layer: each channel costs MACs × its code bits
                branches, folded = [], fold_layer(graph, site, expansion, names)
                extra_bops += macs * float(np.mean(channel_bits(folded, site.out_axis) - site.bits))
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
                    **({"folded_channels": len(expansion.orders[1].channels), "folded_bits": int(channel_bits(folded, site.out_axis).max())} if folded else {}),
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
        bits = self.options["rex_outliers"]
        if not bits or site.node.op not in ("Gemm", "MatMul"):
            return 0
        return 8 if bits is True else int(bits)

    def _profile(self, graph: gs.Graph, sites: list[LayerSite], operator: WeightOperator, ctx: PassContext) -> tuple[list, np.ndarray, np.ndarray, float]:
        """Every layer expanded densely once: the [K, units] error table of each (what each
        order removes from each unit), its weight energy and the MACs of one unit,
        and the budget γ × the layers' MACs: the arguments of :func:`allocate_network`."""
        order, unit_errors, signals, costs, total = self.options["rex_order"], [], [], [], 0.0
        shapes = _inferred_shapes(graph, ctx)  # shapes behind computed pads may only be known now
        for site in ctx.progress(sites, total=len(sites), label="profiling layers"):
            weights = input_moment_weights(site)
            dense = expand_weight(site.weight, site.bits, site.axis, site.out_axis, operator, order, float(order - 1), site.groups,
                                  outliers=self._outliers(site), error_weights=weights, step_divisor=site.fold)
            unit_errors.append(np.array(dense.unit_errors))
            energy = np.square(site.weight, dtype=np.float64)
            signals.append(float((energy if weights is None else energy * weights).sum()))
            macs = _layer_macs(site, shapes.get(site.node.outputs[0].name))
            costs.append(macs / len(dense.unit_errors[0]))
            total += macs
        return unit_errors, np.array(signals), np.array(costs), float(self.options["rex_budget"]) * total

    def _permuted_layout(self, graph: gs.Graph, sites: list[LayerSite], operator: WeightOperator, ctx: PassContext) -> list:
        """rex_combine="permute": reorder each channel group (:mod:`.common.channel_permutation`) so the
        units every order expands are a prefix, then branches are added with Pad + Add.

        The group's layers (producers, and depthwise Convs inside it) share one order: its
        channels sorted by the summed share of relative error order 2 removes (ranking only
        by the partially expanded layers measured no better).  Each layer
        keeps the number of units the allocation gave it per order, taken as a prefix of
        that shared order.  Layers outside any permutable group keep their own selection
        and the Gather form.  The sites' float weights and input statistics are permuted
        like the graph."""
        o = self.options
        if o["rex_order"] < 2 or not o["rex_budget"]:
            return [None] * len(sites)  # no branch to place: keep the channel order
        unit_errors, signals, costs, budget = self._profile(graph, sites, operator, ctx)
        if o["rex_allocation"] == "network":
            selections = allocate_network(unit_errors, signals, costs, budget)
        else:
            selections = [[np.zeros(_uniform_keep(len(e[0]), o["rex_order"], float(o["rex_budget"])), np.int64)] * (len(e) - 1) for e in unit_errors]
        orders: dict[str, np.ndarray] = {}  # tensor name -> its group's order
        for group, members in self._groups(graph, sites, unit_errors, ctx):
            partial = [m for m in members if 0 < len(selections[m][0]) < group.channels]
            if not partial:
                continue  # every layer of the group expands all its channels or none: nothing to place
            score = sum(np.maximum(unit_errors[m][0] - unit_errors[m][1], 0.0) / max(signals[m], 1e-30) for m in members)
            ranking = np.argsort(-score, kind="stable")
            permute(graph, group, ranking)
            orders.update({t.name: ranking for t in group.tensors})
            for m in members:
                selections[m] = [np.arange(len(chosen)) for chosen in selections[m]]
                sites[m].combine = "pad"
        for i, site in enumerate(sites):
            _permute_site(site, orders)
            if site.combine != "pad" and o["rex_allocation"] == "uniform":
                selections[i] = None  # outside the groups: the uniform rule's own top units
        return selections

    def _groups(self, graph: gs.Graph, sites: list[LayerSite], unit_errors: list, ctx: PassContext) -> list[tuple[ChannelGroup, list[int]]]:
        """The permutable channel groups of the sites' outputs and the sites inside each."""
        groups, site_of = [], {site.node.outputs[0].name: i for i, site in enumerate(sites)}
        claimed: set[str] = set()
        for site in sites:
            name = site.node.outputs[0].name
            if site.groups > 1 or name in claimed:
                continue
            try:
                group = channel_group(graph, site.node)
            except PermutationRefused as exc:
                ctx.refuse(f"layer {node_label(site.node)}", f"channel permutation refused ({exc}): its branches use the Gather form")
                continue
            names = {t.name for t in group.tensors}
            claimed |= names
            members = [site_of[n] for n in names if n in site_of and len(unit_errors[site_of[n]][0]) == group.channels]
            groups.append((group, sorted(members)))
        return groups

    # ------------------------------------------------------------------ match/check
    def _sites(self, graph: gs.Graph, ctx: PassContext, operator: WeightOperator, names: NameFactory) -> list[LayerSite]:
        bits_only = self.options["rex_weight_only"]
        quantized = ctx.artifact(QuantizedLayers)
        records = quantized.layers if quantized is not None and bits_only is None else {}
        sites = []
        for node in list(graph.nodes):
            if node.op not in WITHOUT_TRANSPOSE_OPS or not node.outputs or not is_default_domain(node):
                continue
            key = node.outputs[0].name
            if bits_only is None:
                if key not in records:
                    continue
                record = records[key]
                weight, bits, per_channel, mean, moment = record.float_weight, record.bits, record.per_channel, record.input_mean, record.input_moment
            else:
                weight = constant_values(node, 1)
                if weight is None or not np.issubdtype(weight.dtype, np.floating) or weight.ndim < 2:
                    continue
                bits, per_channel, mean, moment = bits_only, True, None, None
            reason = self._check(node, weight)
            if reason:
                ctx.refuse(f"layer {node_label(node)}", reason)
                continue
            site = self._site(graph, node, weight, bits, per_channel, mean, moment)
            sites.append(site)
        return sites

    def _check(self, node: gs.Node, weight: np.ndarray) -> str | None:
        if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0):
            return "Gemm with transA or alpha/beta ≠ 1"
        if node.op == "MatMul" and weight.ndim != 2:
            return "MatMul with a weight of rank ≠ 2"
        if _output_rank(node) is None:
            return "output rank unknown (run shape inference)"
        return None

    def _site(
        self, graph: gs.Graph, node: gs.Node, weight: np.ndarray, bits: int, per_channel: bool, mean: np.ndarray | None, moment: np.ndarray | None
    ) -> LayerSite:
        out_axis = weight_axis(node)
        groups = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
        source = producer(node.inputs[0])
        input_dq = source if source is not None and source.op == "DequantizeLinear" and scalar_value(source.inputs[1]) is not None else None
        if node.op not in ("Conv", "Gemm", "MatMul"):
            mean = None
        combine = "gather" if self.combine == "permute" else self.combine  # permute: set per layer later
        return LayerSite(node, np.asarray(weight, np.float32), bits, out_axis if per_channel else None, out_axis, groups, mean, moment, input_dq,
                         _output_range(node), _output_rank(node), combine)

    # ------------------------------------------------------------------ rewrite
    def _emit(self, graph: gs.Graph, site: LayerSite, expansion: Expansion, operator: WeightOperator, names: NameFactory) -> list[np.ndarray]:
        """Add the branches of orders ≥ 2 (and input-expansion branches); returns the channel
        sets of the added branches."""
        terms = [(order, None) for order in expansion.orders[1:]]
        if expansion.outliers is not None:
            self._outlier_branch(graph, site, expansion.outliers, names)
        if self.options["rex_input_expansion"] and site.input_dq is not None:
            x2 = self._input_residual(graph, site, names)
            # pairs (R^{k1}, I²) with k1 + 2 ≤ K + 1, on the channels kept for weight order k1 + 1
            # (higher input orders I^{k≥3} are below the 8-bit output quantizer's step: not emitted)
            for k1 in range(1, len(expansion.orders)):
                weight_order, next_order = expansion.orders[k1 - 1], expansion.orders[k1]
                channels = np.intersect1d(weight_order.channels, next_order.channels)
                if len(channels):
                    terms.append((_restricted(weight_order, channels, site.out_axis), x2))
        if not terms:
            return []
        base = site.node
        label = node_label(base)
        out = base.outputs[0]
        y1 = gs.Variable(names.new(f"{label}_rex_order1"), dtype=np.float32, shape=out.shape)
        base.outputs[0] = y1
        fused = self.options["rex_requantize"] and site.output_range is not None and site.input_dq is not None
        bounds = self._branch_bounds(site, expansion, terms) if fused else None
        summands = [self._requantize(graph, y1, bounds[0], names, f"{label}_rex_order1") if fused else y1]
        mode = site.combine
        scatter_into = summands[0]
        c = site.weight.shape[site.out_axis]
        for index, (order, source) in enumerate(terms):
            tag = f"{label}_rex_order{order.order}" + ("_input2" if source is not None else "")
            partial = len(order.channels) < c and not (mode == "dense" and site.groups == 1)
            slot = None
            if partial and mode in ("gather", "dense"):  # one zero-weight unit gives Gather its zero slot (no Pad)
                order, slot = _with_zero_unit(order, site)
            y = self._branch(graph, site, order, source, names, tag, operator)
            if fused:
                y = self._requantize(graph, y, bounds[index + 1], names, tag, keep_codes=partial and mode not in ("scatter",))
            if not partial:
                summands.append(y)
            elif mode == "pad":
                summands.append(self._pad_combine(graph, site, order.channels, y, names, tag))
            elif mode == "scatter":
                scatter_into = self._scatter_combine(graph, site, order.channels, scatter_into, y, names, tag)
            else:  # gather (also the grouped-Conv fallback of dense)
                summands.append(self._gather_combine(graph, site, order.channels, y, names, tag, slot))
        if mode == "scatter":
            summands = [scatter_into] + [s for s in summands[1:]]
        total = summands[0]
        for i, term in enumerate(summands[1:]):
            last = i == len(summands) - 2
            result = out if last else gs.Variable(names.new(f"{label}_rex_sum"), dtype=np.float32, shape=out.shape)
            graph.nodes.append(gs.Node("Add", names.new(f"{label}_rex_add"), inputs=[total, term], outputs=[result]))
            total = result
        if total is not out:
            graph.nodes.append(gs.Node("Identity", names.new(f"{label}_rex_out"), inputs=[total], outputs=[out]))
        return [order.channels for order, _ in terms]

    def _outlier_branch(self, graph: gs.Graph, site: LayerSite, outliers: tuple, names: NameFactory) -> None:
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

    def _branch(self, graph: gs.Graph, site: LayerSite, order: Order, source: gs.Tensor | None, names: NameFactory, tag: str, operator: WeightOperator) -> gs.Variable:
        """The branch layer computing only ``order.channels`` (full width when combine="dense")."""
        base = site.node
        c = site.weight.shape[site.out_axis]
        dense = site.combine == "dense" and len(order.channels) < c and site.groups == 1
        q = order.q
        if dense:
            q = _scatter_rows(q, order.channels, c, site.out_axis)
        channels = np.arange(c) if dense else order.channels
        x = source if source is not None else base.inputs[0]
        attrs = dict(base.attrs)
        if site.groups > 1 and len(channels) < c:
            x, attrs["group"] = self._gather_input(graph, site, channels, x, names, tag)
        weight = operator.emit(graph, q, names, f"{tag}_weight")
        inputs = [x, weight]
        bias = None if site.mean is None or source is not None or base.op == "MatMul" else mean_shift(site, order.dequantized, order.channels)
        if dense and bias is not None:
            full = np.zeros(c, np.float32)
            full[order.channels] = bias
            bias = full
        y = gs.Variable(names.new(tag), dtype=np.float32, shape=None)
        node = gs.Node(base.op, names.new(f"{tag}_{base.op}"), attrs=attrs, inputs=inputs, outputs=[y])
        if bias is not None:
            node.inputs.append(gs.Constant(names.new(f"{tag}_bias"), (-bias).astype(np.float32)))
            if site.input_dq is not None and source is None:
                quantize_layer_bias(graph, node, scalar_value(site.input_dq.inputs[1]), q.scales, names)
        graph.nodes.append(node)
        return y

    def _gather_input(self, graph: gs.Graph, site: LayerSite, channels: np.ndarray, x: gs.Tensor, names: NameFactory, tag: str) -> tuple[gs.Tensor, int]:
        """Input channels read by the selected groups of a grouped Conv; gathered on the
        uint8 codes when the input is a per-tensor DequantizeLinear (keeps ORT's fusion)."""
        c = site.weight.shape[0]
        per_group_out, per_group_in = c // site.groups, site.weight.shape[1]
        chosen = np.unique(channels // per_group_out)
        wanted = (chosen[:, None] * per_group_in + np.arange(per_group_in)).reshape(-1).astype(np.int64)
        dq = producer(x)
        on_codes = dq is not None and dq.op == "DequantizeLinear" and scalar_value(dq.inputs[1]) is not None
        source = dq.inputs[0] if on_codes else x
        picked = gs.Variable(names.new(f"{tag}_input_codes" if on_codes else f"{tag}_input"), dtype=source.dtype, shape=None)
        if np.all(np.diff(wanted) == 1):  # contiguous (combine="pad"): Slice, which ORT's NHWC layout handles
            bounds = [gs.Constant(names.new(f"{tag}_input_{k}"), np.array([v], np.int64)) for k, v in (("start", wanted[0]), ("end", wanted[-1] + 1), ("axis", 1))]
            graph.nodes.append(gs.Node("Slice", names.new(f"{tag}_input_Slice"), inputs=[source, *bounds], outputs=[picked]))
        else:
            index = gs.Constant(names.new(f"{tag}_input_channels"), wanted)
            graph.nodes.append(gs.Node("Gather", names.new(f"{tag}_input_Gather"), attrs={"axis": 1}, inputs=[source, index], outputs=[picked]))
        if not on_codes:
            return picked, len(chosen)
        gathered = gs.Variable(names.new(f"{tag}_input"), dtype=np.float32, shape=None)
        graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{tag}_input_DequantizeLinear"), inputs=[picked, *dq.inputs[1:]], outputs=[gathered]))
        return gathered, len(chosen)

    def _input_residual(self, graph: gs.Graph, site: LayerSite, names: NameFactory) -> gs.Variable:
        """I² = DQ(Q(X − DQ(Q(X)))) with step S_x/254 (eq. 3.20), symmetric uint8."""
        dq = site.input_dq
        quant = producer(dq.inputs[0])
        x = quant.inputs[0] if quant is not None and quant.op == "QuantizeLinear" else dq.outputs[0]
        label = f"{node_label(site.node)}_rex_input2"
        diff = gs.Variable(names.new(f"{label}_error"), dtype=np.float32, shape=None)
        graph.nodes.append(gs.Node("Sub", names.new(f"{label}_Sub"), inputs=[x, dq.outputs[0]], outputs=[diff]))
        scale = float(scalar_value(dq.inputs[1])) / 254.0
        return self._requantize(graph, diff, (scale, 128), names, label)

    def _branch_bounds(self, site: LayerSite, expansion: Expansion, terms: list) -> list[tuple[float, int]]:
        """(scale, zero point) of the uint8 quantizer of each branch output: order k (k ≥ 2)
        symmetric ±B·max_c ‖R^k_c‖/‖R¹_c‖ (B the output quantizer's bound); the base order
        covers the output range widened by the sum of those bounds, so anything it clips the
        output quantizer clips too."""
        lo, hi = site.output_range
        bound = max(abs(lo), abs(hi))
        r1 = np.moveaxis(expansion.orders[0].dequantized, site.out_axis, 0).reshape(site.weight.shape[site.out_axis], -1)
        n1 = np.linalg.norm(r1, axis=1)
        result = []
        for order, source in terms:
            rk = np.moveaxis(order.dequantized, site.out_axis, 0).reshape(len(order.channels), -1)
            ratio = np.linalg.norm(rk, axis=1) / np.maximum(n1[order.channels], 1e-12)
            b = bound * float(np.max(ratio, initial=0.0))
            if source is not None:  # R^{k1} ⊗ I²: the input error is at most S_x/2 per element
                b = bound / 127.0
            result.append((max(b, 1e-12) / 127.0, 128))
        extra = sum(s * 127.0 for s, _ in result)
        low, high = lo - extra, hi + extra
        scale = (high - low) / 255.0
        return [(scale, int(np.clip(np.round(-low / scale), 0, 255)))] + result

    def _requantize(self, graph: gs.Graph, y: gs.Tensor, quant: tuple[float, int], names: NameFactory, tag: str, keep_codes: bool = False):
        """Q→DQ on ``y`` (uint8); with keep_codes the codes and quantizer are returned so the
        channel movement happens on uint8 before the DequantizeLinear."""
        scale = gs.Constant(names.new(f"{tag}_out_scale"), checked_scales(quant[0], f"{tag} output"))
        zero = gs.Constant(names.new(f"{tag}_out_zero_point"), np.array(quant[1], np.uint8))
        codes = gs.Variable(names.new(f"{tag}_out_quantized"), dtype=np.uint8, shape=None)
        graph.nodes.append(gs.Node("QuantizeLinear", names.new(f"{tag}_out_QuantizeLinear"), inputs=[y, scale, zero], outputs=[codes]))
        if keep_codes:
            return codes, scale, zero
        return self._dequantize(graph, codes, scale, zero, names, tag)

    def _dequantize(self, graph: gs.Graph, codes, scale, zero, names: NameFactory, tag: str) -> gs.Variable:
        out = gs.Variable(names.new(f"{tag}_out_dequantized"), dtype=np.float32, shape=None)
        graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{tag}_out_DequantizeLinear"), inputs=[codes, scale, zero], outputs=[out]))
        return out

    def _gather_combine(self, graph: gs.Graph, site: LayerSite, channels: np.ndarray, y, names: NameFactory, tag: str, slot: int) -> gs.Variable:
        """Branch output → full channel layout with one Gather (channel map: c ↦ its position
        in the branch, or ``slot``, the branch's zero-weight unit whose output is exactly 0)."""
        c = site.weight.shape[site.out_axis]
        codes, quant = (y[0], y[1:]) if isinstance(y, tuple) else (y, None)
        axis = _output_channel_axis(site)
        channel_map = np.full(c, slot, np.int64)
        channel_map[channels] = np.arange(len(channels))
        padded = codes
        placed = gs.Variable(names.new(f"{tag}_placed"), dtype=codes.dtype, shape=None)
        graph.nodes.append(
            gs.Node("Gather", names.new(f"{tag}_Gather"), attrs={"axis": axis}, inputs=[padded, gs.Constant(names.new(f"{tag}_channel_map"), channel_map)], outputs=[placed])
        )
        return placed if quant is None else self._dequantize(graph, placed, *quant, names, tag)

    def _pad_combine(self, graph: gs.Graph, site: LayerSite, channels: np.ndarray, y, names: NameFactory, tag: str) -> gs.Variable:
        """A contiguous window of channels [a, a+n) → full layout: Pad the channel axis with
        a before and C − a − n after, with the zero point (on the uint8 codes when quantized)."""
        c = site.weight.shape[site.out_axis]
        codes, quant = (y[0], y[1:]) if isinstance(y, tuple) else (y, None)
        axis = _output_channel_axis(site)
        pads = np.zeros(2 * site.rank, np.int64)
        pads[axis], pads[site.rank + axis] = channels[0], c - channels[-1] - 1
        value = quant[1] if quant is not None else gs.Constant(names.new(f"{tag}_pad_value"), np.array(0, np.float32))
        padded = gs.Variable(names.new(f"{tag}_padded"), dtype=codes.dtype, shape=None)
        graph.nodes.append(gs.Node("Pad", names.new(f"{tag}_Pad"), inputs=[codes, gs.Constant(names.new(f"{tag}_pads"), pads), value], outputs=[padded]))
        return padded if quant is None else self._dequantize(graph, padded, *quant, names, tag)

    def _scatter_combine(self, graph: gs.Graph, site: LayerSite, channels: np.ndarray, into: gs.Tensor, y: gs.Tensor, names: NameFactory, tag: str) -> gs.Variable:
        """ScatterElements(into, index expanded to the branch's shape, y, reduction=add)."""
        if graph.opset < 16:
            raise PipelineError("rex: rex_combine='scatter' needs opset ≥ 16 (ScatterElements reduction)")
        axis = _output_channel_axis(site)
        shape = [1] * site.rank
        shape[axis] = len(channels)
        index = gs.Constant(names.new(f"{tag}_channels"), channels.astype(np.int64).reshape(shape))
        y_shape = gs.Variable(names.new(f"{tag}_shape"), dtype=np.int64, shape=[site.rank])
        graph.nodes.append(gs.Node("Shape", names.new(f"{tag}_Shape"), inputs=[y], outputs=[y_shape]))
        expanded = gs.Variable(names.new(f"{tag}_index"), dtype=np.int64, shape=None)
        graph.nodes.append(gs.Node("Expand", names.new(f"{tag}_Expand"), inputs=[index, y_shape], outputs=[expanded]))
        out = gs.Variable(names.new(f"{tag}_scattered"), dtype=np.float32, shape=None)
        graph.nodes.append(gs.Node("ScatterElements", names.new(f"{tag}_ScatterElements"), attrs={"axis": axis, "reduction": "add"}, inputs=[into, expanded, y], outputs=[out]))
        return out


# --------------------------------------------------------------------------- helpers
def _output_rank(node: gs.Node) -> int | None:
    if node.op == "Conv":
        weight = node.inputs[1]
        return len(weight.shape) if weight.shape is not None else None
    if node.op == "Gemm":
        return 2
    shape = node.outputs[0].shape if node.outputs[0].shape is not None else node.inputs[0].shape
    return len(shape) if shape is not None else None


def _output_channel_axis(site: LayerSite) -> int:
    return site.rank - 1 if site.node.op == "MatMul" else 1


def _output_range(node: gs.Node) -> tuple[float, float] | None:
    """Range [lo, hi] of the QuantizeLinear reading the layer's output (after Relu/Clip)."""
    current = node.outputs[0]
    while len(current.outputs) == 1 and current.outputs[0].op in FOLLOWING_ACTIVATIONS and current.outputs[0].outputs:
        current = current.outputs[0].outputs[0]
    for reader in current.outputs:
        if reader.op == "QuantizeLinear":
            scale, zero = scalar_value(reader.inputs[1]), optional_input(reader, 2)
            zp = int(np.asarray(zero.values).reshape(())) if isinstance(zero, gs.Constant) else 0
            if scale is None:
                return None
            top = 255 if zero is None or np.asarray(zero.values).dtype == np.uint8 else 127
            low = 0 if top == 255 else -128
            return float((low - zp) * scale), float((top - zp) * scale)
    return None


def _with_zero_unit(order: Order, site: LayerSite) -> tuple[Order, int]:
    """``order`` plus one unselected unit (channel, or group) with zero weights; returns it and
    the position of the unit's first channel among the branch's channels.  The branch's
    output there is exactly 0 (zero weights, zero bias): Gather reads it for every channel
    the order does not expand."""
    c = site.weight.shape[site.out_axis]
    units = channel_units(c, site.groups)
    chosen = np.zeros(int(units.max()) + 1, bool)
    chosen[units[order.channels]] = True
    dummy = int(np.flatnonzero(~chosen)[0])
    extra = np.flatnonzero(units == dummy)
    channels = np.concatenate([order.channels, extra])
    ranking = np.argsort(channels, kind="stable")
    q = order.q
    zeros = list(q.codes.shape)
    zeros[site.out_axis] = len(extra)
    codes = np.take(np.concatenate([q.codes, np.zeros(zeros, q.codes.dtype)], axis=site.out_axis), ranking, axis=site.out_axis)
    dequantized = np.take(np.concatenate([order.dequantized, np.zeros(zeros)], axis=site.out_axis), ranking, axis=site.out_axis)
    scales = q.scales
    if q.axis is not None:
        scales = np.concatenate([q.scales, np.full(len(extra), np.max(q.scales), np.float32)])[ranking]
    sorted_channels = channels[ranking]
    widened = Order(order.order, sorted_channels, QuantizedWeight(codes, scales, q.axis, q.bits, dict(q.params)), dequantized)
    return widened, int(np.searchsorted(sorted_channels, extra[0]))


def _restricted(order: Order, channels: np.ndarray, out_axis: int) -> Order:
    """``order`` restricted to ``channels`` (a subset of its own channels)."""
    position = np.searchsorted(order.channels, channels)
    q = order.q
    codes = np.take(q.codes, position, axis=out_axis)
    scales = np.take(q.scales, position) if q.axis is not None else q.scales
    return Order(order.order, channels, QuantizedWeight(codes, scales, q.axis, q.bits, dict(q.params)), np.take(order.dequantized, position, axis=out_axis))


def _scatter_rows(q: QuantizedWeight, channels: np.ndarray, c: int, out_axis: int) -> QuantizedWeight:
    """A full-width quantized weight with zero codes outside ``channels`` (dense branch)."""
    shape = list(q.codes.shape)
    shape[out_axis] = c
    codes = np.zeros(shape, q.codes.dtype)
    index = [slice(None)] * len(shape)
    index[out_axis] = channels
    codes[tuple(index)] = q.codes
    scales = q.scales
    if q.axis is not None:
        scales = np.ones(c, np.float32) * np.float32(np.max(q.scales))
        scales[channels] = q.scales
    return QuantizedWeight(codes, scales, q.axis, q.bits, dict(q.params))


def _inferred_shapes(graph: gs.Graph, ctx: PassContext) -> dict[str, list[int | None]]:
    """Every tensor's shape from a fresh shape inference of the graph as it is now."""
    return tensor_shapes(with_inferred_shapes(ctx.export(graph)))


def _uniform_keep(n_units: int, order: int, budget: float) -> int:
    """Units each order k ≥ 2 keeps under the uniform rule: round(γ/(K−1)·units)."""
    return 0 if order < 2 else min(int(round(min(budget, order - 1) / (order - 1) * n_units)), n_units)


def _permute_site(site: LayerSite, orders: dict[str, np.ndarray]) -> None:
    """Apply the group orders of the layer's output and input channels to its float weight
    (rows, and columns of a dense layer) and input statistics, as :func:`permute` did to the graph."""
    out_order, in_order = orders.get(site.node.outputs[0].name), orders.get(site.node.inputs[0].name)
    if out_order is not None:
        site.weight = np.take(site.weight, out_order, axis=site.out_axis)
    if in_order is None:
        return
    if site.groups == 1:
        in_axis = 1 if site.node.op == "Conv" else 1 - site.out_axis
        site.weight = np.take(site.weight, in_order, axis=in_axis)
    site.mean = None if site.mean is None else site.mean[in_order]
    site.moment = None if site.moment is None else site.moment[in_order]


def _layer_macs(site: LayerSite, shape: list | None = None) -> float:
    """MACs of the base layer per sample (1 for an axis of unknown size: relative use)."""
    shape = shape if shape is not None else site.node.outputs[0].shape
    positions = 1.0
    if shape is not None:  # every axis but the batch (0) and the channel axis
        dims = [d for i, d in enumerate(shape) if i not in (0, _output_channel_axis(site))]
        positions = float(np.prod([d if isinstance(d, (int, np.integer)) else 1 for d in dims]))
    w = site.weight
    per_output = w.size / w.shape[site.out_axis]
    return positions * w.shape[site.out_axis] * per_output


__all__ = ["Expansion", "Order", "Rex", "expand_weight", "outlier_mask"]
