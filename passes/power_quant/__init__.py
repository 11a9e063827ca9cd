"""power-quant: PowerQuant non-uniform quantization of weights and activations
(docs/powerquant.md; thesis §3.1.3, eqs. 3.13–3.15, Lemma 3.1.2).

Before::   x ── Conv(W, b) ── Relu ── Conv(W2, b2) ── y
After::    x ── Conv(W, b) ── Relu ── PowerQ ── PowerDQ ──┐
                                       q_W2 (int8) ── PowerDQ ──┴── Conv(·, ·, b2) ── y

Operator (eq. 3.13, per output channel for weights, per tensor for activations)::

    Q_a(W)    = round(L·sign(W)·|W|^a / max|W|^a),   L = 2^{b−1} − 1 (2^b − 1 unsigned)
    Q_a⁻¹(q)  = sign(q)·(|q|·max|W|^a / L)^{1/a}                         (eq. 3.15)

The custom ops ``ai.onnxopt::PowerQuantizeLinear`` / ``PowerDequantizeLinear`` carry
model-local function bodies (:mod:`onnxopt.runtime_ops`), so stock ORT runs the result.

Exponent: one global a minimising ``Σ_l ‖W_l − Q_a⁻¹(Q_a(W_l))‖₂`` (eq. 3.14) with scipy's
Nelder–Mead (the error is locally convex with a unique optimum, Lemma 3.1.2), or a fixed
``power_exponent``.  ``power_per_layer=True`` searches one exponent per layer instead (the
thesis found it lowers the weight error but not the accuracy; the benchmark measures it).
Activations use the same a (with per-layer exponents: the reading layer's);
``power_activations=False`` quantizes them uniformly (a = 1, same ops) — an ablation.
``power_error_curve=True`` puts the error over a ∈ [0.2, 1] into the report.

Activation ranges come from :mod:`onnxopt.passes.common.ranges` exactly as in the
``quantize`` pass (BN statistics with λ, or calibration data; the graph input stays float
unless ``input_range`` is given).  Bias correction (eq. 3.8, ``bias_correction=True``, as in
``quantize``): ``b += (W − Q_a⁻¹(Q_a(W)))·E[X]`` with E[X] from the statistics.  Weights are stored as int8 codes (≥ 4× smaller than
float32) with a float scale per output channel.  The first and last layer keep
``first_last_bits`` (8) like the ``quantize`` pass.

Integer path (``power_integer="auto"``): with a = 0.5 the decoded value is ``s²·q|q|`` — an
integer times a scale.  When both decoded integers fit 8 bits (weights q|q| ≤ 49 at W4;
activations at ≤ 4 bits) the layer becomes ConvInteger/MatMulInteger on the decoded integers
(weights stored uint8 ``q|q| + 128`` with zero point 128, docs/custom-ops.md) and the scales are
applied after: the same numbers as the float path up to float rounding.  At A8 the decoded
activation (up to 127²) does not fit 8 bits: those layers keep the float path.

Exponent 1 (fixed, or the search's result for every layer) is uniform quantization: the
pass then emits what the ``quantize`` pass emits (standard QDQ that ORT fuses into integer
kernels, with the same bit-width and range options) instead of the custom ops, and says so
in its stats (``emitted="QDQ"`` and a note).

Refused (reported per layer): non-constant or non-float weights, Gemm with transA or
alpha/beta ≠ 1, MatMul other than matrix × constant matrix, bias not an initializer, shared
weights (copy-on-write keeps other readers on the float weight).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import (
    NameFactory,
    cleanup,
    constant_values,
    is_default_domain,
    node_label,
    per_channel,
    set_constant_input,
)
from onnxopt.options import OptionProblem, option
from onnxopt.pass_base import Pass, PassContext, PassResult, PreconditionFailed, Refusal, Stage
from onnxopt.runtime_ops import DOMAIN, MIN_OPSET, add_functions_to_graph

from ..common.calibration import calibration_samples
from ..common.layers import transposed_weight, weight_axis
from ..common.numerics import checked_scales
from ..common.operators import QuantizedWeight, register_operator
from ..common.ops import WITHOUT_TRANSPOSE_OPS
from ..common.quantization import QuantizationOptions, float_label, layer_refusal, mean_shift, no_layer_message
from ..common.measured_ranges import calibrated_ranges, moment_ranges, statistics_sites
from ..common.ranges import ChannelRange, RangeEstimator, default_lambda
from ..common.statistics import bn_statistics

EXPONENT_BOUNDS = (0.05, 1.0)
CURVE = np.round(np.arange(0.2, 1.0001, 0.05), 4)
TINY = 1e-12
#: Options the uniform fallback at exponent 1 hands to the quantize pass (the rest keep its defaults).
UNIFORM_OPTIONS = ("weight_bits", "act_bits", "act_ranges", "calibration_data", "lam", "input_range", "add_range", "first_last_bits", "bias_correction")
UNIFORM_NOTE = "exponent 1 is uniform quantization: standard QDQ emitted (as the quantize pass), not the slower custom ops"

# --------------------------------------------------------------------------- numerics
def levels(bits: int, signed: bool = True) -> int:
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def power_scales(weight: np.ndarray, bits: int, a: float, axis: int | None) -> np.ndarray:
    """Power-domain steps ``max|W|^a / L``: one per slice along ``axis`` (or a scalar)."""
    magnitude = np.abs(weight)
    top = magnitude.max() if axis is None else magnitude.max(axis=tuple(i for i in range(weight.ndim) if i != axis))
    return np.maximum(np.power(np.maximum(top, TINY), a) / levels(bits), TINY)


def _broadcast(scales: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
    return scales if axis is None else per_channel(scales, axis, rank)


def power_quantize(weight: np.ndarray, bits: int, a: float, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(int codes, steps) of eq. 3.13 (symmetric, per slice along ``axis``)."""
    scales = power_scales(weight, bits, a, axis)
    top = levels(bits)
    codes = np.clip(np.round(np.power(np.abs(weight), a) / _broadcast(scales, axis, weight.ndim)) * np.sign(weight), -top, top)
    return codes.astype(np.int8 if bits <= 8 else np.int32), scales


