"""quantize: data-free static quantization to standard ONNX QDQ, with per-channel SPIQ scales.

Before::   x ── Conv(W, b) ── Relu ── Conv(W2, b2) ── y
After::    x ── Conv(W, b)' ── Relu ── Q ── DQ ── Conv(DQ(W2_int8), DQ(b2_int32)) ── Q ── DQ ── y

Steps (METHODS.md §3):

1. **Ranges** of every tensor a quantizable layer (Conv, ConvTranspose, Gemm, MatMul with
   constant weights on [M, K] or [B, T, K] inputs — transformer linear layers) reads:
   data-free from BN statistics and from LayerNormalization statistics (output mean β_c,
   std |γ_c| per feature, METHODS.md §3) (``act_ranges="bn"``, λ = 9 at 8 bits, 4 at ≤ 6
   bits) propagated through Relu/Clip/pooling/Concat/Add, or measured on calibration data
   (``"minmax"`` / ``"percentile"``; ``calibration_data`` is an .npz, a folder of .npy files
   or a folder of images with ``calibration_mean/std/layout``, see :mod:`.calibration`).  The graph input has no statistics: the first layer
   stays float unless ``input_range`` or calibration data is given.  Transformer tensors
   without statistics (attention output, GELU output) leave their reader float; a MatMul
   whose output is not quantized is still fused by ORT (MatMulIntegerToFloat).
2. **SPIQ** (``spiq="auto"``, the default; ``True`` forces it where possible, ``False``
   never): per-channel steps s_c become per-tensor by folding ``r_c = s_c / max s`` into
   the producer (÷; a Conv/Gemm/MatMul or a LayerNorm's γ, β) and the readers (×), see
   :mod:`.spiq`.  ``auto`` applies it where the estimated output error (weight noise +
   activation noise with E[x²] of the rectified Gaussian, :func:`.spiq.estimated_errors`)
   is at least 5 % lower than per tensor (SPIQ_MIN_GAIN).  The estimate is blind to the
   clipping of heavy tails by a channel's own BN range (per tensor clips at the widest
   channel's range), so SPIQ lost where it estimated a near tie (EfficientNet-Lite0 W8
   with ties going to SPIQ); hence the 5 % margin (bench/results/quantize.md).  When the
   ``rex`` pass follows in the same pipeline, ``auto`` means SPIQ wherever possible: the
   estimate is made for ``weight_bits``, but REx's branches give the layers near-8-bit
   weights, where SPIQ wins (MobileNetV2 W4A8 + REx 100 %: KL 0.023 with SPIQ vs 0.049
   with the W4 choices; bench/results/rex.md).  Where
   no producer can absorb them the tensor is quantized per tensor and the report says why;
   ``spiq_coverage`` is the share of quantized inputs with per-channel scales.
3. **Weights** symmetric per output channel (``per_channel=True``) at ``weight_bits`` (2–8,
   stored as int8, or INT4 for ≤ 4 bits with ``int4_weights=True`` (opset ≥ 21, else an
   error naming the opset; a smaller file, but ORT's CPU provider does not fuse INT4
   DequantizeLinear, so those layers run in float); the first and last layer keep at least
   ``first_last_bits`` = 8, the common practice for low bit-widths — None quantizes them
   like the others), **bias correction** (eq. 3.8, ``bias_correction=True``, Conv/Gemm, and a
   MatMul whose bias is the constant operand of the Add reading it — a PyTorch Linear):
   ``b += (W − Q⁻¹(Q(W)))·E[X]`` with E[X] from the statistics, then the bias as int32.
4. **Emission** (:mod:`.emit`): per-tensor activation Q→DQ (uint8 zero point 0 after ReLU,
   int8 elsewhere), shared by all readers; also on the output of every quantized layer
   (after its Relu/ReLU6) so ORT fuses each layer into QLinearConv/QGemm.

Opset: the pass declares ``min_opset = 13`` (per-axis DequantizeLinear); the PassManager
upgrades an older model before the pipeline runs (a note in the report).

Refused (reported per layer): non-constant or non-float32 weights (float16/float64 models:
convert to float32 first), Gemm with transA or alpha/beta ≠ 1, inputs without statistics;
layers inside If/Loop/Scan bodies are not entered (counted as float, one refusal line).
The stats carry a ``coverage`` entry (layers quantized of all Conv/ConvTranspose/Gemm/MatMul,
subgraphs included, the float ones counted by reason) that the report prints as one line.  When no layer is
quantized the run stops with a NothingToDoError naming the cause and the fix (e.g. no
statistics at all and no calibration data: pass calibration samples or export with BN kept).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PipelineError
from onnxopt.graph import (
    NameFactory,
    cleanup,
    constant_values,
    export_model,
    is_default_domain,
    node_label,
    optional_input,
    set_constant_input,
)
from onnxopt.pass_base import Pass, PassContext, PassResult, PreconditionFailed, Refusal

from . import spiq as spiq_rewrite
from .calibration import CALIBRATION_OPTIONS, calibration_samples
from .calibration import check_options as check_calibration_options
from .emit import quantize_activation, quantize_layer_bias, quantize_layer_weight
from .numerics import ActivationQuant, activation_quant
from .ranges import ChannelRange, RangeEstimator, bn_statistics, calibrated_ranges, channel_bound, default_lambda

LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
FOLLOWING_ACTIVATIONS = frozenset({"Relu", "Clip"})
RANGE_MODES = ("bn", "minmax", "percentile")
#: spiq="auto" folds the scales only where the estimated error is at most this share of the
#: per-tensor one: the estimate does not see the clipping of heavy tails by a channel's own
#: BN range, so a near tie (< 5 % estimated gain) stays per tensor (see _spiq_pays).
SPIQ_MIN_GAIN = 0.95
INT4_NOTE = "INT4 weights shrink the file; ONNX Runtime's CPU provider does not fuse INT4 DequantizeLinear (those layers run in float)"
#: Ops that only move values: ORT drops DQ→op→Q around them when both sides share a quantizer.
MOVEMENT_OPS = frozenset({"Pad", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Identity"})
#: Why a layer stayed float, as counted in the coverage line: reason prefix -> short label.
FLOAT_LABELS = (
    ("no statistics", "no statistics"),
    ("weight is not a float initializer", "non-constant weight"),
    ("float16", "float16 layers"),
    ("float64", "float64 layers"),
    ("bias is not an initializer", "non-constant bias"),
    ("Gemm with", "Gemm with transA or alpha/beta"),
    ("MatMul other than", "MatMul not x × W"),
)
NO_STATISTICS = "no BatchNormalization/LayerNormalization statistics and no calibration data"
#: The coverage label of Conv/Gemm/MatMul layers inside control-flow bodies (not entered).
SUBGRAPH_LABEL = "inside If/Loop/Scan bodies"
#: The fix named by the NothingToDoError for the most frequent reason no layer was quantized.
FIXES = {
    "no statistics": "pass --calibration-data samples.npz (10 real inputs are enough) or export with BN kept (onnxopt.export_torch)",
    "float16 layers": "quantize supports float32 models; convert with onnxconverter-common's float16 → float32 first",
    "float64 layers": "quantize supports float32 models; convert the model's double tensors to float32 first",
    SUBGRAPH_LABEL: "quantize works on the main graph only: export the model without data-dependent control flow "
                    "(e.g. torch.onnx.export of the traced module) so its layers are in the main graph",
}


class Quantize(Pass):
    name = "quantize"
    summary = "data-free static quantization to QDQ with per-channel SPIQ scales folded into weights (wNaM)"
    lossless = False
    tags = frozenset({"quantize"})
    request = "quantize"
    min_opset = 13  # per-axis DequantizeLinear
    runs_after = frozenset({"bn-fold"})
    options_spec = {
        "weight_bits": 8,
        "act_bits": 8,
        "per_channel": True,
        "spiq": "auto",
        "act_ranges": "bn",
        **CALIBRATION_OPTIONS,
        "lam": None,
        "bias_correction": True,
        "input_range": None,
        "add_range": "sum",
        "first_last_bits": 8,
        "int4_weights": False,
    }

    # ------------------------------------------------------------------ checks
    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        o = self.options
        check_bit_widths(self.name, o)
        if o["spiq"] not in (True, False, "auto"):
            raise PipelineError(f"quantize: spiq must be true, false or 'auto', got {o['spiq']!r}")
        if o["act_ranges"] not in RANGE_MODES:
            raise PipelineError(f"quantize: act_ranges must be one of {', '.join(RANGE_MODES)}, got {o['act_ranges']!r}")
        if o["act_ranges"] != "bn" and not o["calibration_data"]:
            raise PipelineError(f"quantize: act_ranges={o['act_ranges']!r} needs calibration data (--calibration-data x.npz)")
        if o["act_ranges"] == "bn" and o["calibration_data"]:
            raise PipelineError("quantize: calibration_data is only used with act_ranges='minmax' or 'percentile'")
        check_calibration_options(self.name, o)
        if o["add_range"] not in ("sum", "independent"):
            raise PipelineError(f"quantize: add_range must be 'sum' or 'independent', got {o['add_range']!r}")
        check_range_options(self.name, o)
        if not isinstance(o["int4_weights"], bool):
            raise PipelineError(f"quantize: int4_weights must be true or false, got {o['int4_weights']!r}")
        if o["int4_weights"] and graph.opset < 21:
            raise PipelineError(
                f"quantize: int4_weights needs opset >= 21 (DequantizeLinear with INT4 input), the model has opset {graph.opset}: "
                "convert it first, e.g. onnx.version_converter.convert_version(model, 21)"
            )
        if graph.opset < 13:
            raise PreconditionFailed(f"opset {graph.opset} < 13: per-axis DequantizeLinear needs opset 13")

    # ------------------------------------------------------------------ main
    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cleanup(graph)
        names = NameFactory(graph)
        candidates = [n for n in graph.nodes if n.op in LAYER_OPS and is_default_domain(n)]
        self._float_reasons: Counter[str] = Counter()
        self._no_statistics = False
        inner = subgraph_layer_count(graph)
        if inner:  # counted, so the coverage line and a no-op's message say where they are
            ctx.refuse(f"{inner} layer(s) inside If/Loop/Scan bodies", "quantize works on the main graph only: kept in float")
            self._float_reasons[SUBGRAPH_LABEL] += inner
        total = len(candidates) + inner
        layers = [n for n in candidates if self._layer_ok(n, ctx)]
        if not layers:
            return PassResult(False, {"layers_quantized": 0, "coverage": self._coverage(total, 0)})
        self._calibration_stats: dict[str, Any] = {}
        ranges = self._ranges(graph, ctx, layers)
        self._edges = (layers[0], layers[-1])
        readers_of: dict[str, list[gs.Node]] = defaultdict(list)
        for layer in layers:
            readers_of[layer.inputs[0].name].append(layer)

        quants: dict[str, ActivationQuant] = {}
        means: dict[str, np.ndarray | None] = {}
        moments: dict[str, np.ndarray] = {}
        records: list[dict[str, Any]] = []
        for tensor_name, readers in readers_of.items():
            tensor = readers[0].inputs[0]
            channel_range = ranges.get(tensor_name)
            if channel_range is None:
                for reader in readers:
                    self._keep_float(ctx, reader, f"no statistics for its input {tensor_name}: kept in float")
                continue
            quant, mean, mode, moment = self._input_quantizer(graph, ctx, tensor, readers, channel_range, names)
            quants[tensor_name], means[tensor_name], moments[tensor_name] = quant, mean, moment
            records.extend({"layer": node_label(r), "input": tensor_name, "mode": mode, "scale": float(quant.scale)} for r in readers)

        quantized_layers = [layer for layer in layers if layer.inputs[0].name in quants]
        # read by rex (passes/rex.py): float weight after SPIQ folding, bits, per-channel, E[X] used by bias correction,
        # E[X²] per input channel (data-free estimate, after SPIQ) for rex's error weighting
        ctx.shared["quantized_weights"] = {
            layer.outputs[0].name: (constant_values(layer, 1).copy(), self._weight_bits(layer, self._edges), self.options["per_channel"],
                                    means.get(layer.inputs[0].name) if self.options["bias_correction"] else None,
                                    moments.get(layer.inputs[0].name))
            for layer in quantized_layers
        }
        int4_layers = self._quantize_weights(graph, quantized_layers, quants, means, self._edges, names)
        dq_of = {name: quantize_activation(graph, readers_of[name][0].inputs[0], quant, names) for name, quant in quants.items()}
        outputs_quantized = self._quantize_outputs(graph, ctx, quantized_layers, ranges, quants, dq_of, names)
        cleanup(graph)

        spiq_count = sum(1 for r in records if r["mode"] == "spiq")
        return PassResult(
            bool(quantized_layers),
            {
                "layers_quantized": len(quantized_layers),
                "layers_float": len(layers) - len(quantized_layers),
                "spiq_coverage": round(spiq_count / len(records), 4) if records else 0.0,
                "outputs_quantized": outputs_quantized,
                "coverage": self._coverage(total, len(quantized_layers)),
                **self._calibration_stats,
                **({"int4_layers": int4_layers, "int4_note": INT4_NOTE} if self.options["int4_weights"] else {}),
                "layers": records,
            },
        )

    # ------------------------------------------------------------------ pieces
    def _layer_ok(self, node: gs.Node, ctx: PassContext) -> bool:
        reason = layer_refusal(node)
        if reason:
            self._keep_float(ctx, node, reason)
        return reason is None

    def _keep_float(self, ctx: PassContext, node: gs.Node, reason: str) -> None:
        """Refuse ``node`` (reported) and count it under its short label for the coverage line."""
        ctx.refuse(f"layer {node_label(node)}", reason)
        self._float_reasons[float_label(reason)] += 1

    def _coverage(self, total: int, quantized: int) -> dict[str, Any]:
        return {"verb": "quantized", "unit": "layers", "done": quantized, "total": total, "left": "float", "reasons": dict(self._float_reasons)}

    def nothing_done(self, result: PassResult, refusals: list[Refusal]) -> str:
        """``quantize: 0 of N layers quantized: <cause>; <fix>``."""
        coverage = result.stats.get("coverage")
        if coverage is None:  # refused before looking at the layers
            return super().nothing_done(result, refusals)
        return no_layer_message(self.name, coverage, NO_STATISTICS if self._no_statistics else None)

    def _ranges(self, graph: gs.Graph, ctx: PassContext, layers: list[gs.Node]) -> dict[str, ChannelRange]:
        """Per-channel ranges of the layers' inputs and of their output chain ends."""
        wanted = [layer.inputs[0] for layer in layers] + [_chain_end(layer.outputs[0]) for layer in layers]
        result: dict[str, ChannelRange] = {}
        given = self._input_ranges(graph)
        mode = self.options["act_ranges"]
        if mode == "bn":
            stats = bn_statistics(graph, ctx.shared.get("metadata", {}))
            if not stats and self.options["input_range"] is None:
                self._no_statistics = True  # every layer is refused below; nothing_done says how to get ranges
                return {}
            lam = self.options["lam"] if self.options["lam"] is not None else default_lambda(self.options["act_bits"])
            estimator = RangeEstimator(stats, lam, self.options["add_range"], given)
            for tensor in wanted:
                channel_range = estimator.range(tensor)
                if channel_range is not None:
                    result[tensor.name] = channel_range
        else:
            result.update(given)
            result.update(self._calibrate(graph, ctx, wanted))
        return result

    def _input_ranges(self, graph: gs.Graph) -> dict[str, ChannelRange]:
        """The user's ``input_range`` for every graph input with a static channel count."""
        if self.options["input_range"] is None:
            return {}
        low, high = (float(v) for v in self.options["input_range"])
        ranges = {}
        for tensor in graph.inputs:
            if tensor.shape is not None and len(tensor.shape) >= 2 and isinstance(tensor.shape[1], int):
                c = tensor.shape[1]
                ranges[tensor.name] = ChannelRange(np.full(c, low), np.full(c, high), np.full(c, (low + high) / 2))
        return ranges

    def _calibrate(self, graph: gs.Graph, ctx: PassContext, tensors: list[gs.Tensor]) -> dict[str, ChannelRange]:
        template = ctx.shared.get("model")
        model = export_model(graph, template) if template is not None else gs.export_onnx(graph)
        data = calibration_samples(self.name, self.options, model)
        self._calibration_stats = data.stats()
        names = [t.name for t in tensors if t.shape is not None and len(t.shape) >= 2]
        return calibrated_ranges(model, names, data.feeds, self.options["act_ranges"])

    def _input_quantizer(
        self, graph: gs.Graph, ctx: PassContext, tensor: gs.Tensor, readers: list[gs.Node], r: ChannelRange, names: NameFactory
    ) -> tuple[ActivationQuant, np.ndarray | None, str, np.ndarray]:
        """The per-tensor quantizer of ``tensor`` (after SPIQ when possible), its per-channel
        mean and second moment as the readers will see them, and the mode ("spiq" or "per-tensor")."""
        bits = self.options["act_bits"]
        unsigned = bool(np.all(r.lo >= 0))
        low = 0.0 if unsigned else float(r.lo.min())
        per_tensor = activation_quant(low, float(r.hi.max()), bits)
        if self.options["spiq"]:
            plan = spiq_rewrite.plan(graph, tensor, readers)
            if isinstance(plan, str):
                ctx.refuse(f"SPIQ on {tensor.name}", f"per-tensor fallback: {plan}")
            else:
                high = np.minimum(r.hi, plan.clip_high)
                levels = 2**bits - 1 if unsigned else 2 ** (bits - 1) - 1
                step = np.maximum(high if unsigned else np.maximum(np.abs(r.lo), np.abs(r.hi)), 1e-12) / levels
                if self._spiq_pays(ctx, tensor, readers, r, step, float(per_tensor.scale)):
                    ratio, top = spiq_rewrite.ratios(step)
                    spiq_rewrite.apply(graph, plan, ratio, readers, names)
                    return ActivationQuant(np.float32(top), not unsigned, bits), r.mean / ratio, "spiq", self._moment(r) / ratio**2
        return per_tensor, r.mean, "per-tensor", self._moment(r)

    def _moment(self, r: ChannelRange) -> np.ndarray:
        """E[x²] per channel: known for (rectified) BN outputs, else from the mean and the range's spread."""
        if r.second_moment is not None:
            return r.second_moment
        lam = self.options["lam"] if self.options["lam"] is not None else default_lambda(self.options["act_bits"])
        spread = r.gaussian[1] if r.gaussian is not None else (r.hi - r.lo) / (2 * lam)
        return r.mean**2 + spread**2

    def _spiq_pays(
        self, ctx: PassContext, tensor: gs.Tensor, readers: list[gs.Node], r: ChannelRange, step: np.ndarray, tensor_step: float
    ) -> bool:
        """With ``spiq="auto"``, SPIQ only where the estimated output error is at least
        1 − SPIQ_MIN_GAIN lower than per tensor (folding the scales moves the channel spread
        into the readers' weights, and clips each channel's tail at its own range)."""
        if self.options["spiq"] != "auto":
            return True
        if "rex" in ctx.shared.get("pipeline", ()):  # REx will expand the weights: estimates made for weight_bits do not hold
            return True
        moment = self._moment(r)
        bits = max(self._weight_bits(reader, self._edges) for reader in readers)
        errors = spiq_rewrite.estimated_errors(readers, moment, step, tensor_step, bits, self.options["per_channel"])
        if errors is None or errors[0] <= SPIQ_MIN_GAIN * errors[1]:
            return True
        ctx.refuse(
            f"SPIQ on {tensor.name}",
            f"per-tensor chosen: estimated error {errors[1]:.3g} vs {errors[0]:.3g} with SPIQ (SPIQ needs a {1 - SPIQ_MIN_GAIN:.0%} lower one)",
        )
        return False

    def _weight_bits(self, layer: gs.Node, edges: tuple[gs.Node, ...]) -> int:
        """``weight_bits``, raised to ``first_last_bits`` for the first and last layer."""
        first_last = self.options["first_last_bits"]
        if first_last is not None and any(layer is edge for edge in edges):
            return max(self.options["weight_bits"], int(first_last))
        return self.options["weight_bits"]

    def _quantize_weights(
        self,
        graph: gs.Graph,
        layers: list[gs.Node],
        quants: dict[str, ActivationQuant],
        means: dict[str, np.ndarray | None],
        edges: tuple[gs.Node, ...],
        names: NameFactory,
    ) -> int:
        """Quantize every layer's weight (and bias, after bias correction); the number stored as INT4."""
        int4_layers = 0
        for layer in layers:
            weight = constant_values(layer, 1).astype(np.float64)
            bits = self._weight_bits(layer, edges)
            int4_layers += int(bool(self.options["int4_weights"]) and bits <= 4)
            dequantized, scales, _ = quantize_layer_weight(graph, layer, bits, self.options["per_channel"], names, int4=bool(self.options["int4_weights"]))
            mean = means.get(layer.inputs[0].name)
            if self.options["bias_correction"] and mean is not None and layer.op in ("Conv", "Gemm"):
                correction = mean_shift(layer, weight - dequantized, mean)
                if correction is not None:
                    bias = constant_values(layer, 2)
                    base = np.zeros(len(correction)) if bias is None else bias.astype(np.float64)
                    set_constant_input(graph, layer, 2, (base + correction).astype(np.float32), names, base_name=f"{node_label(layer)}_bias")
            elif self.options["bias_correction"] and mean is not None and layer.op == "MatMul":
                correct_matmul_bias(graph, layer, mean_shift(layer, weight - dequantized, mean), names)
            quantize_layer_bias(graph, layer, quants[layer.inputs[0].name].scale, scales, names)
        return int4_layers

    def _quantize_outputs(
        self,
        graph: gs.Graph,
        ctx: PassContext,
        layers: list[gs.Node],
        ranges: dict[str, ChannelRange],
        quants: dict[str, ActivationQuant],
        dq_of: dict[str, gs.Variable],
        names: NameFactory,
    ) -> int:
        """Q→DQ after each quantized layer (after its Relu/Clip) so ORT can fuse it.  Before a
        data-movement op (Pad, MaxPool, Reshape, …) whose output is quantized the same
        quantizer is used, so ORT can drop the DQ→op→Q pair around it."""
        count = 0
        for layer in layers:
            end = _chain_end(layer.outputs[0])
            if not end.outputs or end.name in dq_of or any(n.op == "QuantizeLinear" for n in end.outputs):
                continue  # nobody reads it (a graph output only), or already quantized
            quant = _downstream_quant(end, quants)
            if quant is None:
                channel_range = ranges.get(end.name)
                if channel_range is None:
                    consequence = "ORT fuses it as MatMulIntegerToFloat" if layer.op == "MatMul" else "ORT will not fuse this layer"
                    ctx.refuse(f"output of {node_label(layer)}", f"no statistics for {end.name}: left float, {consequence}")
                    continue
                unsigned = bool(np.all(channel_range.lo >= 0))
                low = 0.0 if unsigned else float(channel_range.lo.min())
                quant = activation_quant(low, float(channel_range.hi.max()), self.options["act_bits"])
            dq_of[end.name] = quantize_activation(graph, end, quant, names)
            count += 1
        return count