def power_dequantize(codes: np.ndarray, scales: np.ndarray, a: float, axis: int | None) -> np.ndarray:
    """eq. 3.15: ``sign(q)·(|q|·s)^{1/a}``."""
    q = codes.astype(np.float64)
    return np.sign(q) * np.power(np.abs(q) * _broadcast(scales, axis, codes.ndim), 1.0 / a)


def reconstruction_error(weight: np.ndarray, bits: int, a: float, axis: int | None) -> float:
    """‖W − Q_a⁻¹(Q_a(W))‖₂ of one layer."""
    codes, scales = power_quantize(weight, bits, a, axis)
    return float(np.linalg.norm(weight - power_dequantize(codes, scales, a, axis)))


def total_error(weights: list[tuple[np.ndarray, int, int | None]], a: float) -> float:
    """eq. 3.14: Σ_l ‖W_l − Q_a⁻¹(Q_a(W_l))‖₂."""
    return sum(reconstruction_error(w, bits, a, axis) for w, bits, axis in weights)


class NormalizedWeight:
    """A layer prepared for fast error evaluation over a.  With ``u = |W| / max|W|`` per
    channel, ``Q_a`` gives ``q = round(L·u^a)`` — the count of thresholds
    ``t_k = ((k + ½)/L)^{1/a}`` below u, the same for every channel — and ``Q_a⁻¹`` gives
    ``max|W|·(q/L)^{1/a}``.  With the elements sorted by u once, the codes are a step
    function: the squared error is, per code k, ``Σ m²(u − d_k)²`` over a contiguous run,
    read off prefix sums of m², m²u and m²u².  One evaluation costs O(L log n) instead of
    two powers per weight (ties at exactly ½ may round the other way: irrelevant for the
    search; the emitted codes use :func:`power_quantize`)."""

    def __init__(self, weight: np.ndarray, bits: int, axis: int | None) -> None:
        magnitude = np.abs(weight)
        top = magnitude.max() if axis is None else magnitude.max(axis=tuple(i for i in range(weight.ndim) if i != axis), keepdims=True)
        top = np.maximum(top, TINY)
        u = (magnitude / top).ravel()
        m2 = np.broadcast_to(top, weight.shape).ravel() ** 2
        order = np.argsort(u, kind="stable")
        self.u = u[order]
        zero = np.zeros(1)
        self.p0 = np.concatenate([zero, np.cumsum(m2[order])])
        self.p1 = np.concatenate([zero, np.cumsum(m2[order] * self.u)])
        self.p2 = np.concatenate([zero, np.cumsum(m2[order] * self.u**2)])
        self.levels = levels(bits)

    def error(self, a: float) -> float:
        thresholds = ((np.arange(self.levels) + 0.5) / self.levels) ** (1.0 / a)
        bounds = np.concatenate([[0], np.searchsorted(self.u, thresholds, side="right"), [len(self.u)]])
        decoded = (np.arange(self.levels + 1) / self.levels) ** (1.0 / a)
        s0, s1, s2 = (np.diff(p[bounds]) for p in (self.p0, self.p1, self.p2))
        return float(np.sqrt(max(np.sum(s2 - 2 * decoded * s1 + decoded**2 * s0), 0.0)))