def _downstream_quant(tensor: gs.Tensor, quants: dict[str, ActivationQuant]) -> ActivationQuant | None:
    """The quantizer of the output of the single data-movement op reading ``tensor``, if any."""
    if len(tensor.outputs) != 1:
        return None
    node = tensor.outputs[0]
    if node.op not in MOVEMENT_OPS or not node.outputs or node.inputs[0] is not tensor:
        return None
    return quants.get(node.outputs[0].name)


def layer_refusal(node: gs.Node) -> str | None:
    """Why the weight of layer ``node`` cannot be quantized (None when it can); shared with
    the other quantizers (power-quant)."""
    weight = constant_values(node, 1)
    if weight is None or not np.issubdtype(weight.dtype, np.floating):
        return "weight is not a float initializer"
    if weight.dtype != np.float32:  # QuantizeLinear takes float16 only from opset 19, double never
        return f"{weight.dtype} weights and activations: quantize supports float32 models only"
    if optional_input(node, 2) is not None and constant_values(node, 2) is None:
        return "bias is not an initializer"
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0):
        return "Gemm with transA or alpha/beta ≠ 1"
    if node.op == "MatMul" and (weight.ndim != 2 or not _matrix_rows(node.inputs[0], weight.shape[0])):
        return "MatMul other than x[…, K] × constant matrix W[K, N]"
    return None