def fast_total_error(prepared: list[NormalizedWeight], a: float) -> float:
    return sum(p.error(a) for p in prepared)


def search_exponent(weights: list[tuple[np.ndarray, int, int | None]], start: float = 0.5) -> float:
    """Nelder–Mead on eq. 3.14 (exponent clipped to (0.05, 1])."""
    low, high = EXPONENT_BOUNDS
    prepared = [NormalizedWeight(w, bits, axis) for w, bits, axis in weights]

    def objective(x: np.ndarray) -> float:
        return fast_total_error(prepared, float(np.clip(x[0], low, high)))

    from scipy.optimize import minimize  # imported when used: scipy.optimize is slow to import

    result = minimize(objective, x0=[start], method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-12, "initial_simplex": [[start], [start + 0.1]]})
    return float(np.clip(result.x[0], low, high))


# --------------------------------------------------------------------------- REx interface
class PowerWeightOperator:
    """PowerQuant as a weight operator (``WeightOperator`` protocol of
    ``passes/common/operators.py``): quantize / dequantize / emit."""

    name = "power"

    def __init__(self, exponent: float = 0.5) -> None:
        self.exponent = float(exponent)

    def quantize(self, weight: np.ndarray, bits: int, axis: int | None) -> QuantizedWeight:
        codes, scales = power_quantize(weight.astype(np.float64), bits, self.exponent, axis)
        return QuantizedWeight(codes=codes, scales=scales.astype(np.float32), axis=axis, bits=bits, params={"exponent": self.exponent})

    def dequantize(self, q: QuantizedWeight) -> np.ndarray:
        return power_dequantize(q.codes, q.scales.astype(np.float64), float(q.params.get("exponent", self.exponent)), q.axis).astype(np.float32)

    def emit(self, graph: gs.Graph, q: QuantizedWeight, names: NameFactory) -> gs.Variable:
        base = names.new("power_weight")
        result = emit_weight(graph, q.codes, q.scales, q.axis, float(q.params.get("exponent", self.exponent)), q.bits, base, names)
        add_functions_to_graph(graph)
        return result


# --------------------------------------------------------------------------- emission
def emit_weight(graph: gs.Graph, codes: np.ndarray, scales: np.ndarray, axis: int | None, a: float, bits: int, base: str, names: NameFactory) -> gs.Variable:
    """int8 codes ── PowerDequantizeLinear(scale broadcast along ``axis``) ── float weight."""
    steps = _broadcast(checked_scales(scales, base), axis, codes.ndim)
    inputs = [gs.Constant(names.new(f"{base}_codes"), codes), gs.Constant(names.new(f"{base}_scale"), steps)]
    out = gs.Variable(names.new(f"{base}_dequantized"), dtype=np.float32, shape=list(codes.shape))
    graph.nodes.append(gs.Node("PowerDequantizeLinear", names.new(f"{base}_PowerDequantizeLinear"), attrs={"exponent": float(a), "bits": int(bits)}, inputs=inputs, outputs=[out], domain=DOMAIN))
    return out


@dataclass(frozen=True)
class ActivationPower:
    """Per-tensor power quantizer of an activation."""

    scale: float
    signed: bool
    bits: int
    exponent: float

    @property
    def max_code(self) -> int:
        return levels(self.bits, self.signed)


def activation_power(r: ChannelRange, bits: int, a: float) -> ActivationPower:
    signed = not bool(np.all(r.lo >= 0))
    bound = float(max(np.abs(r.lo).max(), np.abs(r.hi).max())) if signed else float(r.hi.max())
    return ActivationPower(max(bound, TINY) ** a / levels(bits, signed), signed, bits, a)