def no_layer_message(pass_name: str, coverage: dict[str, Any], cause: str | None = None) -> str:
    """``<pass>: 0 of N layers quantized: <cause>; <fix>`` (the fix of the most frequent reason);
    ``cause`` defaults to the counted reasons."""
    if not coverage["total"]:
        return f"{pass_name}: the model has no Conv, ConvTranspose, Gemm or MatMul layer to quantize"
    reasons = Counter(coverage["reasons"])
    main = "no statistics" if cause == NO_STATISTICS else reasons.most_common(1)[0][0] if reasons else "other"
    cause = cause or ", ".join(f"{n} {label}" for label, n in reasons.most_common())
    fix = FIXES.get(main, "only Conv/ConvTranspose/Gemm/MatMul layers with constant float32 weights are quantized")
    return f"{pass_name}: 0 of {coverage['total']} layers quantized: {cause}; {fix}"


def subgraph_layer_count(graph: gs.Graph) -> int:
    """Conv/ConvTranspose/Gemm/MatMul nodes inside the If/Loop/Scan bodies of ``graph`` (nested ones included)."""
    count = 0
    for node in graph.nodes:
        for body in node.subgraphs():
            count += sum(1 for n in body.nodes if n.op in LAYER_OPS and is_default_domain(n)) + subgraph_layer_count(body)
    return count