def _quantize_node(tensor: gs.Tensor, quant: ActivationPower, names: NameFactory) -> tuple[gs.Node, gs.Variable, gs.Constant]:
    base = tensor.name
    scale = gs.Constant(names.new(f"{base}_power_scale"), checked_scales(quant.scale, f"activation {base}"))
    codes = gs.Variable(names.new(f"{base}_power_codes"), dtype=np.int32, shape=tensor.shape)
    attrs = {"exponent": float(quant.exponent), "bits": int(quant.bits), "signed": int(quant.signed)}
    node = gs.Node("PowerQuantizeLinear", names.new(f"{base}_PowerQuantizeLinear"), attrs=attrs, inputs=[tensor, scale], outputs=[codes], domain=DOMAIN)
    return node, codes, scale


def emit_activation(graph: gs.Graph, tensor: gs.Tensor, readers: list[gs.Node], quant: ActivationPower, names: NameFactory) -> gs.Variable:
    """PowerQ → PowerDQ on ``tensor``; ``readers`` read the de-quantized value."""
    qnode, codes, scale = _quantize_node(tensor, quant, names)
    result = gs.Variable(names.new(f"{tensor.name}_power_dequantized"), dtype=np.float32, shape=tensor.shape)
    dq = gs.Node("PowerDequantizeLinear", names.new(f"{tensor.name}_PowerDequantizeLinear"), attrs={"exponent": float(quant.exponent), "bits": int(quant.bits)}, inputs=[codes, scale], outputs=[result], domain=DOMAIN)
    for reader in readers:
        for index, value in enumerate(reader.inputs):
            if value is tensor:
                reader.inputs[index] = result
    graph.nodes.extend([qnode, dq])
    return result


def integer_path_fits(weight_bits: int, quant: ActivationPower | None) -> bool:
    """a = 0.5 decoded integers q|q| fit 8 bits: weights int8 (+128 → uint8), activations uint8."""
    if quant is None or abs(quant.exponent - 0.5) > 1e-12:
        return False
    activation_room = 255 if not quant.signed else 127
    return levels(weight_bits) ** 2 <= 127 and quant.max_code**2 <= activation_room