def float_label(reason: str) -> str:
    """The short label of a refusal ``reason`` in the coverage line."""
    return next((label for prefix, label in FLOAT_LABELS if reason.startswith(prefix)), "other")


def _matrix_rows(tensor: gs.Tensor, depth: int) -> bool:
    """``tensor`` is a 2-D [M, K] or 3-D [B, T, K] input (transformer linear layer) with K = ``depth``."""
    shape = tensor.shape
    if shape is None or len(shape) not in (2, 3):
        return False
    return not isinstance(shape[-1], int) or shape[-1] == depth


def _chain_end(tensor: gs.Tensor) -> gs.Tensor:
    """Follow single-reader Relu/Clip nodes (and Min/Max with a per-channel constant bound,
    the equalize pass's ReLU6) after a layer output (the tensor ORT quantizes)."""
    current = tensor
    while len(current.outputs) == 1 and current.outputs[0].outputs and _following(current.outputs[0]):
        current = current.outputs[0].outputs[0]
    return current


def _following(node: gs.Node) -> bool:
    return node.op in FOLLOWING_ACTIVATIONS or channel_bound(node) is not None


def check_bit_widths(pass_name: str, options: dict[str, Any]) -> None:
    """The bit-width options quantize and power-quant share: weight_bits and act_bits in
    2..8, first_last_bits None or in 2..8."""
    for key in ("weight_bits", "act_bits"):
        if not isinstance(options[key], int) or not 2 <= options[key] <= 8:
            raise PipelineError(f"{pass_name}: {key} must be an integer in 2..8, got {options[key]!r}")
    if options["first_last_bits"] is not None and options["first_last_bits"] not in range(2, 9):
        raise PipelineError(f"{pass_name}: first_last_bits must be None or an integer in 2..8, got {options['first_last_bits']!r}")