def emit_integer_layer(graph: gs.Graph, layer: gs.Node, codes: np.ndarray, scales: np.ndarray, quant: ActivationPower, names: NameFactory) -> None:
    """Replace ``layer`` by PowerQ → q|q| → ConvInteger/MatMulInteger(uint8 q_w|q_w|+128, zp 128)
    → ×(s_x²·s_w²) (+ bias).  Weight ``codes`` are per output channel along the layer's axis."""
    label = node_label(layer)
    x = layer.inputs[0]
    qnode, qx, _ = _quantize_node(x, quant, names)
    nodes = [qnode]

    def var(name: str, dtype: Any) -> gs.Variable:
        return gs.Variable(names.new(f"{label}_{name}"), dtype=dtype)

    def const(name: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(names.new(f"{label}_{name}"), value)

    def add(op: str, inputs: list[gs.Tensor], out: gs.Variable, **attrs: Any) -> gs.Variable:
        nodes.append(gs.Node(op, names.new(f"{label}_{op}"), attrs=attrs, inputs=inputs, outputs=[out]))
        return out

    decoded = add("Mul", [qx, add("Abs", [qx], var("code_abs", np.int32))], var("decoded", np.int32))
    zero = 0 if not quant.signed else 128
    if zero:
        decoded = add("Add", [decoded, const("x_shift", np.array(zero, np.int32))], var("decoded_shifted", np.int32))
    x_u8 = add("Cast", [decoded], var("x_uint8", np.uint8), to=onnx.TensorProto.UINT8)
    wdec = codes.astype(np.int32) * np.abs(codes.astype(np.int32))
    out_scale = (np.float64(quant.scale) ** 2) * scales.astype(np.float64) ** 2
    zp_x, zp_w = const("x_zero_point", np.array(zero, np.uint8)), const("w_zero_point", np.array(128, np.uint8))
    if layer.op == "Conv":
        w_u8 = const("w_uint8", (wdec + 128).astype(np.uint8))
        conv_attrs = {k: v for k, v in layer.attrs.items() if k in ("strides", "pads", "dilations", "group", "kernel_shape", "auto_pad")}
        acc = add("ConvInteger", [x_u8, w_u8, zp_x, zp_w], var("acc", np.int32), **conv_attrs)
        scale_shape = out_scale.reshape(-1, *([1] * (codes.ndim - 2)))
        bias_shape = (-1, *([1] * (codes.ndim - 2)))
    else:
        k_by_n = wdec.T if transposed_weight(layer) else wdec
        w_u8 = const("w_uint8", (k_by_n + 128).astype(np.uint8))
        acc = add("MatMulInteger", [x_u8, w_u8, zp_x, zp_w], var("acc", np.int32))
        scale_shape, bias_shape = out_scale, (-1,)
    real = add("Cast", [acc], var("acc_float", np.float32), to=onnx.TensorProto.FLOAT)
    y = layer.outputs[0]
    bias = constant_values(layer, 2) if layer.op != "MatMul" else None
    scaled = add("Mul", [real, const("out_scale", checked_scales(scale_shape, f"{label} output"))], var("scaled", np.float32) if bias is not None else y)
    if bias is not None:
        add("Add", [scaled, const("bias", bias.astype(np.float32).reshape(bias_shape))], y)
    layer.outputs.clear()
    layer.inputs.clear()
    graph.nodes.extend(nodes)


# --------------------------------------------------------------------------- the pass
@dataclass(frozen=True)
class PowerQuantOptions(QuantizationOptions):
    """power-quant's options (the shared ones in QuantizationOptions)."""

    #: the exponent a of x ↦ sign(x)|x|^a; None searches it (Nelder–Mead)
    power_exponent: float | None = option(None, flag="--power-quant")
    #: one exponent per layer instead of one for the network
    power_per_layer: bool = option(False, flag="--power-per-layer")
    #: record the error curve of the exponent search in the report
    power_error_curve: bool = False
    #: integer accumulation where exact: True, False or where the exponent allows it
    power_integer: bool | Literal["auto"] = "auto"
    #: power-quantize the activations too (False: uniform activations)
    power_activations: bool = True

    def check(self) -> None:
        super().check()
        if self.power_exponent is not None and not 0 < self.power_exponent <= 1:
            raise OptionProblem("power_exponent", f"must be None (search) or a number in (0, 1], got {self.power_exponent!r}")


class PowerQuant(Pass):
    name = "power-quant"
    summary = "PowerQuant: non-uniform power quantization (exponent by Nelder–Mead) of weights and activations, custom ops with ONNX function bodies"
    stage = Stage.QUANTIZE
    replaces = "quantize"  # --power-quant swaps it in for quantize
    lossless = False
    tags = frozenset({"quantize", "power-quant"})
    request = "power-quant"
    min_opset = MIN_OPSET  # CastLike in the function bodies
    runs_after = frozenset({"bn-fold", "fold-batchnorm"})
    Options = PowerQuantOptions

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if graph.opset < MIN_OPSET:
            raise PreconditionFailed(f"opset {graph.opset} < {MIN_OPSET}: the custom-op function bodies need CastLike")

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cleanup(graph)
        names = NameFactory(graph)
        refusals_before = len(ctx.refusals)
        candidates = [n for n in graph.nodes if n.op in WITHOUT_TRANSPOSE_OPS and is_default_domain(n)]
        refusals = {id(n): layer_refusal(n) for n in candidates}
        layers = [n for n in candidates if self._layer_ok(n, refusals[id(n)], ctx)]
        reasons = Counter(float_label(r) for r in refusals.values() if r)
        coverage = {"verb": "power-quantized", "unit": "layers", "done": len(layers), "total": len(candidates), "left": "float", "reasons": dict(reasons)}
        if not layers:
            return PassResult(False, {"layers_quantized": 0, "coverage": coverage})
        edges = (layers[0], layers[-1])
        bits_of = {id(layer): self._weight_bits(layer, edges) for layer in layers}
        weights = {id(layer): (constant_values(layer, 1).astype(np.float64), bits_of[id(layer)], weight_axis(layer)) for layer in layers}
        exponents, stats = self._exponents(layers, weights)
        if all(a == 1.0 for a in exponents.values()):
            del ctx.refusals[refusals_before:]  # the quantize pass reports its own refusals
            return self._uniform(graph, ctx, stats)
        ranges = self._ranges(graph, ctx, layers)

        readers_of: dict[str, list[gs.Node]] = defaultdict(list)
        for layer in layers:
            readers_of[layer.inputs[0].name].append(layer)
        quants: dict[int, ActivationPower] = {}
        for tensor_name, readers in readers_of.items():
            r = ranges.get(tensor_name)
            if r is None:
                for reader in readers:
                    ctx.refuse(f"activation of {node_label(reader)}", f"no statistics for {tensor_name}: input kept in float")
                continue
            for reader in readers:
                a = exponents[id(reader)] if self.options["power_activations"] else 1.0
                quants[id(reader)] = activation_power(r, self.options["act_bits"], a)

        means = {name: r.mean for name, r in ranges.items()}
        integer_layers, float_readers = self._emit_layers(graph, layers, weights, exponents, quants, means, names)
        activations = 0
        for tensor_name, readers in readers_of.items():
            float_side = [r for r in readers if id(r) in float_readers and id(r) in quants]
            by_exponent: dict[float, list[gs.Node]] = defaultdict(list)
            for reader in float_side:
                by_exponent[quants[id(reader)].exponent].append(reader)
            for group in by_exponent.values():
                emit_activation(graph, group[0].inputs[0], group, quants[id(group[0])], names)
                activations += 1
        add_functions_to_graph(graph)
        cleanup(graph)
        stats.update(
            {
                "layers_quantized": len(layers),
                "coverage": coverage,
                "activations_quantized": activations,
                "integer_layers": integer_layers,
                "weight_bytes_int8": int(sum(w[0].size for w in weights.values())),
            }
        )
        return PassResult(True, stats)

    def nothing_done(self, result: PassResult, refusals: list[Refusal]) -> str:
        coverage = result.stats.get("coverage")
        return no_layer_message(self.name, coverage) if coverage else super().nothing_done(result, refusals)

    # ------------------------------------------------------------------ pieces
    def _uniform(self, graph: gs.Graph, ctx: PassContext, stats: dict[str, Any]) -> PassResult:
        """Exponent 1 everywhere: power quantization is uniform quantization, so the layers
        get what the ``quantize`` pass emits (standard QDQ that ORT fuses) instead of the
        custom ops, which would compute the same values several times slower."""
        result = ctx.delegate("quantize", graph, **{key: self.options[key] for key in UNIFORM_OPTIONS})
        ctx.logger.info("power-quant: exponent 1 is uniform quantization: emitted standard QDQ (the quantize pass)")
        result.stats = {**stats, "emitted": "QDQ", "note": UNIFORM_NOTE, **result.stats}
        return result

    def _layer_ok(self, node: gs.Node, reason: str | None, ctx: PassContext) -> bool:
        if reason:
            ctx.refuse(f"layer {node_label(node)}", reason)
        return reason is None

    def _weight_bits(self, layer: gs.Node, edges: tuple[gs.Node, ...]) -> int:
        first_last = self.options["first_last_bits"]
        if first_last is not None and any(layer is edge for edge in edges):
            return max(self.options["weight_bits"], int(first_last))
        return self.options["weight_bits"]

    def _exponents(self, layers: list[gs.Node], weights: dict[int, tuple]) -> tuple[dict[int, float], dict[str, Any]]:
        """The exponent of every layer (global or per layer) and the report entries."""
        fixed = self.options["power_exponent"]
        all_weights = list(weights.values())
        stats: dict[str, Any] = {}
        if fixed is not None:
            a = float(fixed)
            exponents = {id(layer): a for layer in layers}
            stats["exponent"] = a
        elif self.options["power_per_layer"]:
            exponents = {}
            from scipy.optimize import minimize_scalar  # imported when used: scipy.optimize is slow to import

            for layer in layers:
                w = weights[id(layer)]
                prepared = NormalizedWeight(*w)
                result = minimize_scalar(prepared.error, bounds=EXPONENT_BOUNDS, method="bounded", options={"xatol": 1e-3})
                exponents[id(layer)] = round(float(result.x), 4)
            stats["exponents_per_layer"] = {node_label(layer): exponents[id(layer)] for layer in layers}
        else:
            a = round(search_exponent(all_weights), 4)
            exponents = {id(layer): a for layer in layers}
            stats["exponent"] = a
        stats["weight_error"] = round(sum(reconstruction_error(*weights[id(l)][:1], weights[id(l)][1], exponents[id(l)], weights[id(l)][2]) for l in layers), 6)
        stats["weight_error_uniform"] = round(total_error(all_weights, 1.0), 6)
        if self.options["power_error_curve"]:
            prepared = [NormalizedWeight(*w) for w in all_weights]
            stats["error_curve"] = [[float(a), round(fast_total_error(prepared, float(a)), 6)] for a in CURVE]
        return exponents, stats

    def _ranges(self, graph: gs.Graph, ctx: PassContext, layers: list[gs.Node]) -> dict[str, ChannelRange]:
        given: dict[str, ChannelRange] = {}
        if self.options["input_range"] is not None:
            low, high = (float(v) for v in self.options["input_range"])
            for tensor in graph.inputs:
                if tensor.shape is not None and len(tensor.shape) >= 2 and isinstance(tensor.shape[1], int):
                    c = tensor.shape[1]
                    given[tensor.name] = ChannelRange(np.full(c, low), np.full(c, high), np.full(c, (low + high) / 2))
        wanted = [layer.inputs[0] for layer in layers]
        if self.options["act_ranges"] == "bn":
            stats = bn_statistics(graph, ctx.metadata)
            lam = self.options["lam"] if self.options["lam"] is not None else default_lambda(self.options["act_bits"])
            estimator = RangeEstimator(stats, lam, self.options["add_range"], given)
            found = {t.name: estimator.range(t) for t in wanted}
            return {k: v for k, v in found.items() if v is not None}
        model = ctx.export(graph)
        samples = calibration_samples(self.name, self.options, model).feeds
        if self.options["act_ranges"] == "moments":
            sites = statistics_sites(graph)
            names = [t.name for t in [*wanted, *sites] if t.shape is None or len(t.shape) >= 2]
            measured = calibrated_ranges(model, names, samples, "moments")
            lam = self.options["lam"] if self.options["lam"] is not None else default_lambda(self.options["act_bits"])
            return moment_ranges(wanted, sites, measured, lam, self.options["add_range"], given)
        result = dict(given)
        result.update(calibrated_ranges(model, [t.name for t in wanted if t.shape is not None and len(t.shape) >= 2], samples, self.options["act_ranges"]))
        return result

    def _emit_layers(
        self,
        graph: gs.Graph,
        layers: list[gs.Node],
        weights: dict[int, tuple],
        exponents: dict[int, float],
        quants: dict[int, ActivationPower],
        means: dict[str, np.ndarray],
        names: NameFactory,
    ) -> tuple[int, set[int]]:
        """Weights of every layer; integer-path layers rewritten whole.  Returns the number of
        integer layers and the ids of the float-path layers (their inputs get PowerQ/DQ)."""
        integer = 0
        float_layers: set[int] = set()
        for layer in layers:
            weight, bits, axis = weights[id(layer)]
            a = exponents[id(layer)]
            codes, scales = power_quantize(weight, bits, a, axis)
            self._correct_bias(graph, layer, weight - power_dequantize(codes, scales, a, axis), means.get(layer.inputs[0].name), names)
            quant = quants.get(id(layer))
            use_integer = self.options["power_integer"] is not False and integer_path_fits(bits, quant) and axis is not None
            if use_integer and layer.op == "Conv" and weight.ndim == 4:
                emit_integer_layer(graph, layer, codes, scales, quant, names)
                integer += 1
                continue
            if use_integer and layer.op in ("MatMul", "Gemm") and layer.inputs[0].shape is not None and len(layer.inputs[0].shape) == 2:
                emit_integer_layer(graph, layer, codes, scales, quant, names)
                integer += 1
                continue
            layer.inputs[1] = emit_weight(graph, codes, scales.astype(np.float32), axis, a, bits, f"{node_label(layer)}_weight", names)
            float_layers.add(id(layer))
        return integer, float_layers

    def _correct_bias(self, graph: gs.Graph, layer: gs.Node, delta: np.ndarray, mean: np.ndarray | None, names: NameFactory) -> None:
        """eq. 3.8: ``b += (W − Q⁻¹(Q(W)))·E[X]`` with E[X] from the statistics (Conv/Gemm)."""
        if not self.options["bias_correction"] or mean is None or layer.op not in ("Conv", "Gemm"):
            return
        correction = mean_shift(layer, delta, mean)
        if correction is None:
            return
        bias = constant_values(layer, 2)
        base = np.zeros(len(correction)) if bias is None else bias.astype(np.float64)
        set_constant_input(graph, layer, 2, (base + correction).astype(np.float32), names, base_name=f"{node_label(layer)}_bias")


register_operator("power", PowerWeightOperator)

__all__ = ["PowerQuant", "PowerWeightOperator", "power_quantize", "power_dequantize", "search_exponent", "total_error", "reconstruction_error"]