def check_range_options(pass_name: str, options: dict[str, Any]) -> None:
    """The range options quantize and power-quant share: ``lam`` None or a finite number
    > 0, ``input_range`` None or a finite pair low < high (a NaN/inf there would become a
    NaN/inf quantization scale)."""
    lam = options["lam"]
    if lam is not None and not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and np.isfinite(lam) and lam > 0):
        raise PipelineError(f"{pass_name}: lam must be a finite positive number of standard deviations, got {lam!r}")
    if options["input_range"] is not None:
        try:
            low, high = (float(v) for v in options["input_range"])
        except (TypeError, ValueError):
            raise PipelineError(f"{pass_name}: input_range must be a pair (low, high), got {options['input_range']!r}") from None
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise PipelineError(f"{pass_name}: input_range needs finite low < high, got {options['input_range']!r}")


def correct_matmul_bias(graph: gs.Graph, layer: gs.Node, correction: np.ndarray | None, names: NameFactory) -> bool:
    """A MatMul's bias is the constant [N] operand of the Add reading its output (a Linear
    exported from PyTorch): add the correction there.  False (left as is) without such an Add."""
    out = layer.outputs[0]
    if correction is None or len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return False
    add = out.outputs[0]
    index = 1 if add.inputs[0] is out else 0
    bias = constant_values(add, index)
    if bias is None or bias.shape[-1:] != correction.shape or bias.size != correction.size:
        return False
    corrected = (bias.astype(np.float64) + correction.reshape(bias.shape)).astype(bias.dtype)
    set_constant_input(graph, add, index, corrected, names, base_name=f"{node_label(layer)}_bias")
    return True


def mean_shift(layer: gs.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """(W − Ŵ)·E[X] per output channel (summed over kernel positions); None if shapes differ."""
    if layer.op == "Conv":
        groups = int(layer.attrs.get("group", 1))
        out, per_group = delta.shape[0], delta.shape[1]
        if len(mean) != groups * per_group:
            return None
        grouped = delta.reshape(groups, out // groups, per_group, -1)
        return np.einsum("gojk,gj->go", grouped, mean.reshape(groups, per_group)).reshape(out)
    k_by_n = delta.T if layer.attrs.get("transB", 0) else delta
    return mean @ k_by_n if len(mean) == k_by_n.shape[0] else None


__all__ = ["Quantize", "check_bit_widths", "correct_matmul_bias", "float_label", "layer_refusal", "no_layer_message"]
