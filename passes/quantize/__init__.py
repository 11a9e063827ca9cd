"""quantize: data-free static quantization to standard ONNX QDQ, with per-channel SPIQ scales.

Before::   x ── Conv(W, b) ── Relu ── Conv(W2, b2) ── y
After::    x ── Conv(W, b)' ── Relu ── Q ── DQ ── Conv(DQ(W2_int8), DQ(b2_int32)) ── Q ── DQ ── y

Steps (docs/quantization.md):

1. **Ranges** (:mod:`.activation_ranges`) of every tensor a quantizable layer (Conv,
   ConvTranspose, Gemm, MatMul with constant weights on [M, K] or [B, T, K] inputs —
   transformer linear layers) reads:
   data-free from BN statistics and from LayerNormalization statistics (output mean β_c,
   std |γ_c| per feature, docs/quantization.md) (``act_ranges="bn"``, λ = 9 at 8 bits, 4 at ≤ 6
   bits) propagated through Relu/Clip/pooling/Concat/Add, or measured on calibration data
   (``"minmax"`` / ``"percentile"``; ``calibration_data`` is an .npz, a folder of .npy files
   or a folder of images with ``calibration_mean/std/layout``, see :mod:`..common.calibration`).
   The graph input has no statistics: the first layer
   stays float unless ``input_range`` or calibration data is given.  A MatMul/Gemm whose
   input has no range (a transformer's attention output, GELU output) is quantized
   *dynamically* (``dynamic_fallback="auto"``, :mod:`.dynamic`: DynamicQuantizeLinear →
   MatMulInteger → Cast → Mul, ORT's DynamicQuantizeMatMul / MatMulIntegerToFloat);
   ``False`` keeps them float, ``"all"`` makes every MatMul/Gemm dynamic.  Readers of a
   quantized tensor that ORT cannot fuse (e.g. a post-LN residual Add) read the float tensor
   (:mod:`.fallback`).
2. **SPIQ** (``spiq="auto"``, the default; ``True`` forces it where possible, ``False``
   never): per-channel steps s_c become per-tensor by folding ``r_c = s_c / max s`` into
   the producer (÷; a Conv/Gemm/MatMul or a LayerNorm's γ, β) and the readers (×), see
   :mod:`.spiq`.  ``auto`` applies it where the estimated output error (weight noise +
   activation noise with E[x²] of the rectified Gaussian + the clipping error at each
   quantizer's top code under a partly heavy-tailed model of the BN output,
   :func:`.spiq.estimated_errors`) is at least 5 % lower than per tensor (SPIQ_MIN_GAIN).
   SPIQ clips each channel at its own BN range, per tensor at the widest channel's; real
   depthwise outputs exceed their BN range far more often than a Gaussian says, which is
   what the clipping term sees (docs/quantization.md).  When the
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
4. **Emission** (:mod:`..common.emit`): per-tensor activation Q→DQ (uint8 zero point 0 after ReLU,
   int8 elsewhere), shared by all readers; also on the output of every quantized layer
   (after its Relu/ReLU6, :mod:`.outputs`) so ORT fuses each layer into QLinearConv/QGemm.

5. **Fusion check** (``check_fusion=True``, :mod:`.fusion`): the result is loaded in ORT's
   CPU provider at ORT_ENABLE_ALL and the graph ORT builds tells which layers run as integer
   kernels (stats ``fused_by_ort`` / ``not_fused``, a report line).  A static QDQ MatMul/Gemm
   ORT does not fuse (a fully static rank-3 input: ORT turns MatMul+Add into
   Reshape → Gemm → Reshape and the DequantizeLinear no longer feeds it) is re-emitted in the
   dynamic form, or put back in float (:mod:`.fallback`).  A Conv ORT does not fuse (e.g. the last layer, whose
   output is a graph output without a quantizer) is put back in float too
   (``unfused_conv_to_float=True``, the default: a QDQ layer ORT runs in float is slower than
   the float layer, bench/results/unfused_conv.md) and counted in the coverage line with the
   reason; ``False`` keeps its QDQ form and only reports it in ``not_fused``.  A depthwise
   Conv whose QLinearConv output ORT only dequantizes (float readers: hard-swish or a
   squeeze-excite gate, as in MobileNetV3) goes back to float with its output quantizer
   (``float_depthwise_before_float=True``, DEPTHWISE_BEFORE_FLOAT): its output must be converted
   anyway, and ORT's int8 depthwise kernel is slower than its float one (docs/quantization.md,
   "Depthwise Convs before float ops").  With
   ``act_bits < 8`` (a Clip before every QuantizeLinear: ORT fuses nothing) no fallback is
   applied: the layers keep the QDQ simulation that was asked for (LOW_BIT_ACTIVATION_NOTE).  Layers inside
   If/Loop/Scan bodies are checked the same way.

Control flow: layers inside If/Loop/Scan bodies are quantized like the main graph's, one
graph at a time, with every Q/DQ in the graph of the layer reading it (ORT fuses within one
graph); BN/LN statistics are read in the bodies and calibration threads body tensors out as
extra body/node outputs (:func:`..common.tensor_probe.expose_tensors`; docs/quantization.md,
"Layers inside If/Loop/Scan bodies").

Opset: the pass declares ``min_opset = 13`` (per-axis DequantizeLinear); the PassManager
upgrades an older model before the pipeline runs (a note in the report).

Refused (reported per layer): non-constant or non-float32 weights (float16/float64 models:
convert to float32 first), Gemm with transA or alpha/beta ≠ 1, inputs without statistics.
The stats carry a ``coverage`` entry (layers quantized of all Conv/ConvTranspose/Gemm/MatMul,
the float ones counted by reason) that the report prints as one line.  When no layer is
quantized the run stops with a NothingToDoError naming the cause and the fix (e.g. no
statistics at all and no calibration data: pass calibration samples or export with BN kept).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PipelineError
from onnxopt.graph import (
    NameFactory,
    all_graphs,
    cleanup,
    constant_values,
    is_default_domain,
    node_label,
    set_constant_input,
)
from onnxopt.options import option
from onnxopt.pass_base import Pass, PassContext, PassResult, PreconditionFailed, Refusal, Stage

from ..common.emit import quantize_activation, quantize_layer_bias, quantize_layer_weight
from ..common.numerics import ActivationQuant, activation_quant
from ..common.ops import LAYER_OPS, MATRIX_OPS
from ..common.quantization import (
    QuantizationOptions,
    QuantizedLayer,
    QuantizedLayers,
    correct_matmul_bias,
    float_label,
    layer_refusal,
    mean_shift,
    no_layer_message,
)
from ..common.ranges import ChannelRange, default_lambda
from . import spiq as spiq_rewrite
from .activation_ranges import activation_ranges
from .dynamic import can_be_dynamic, dequantized_weight_codes, emit_dynamic, quantize_dynamic_layer
from .fallback import (
    MOVEMENT_OPS,
    depthwise,
    dequantized_input,
    float_source,
    read_float_where_unfused,
    static_weight_name,
    unquantize,
)
from .fusion import FusionCheck, check_fusion
from .outputs import chain_end, drop_output_quantizer, quantize_outputs

#: act_ranges values whose ranges are measured extrema (no statistics for the SPIQ estimate);
#: "moments" measures statistics and decides like the data-free path.
MEASURED_RANGES = ("minmax", "percentile")
#: spiq="auto" folds the scales only where the estimated error is at most this share of the
#: per-tensor one: a near tie (< 5 % estimated gain) stays per tensor (see _spiq_pays).
SPIQ_MIN_GAIN = 0.95
DEPTHWISE_BEFORE_FLOAT = (
    "depthwise before float ops: ORT dequantizes its int8 output for float readers (e.g. hard-swish, a squeeze-excite gate) "
    "and its int8 depthwise kernel is slower than the float one: put back in float (--no-float-depthwise-before-float keeps it)"
)
INT4_NOTE = "INT4 weights shrink the file; ONNX Runtime's CPU provider does not fuse INT4 DequantizeLinear (those layers run in float)"
LOW_BIT_ACTIVATION_NOTE = (
    "activations below 8 bits are simulated: a Clip to the b-bit range precedes each 8-bit QuantizeLinear, and ONNX Runtime's "
    "CPU provider fuses no layer behind it (the model runs in float, slower than FP32); use it to study accuracy, act_bits=8 to deploy"
)
#: spiq="auto" with calibration data: per tensor everywhere.  The error estimate is built for
#: BN-statistics ranges; with min/max ranges from samples, per tensor gave lower KL to FP32 on
#: every model of bench/results/third_party.md (e.g. EfficientNet-Lite0 10 samples).
SPIQ_AUTO_CALIBRATED = "per tensor: ranges measured on calibration data (--spiq forces SPIQ)"
NO_STATISTICS = "no BatchNormalization/LayerNormalization statistics and no calibration data"


@dataclass(frozen=True)
class QuantizeOptions(QuantizationOptions):
    """The quantize pass's options (the shared ones in QuantizationOptions)."""

    #: per-output-channel weight scales (False: one per layer)
    per_channel: bool = option(True, flag="--per-tensor-weights")
    #: SPIQ activation scales folded into the weights: True, False, or where the estimate is lower
    spiq: bool | Literal["auto"] = option("auto", flag="--spiq")
    #: store <= 4-bit weights as INT4 (opset >= 21; ORT's CPU provider does not fuse them)
    int4_weights: bool = option(False, flag="--int4-weights")
    #: MatMul/Gemm layers without an activation range: quantized dynamically
    dynamic_fallback: bool | Literal["auto", "all"] = option("auto", flag="--dynamic-fallback")
    #: count the layers ORT really fuses (and re-emit the MatMuls it does not)
    check_fusion: bool = option(True, flag="--no-check-fusion")
    #: put a QDQ Conv ORT does not fuse back in float (False: keep its QDQ form, reported as not fused)
    unfused_conv_to_float: bool = option(True, flag="--no-unfused-conv-float")
    #: put a depthwise Conv back in float when only float ops read its output
    float_depthwise_before_float: bool = option(True, flag="--no-float-depthwise-before-float")


class Quantize(Pass):
    name = "quantize"
    summary = "data-free static quantization to QDQ with per-channel SPIQ scales folded into weights (wNaM)"
    stage = Stage.QUANTIZE
    lossless = False
    tags = frozenset({"quantize"})
    request = "quantize"
    min_opset = 13  # per-axis DequantizeLinear
    runs_after = frozenset({"bn-fold"})
    Options = QuantizeOptions
    produces = frozenset({QuantizedLayers})

    # ------------------------------------------------------------------ checks
    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if self.options["int4_weights"] and graph.opset < 21:
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
        scopes = all_graphs(graph)  # the main graph, then the If/Loop/Scan bodies (nested too)
        self._scope_of: dict[int, gs.Graph] = {}
        candidates = []
        for scope in scopes:
            found = [n for n in scope.nodes if n.op in LAYER_OPS and is_default_domain(n)]
            self._scope_of.update((id(n), scope) for n in found)
            candidates += found
        self._float_reasons: Counter[str] = Counter()
        self._no_statistics = False
        self._dynamic_weights: dict[str, str] = {}
        self._dynamic_caches: dict[int, dict[str, Any]] = {}
        self._float_biases: dict[int, np.ndarray | None] = {}
        layers = [n for n in candidates if self._layer_ok(n, ctx)]
        if not layers:
            return PassResult(False, {"layers_quantized": 0, "coverage": self._coverage(len(candidates), 0)})
        self._calibration_stats: dict[str, Any] = {}
        ranges = self._ranges(graph, ctx, layers)
        by_scope = [(scope, [layer for layer in layers if self._scope_of[id(layer)] is scope]) for scope in scopes]
        by_scope = [(scope, found) for scope, found in by_scope if found]
        self._edges = tuple(layer for _, found in by_scope for layer in (found[0], found[-1]))  # first/last of each (sub)graph
        self._quantized = QuantizedLayers({})
        ctx.publish(self._quantized)
        records: list[dict[str, Any]] = []
        quantized_layers: list[gs.Node] = []
        counts: Counter[str] = Counter()
        for scope, scope_layers in by_scope:
            body = None if scope is graph else scope.name or "body"
            done, scope_records, scope_counts = self._quantize_scope(scope, ctx, scope_layers, ranges, names, body)
            quantized_layers += done
            records += scope_records
            counts.update(scope_counts)
        cleanup(graph)
        fusion = self._check_fusion(graph, ctx, quantized_layers, records, names)
        kinds = Counter(r["mode"] == "dynamic" for r in records)
        in_bodies = sum(1 for r in records if r.get("body"))

        spiq_count = sum(1 for r in records if r["mode"] == "spiq")
        return PassResult(
            bool(records),
            {
                "layers_quantized": len(records),
                "layers_float": len(layers) - len(records),
                "layers_dynamic": kinds[True],
                **({"layers_in_bodies": in_bodies} if in_bodies else {}),
                "spiq_coverage": round(spiq_count / kinds[False], 4) if kinds[False] else 0.0,
                "outputs_quantized": counts["outputs_quantized"],
                "float_readers_restored": counts["float_readers"],
                **({"spiq_auto": SPIQ_AUTO_CALIBRATED} if self.options["spiq"] == "auto" and self.options["act_ranges"] in MEASURED_RANGES else {}),
                "coverage": self._coverage(len(candidates), len(records), kinds[False], kinds[True], fusion),
                **(fusion.stats() if fusion is not None else {}),
                **self._calibration_stats,
                **({"int4_layers": counts["int4_layers"], "int4_note": INT4_NOTE} if self.options["int4_weights"] else {}),
                **({"low_bit_activation_note": LOW_BIT_ACTIVATION_NOTE} if self._low_bit_activations() else {}),
                "layers": records,
            },
        )

    def _quantize_scope(
        self, scope: gs.Graph, ctx: PassContext, layers: list[gs.Node], ranges: dict[str, ChannelRange], names: NameFactory,
        body: str | None,
    ) -> tuple[list[gs.Node], list[dict[str, Any]], Counter[str]]:
        """Quantize the ``layers`` of one graph (the main graph or a body): every Q/DQ goes into
        ``scope`` itself, beside the layer ORT fuses, also for a tensor the body reads from
        the enclosing graph.  The layers quantized statically, the records, the counts."""
        self._dynamic: list[gs.Node] = []
        readers_of: dict[str, list[gs.Node]] = defaultdict(list)
        for layer in layers:
            readers_of[layer.inputs[0].name].append(layer)
        quants: dict[str, ActivationQuant] = {}
        means: dict[str, np.ndarray | None] = {}
        moments: dict[str, np.ndarray] = {}
        records: list[dict[str, Any]] = []
        for tensor_name, readers in readers_of.items():
            tensor = readers[0].inputs[0]
            channel_range = ranges.get(float_source(tensor).name)  # a body layer may read the enclosing graph's Q→DQ
            readers = self._take_dynamic(readers, channel_range is None)
            if not readers:
                continue
            if channel_range is None:
                for reader in readers:
                    self._keep_float(ctx, reader, f"no statistics for its input {tensor_name}: kept in float")
                continue
            quant, mean, mode, moment = self._input_quantizer(scope, ctx, tensor, readers, channel_range, names)
            quants[tensor_name], means[tensor_name], moments[tensor_name] = quant, mean, moment
            records.extend({"layer": node_label(r), "input": tensor_name, "mode": mode, "scale": float(quant.scale)} for r in readers)

        quantized_layers = [layer for layer in layers if layer.inputs[0].name in quants]
        self._quantized.layers.update({
            layer.outputs[0].name: QuantizedLayer(
                constant_values(layer, 1).copy(), self._weight_bits(layer, self._edges), self.options["per_channel"],
                means.get(layer.inputs[0].name) if self.options["bias_correction"] else None, moments.get(layer.inputs[0].name),
            )
            for layer in quantized_layers
        })
        counts: Counter[str] = Counter()
        counts["int4_layers"] = self._quantize_weights(scope, quantized_layers, quants, means, self._edges, names)
        dq_of = {name: quantize_activation(scope, readers_of[name][0].inputs[0], quant, names) for name, quant in quants.items()}
        counts["outputs_quantized"] = quantize_outputs(scope, ctx, quantized_layers, ranges, quants, dq_of, names, self.options["act_bits"])
        records.extend(self._quantize_dynamic(scope, names))
        counts["float_readers"] = read_float_where_unfused(scope, dq_of)
        if body is not None:
            for record in records:
                record["body"] = body
        return quantized_layers, records, counts

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

    def _coverage(self, total: int, quantized: int, static: int = 0, dynamic: int = 0, fusion: Any = None) -> dict[str, Any]:
        coverage = {"verb": "quantized", "unit": "layers", "done": quantized, "total": total, "left": "float", "reasons": dict(self._float_reasons)}
        if dynamic:
            coverage["kinds"] = {"static": static, "dynamic": dynamic}
        if fusion is not None and fusion.error is None:
            coverage["fused"] = fusion.counts()
            coverage["not_fused"] = len(fusion.not_fused)
        return coverage

    # ------------------------------------------------------------------ dynamic layers, fusion check
    def _take_dynamic(self, readers: list[gs.Node], no_range: bool) -> list[gs.Node]:
        """Move the MatMul/Gemm ``readers`` that get the dynamic form (no range for their input
        with ``dynamic_fallback`` on, or every one with ``"all"``) to ``self._dynamic``; the rest."""
        mode = self.options["dynamic_fallback"]
        if mode is False or not (no_range or mode == "all"):
            return readers
        if mode == "auto" and self._no_statistics:
            return readers  # no statistics anywhere (a BN-folded CNN): the fix is calibration data, not a lone dynamic layer
        dynamic = [r for r in readers if can_be_dynamic(r)]
        self._dynamic.extend(dynamic)
        return [r for r in readers if not any(r is d for d in dynamic)]

    def _quantize_dynamic(self, graph: gs.Graph, names: NameFactory) -> list[dict[str, Any]]:
        """Emit the dynamic form for ``self._dynamic`` (layers of ``graph``); their records (mode "dynamic")."""
        cache = self._dynamic_caches.setdefault(id(graph), {})
        records = []
        for layer in self._dynamic:
            label, tensor = node_label(layer), layer.inputs[0].name
            bits = self._weight_bits(layer, self._edges)
            self._dynamic_weights[label] = quantize_dynamic_layer(graph, layer, bits, self.options["per_channel"], cache, names)
            records.append({"layer": label, "input": tensor, "mode": "dynamic"})
        return records

    def _check_fusion(
        self, graph: gs.Graph, ctx: PassContext, static_layers: list[gs.Node], records: list[dict[str, Any]], names: NameFactory
    ) -> FusionCheck | None:
        """What ORT runs for each quantized layer (:mod:`.fusion`); a static layer ORT does not
        fuse is re-emitted in the dynamic form (MatMul/Gemm) or put back in float, then checked
        again: no QDQ layer is left that ORT runs in float."""
        if not self.options["check_fusion"] or not records:
            return None
        weights = {node_label(layer): static_weight_name(layer) for layer in static_layers}
        weights.update(self._dynamic_weights)
        check = check_fusion(ctx.export(graph), weights)
        if check.error is not None:
            ctx.refuse("ORT fusion check", f"not run ({check.error}): which layers ORT fuses is unknown")
            return check
        by_label = {node_label(layer): layer for layer in static_layers}
        changed = self._depthwise_to_float(graph, ctx, check, by_label, records, weights, names)
        for label, reason in check.not_fused.items():
            layer = by_label.get(label)
            if layer is None or self._int4_layer(layer) or (layer.op not in MATRIX_OPS and not self.options["unfused_conv_to_float"]):
                ctx.refuse(f"layer {label}", f"not fused by ORT: {reason}")
                continue
            if self._low_bit_activations():
                ctx.refuse(f"layer {label}", f"not fused by ORT ({reason}): kept as QDQ, {LOW_BIT_ACTIVATION_NOTE}")
                continue
            changed = True
            record = next(r for r in records if r["layer"] == label)
            kept = self._quantized.layers.pop(layer.outputs[0].name, None)
            float_weight = kept.float_weight if kept is not None else None
            if self._to_dynamic(self._scope_of[id(layer)], layer, names):
                weights[label] = self._dynamic_weights[label]
                record.update(mode="dynamic", static_not_fused=reason)
                ctx.refuse(f"static QDQ of {label}", f"not fused by ORT ({reason}): emitted in the dynamic form instead")
            else:
                self._to_float(graph, ctx, layer, float_weight, records, weights, names,
                               f"not fused by ORT ({reason}): put back in float (a QDQ layer ORT runs in float is slower than FP32)")
        if changed:
            cleanup(graph)
            check = check_fusion(ctx.export(graph), weights)
            if self._depthwise_to_float(graph, ctx, check, by_label, records, weights, names):  # e.g. an SE Conv put back in float
                cleanup(graph)  # above leaves the depthwise Conv before it with only float readers
                check = check_fusion(ctx.export(graph), weights)
            for label, reason in check.not_fused.items():
                ctx.refuse(f"layer {label}", f"not fused by ORT after the fallback: {reason}")
        return check

    def _depthwise_to_float(
        self, graph: gs.Graph, ctx: PassContext, check: FusionCheck, by_label: dict[str, gs.Node], records: list[dict[str, Any]],
        weights: dict[str, str], names: NameFactory,
    ) -> bool:
        """Put back in float every depthwise Conv whose QLinearConv output ORT only dequantizes
        (float readers such as hard-swish or a squeeze-excite gate), with its output quantizer:
        that conversion is paid anyway (at its input instead when the layer before is int8),
        and ORT's int8 depthwise kernel is slower than its float one (docs/quantization.md).
        Whether the model gets changed."""
        if not self.options["float_depthwise_before_float"] or self._low_bit_activations():
            return False
        changed = False
        for label in sorted(check.dequantized_only):
            layer = by_label.get(label)
            if layer is None or not depthwise(layer) or self._int4_layer(layer):
                continue
            kept = self._quantized.layers.pop(layer.outputs[0].name, None)
            self._to_float(graph, ctx, layer, kept.float_weight if kept is not None else None, records, weights, names, DEPTHWISE_BEFORE_FLOAT)
            drop_output_quantizer(layer)
            check.fused.pop(label, None)
            changed = True
        return changed

    def _to_float(
        self, graph: gs.Graph, ctx: PassContext, layer: gs.Node, float_weight: np.ndarray | None, records: list[dict[str, Any]],
        weights: dict[str, str], names: NameFactory, reason: str,
    ) -> None:
        """Put a static QDQ ``layer`` back in float (its float weight and its bias before bias correction), reported with ``reason``."""
        label = node_label(layer)
        unquantize(graph, layer, names, float_weight, self._float_biases.get(id(layer)))
        records.remove(next(r for r in records if r["layer"] == label))
        weights.pop(label)
        self._keep_float(ctx, layer, reason)

    def _low_bit_activations(self) -> bool:
        """Activations below 8 bits were asked for: their QDQ form is a simulation ORT never fuses
        (LOW_BIT_ACTIVATION_NOTE), so an unfused layer keeps it instead of going back to float
        or to the dynamic form (8-bit activations), which would drop what the user asked for."""
        return int(self.options["act_bits"]) < 8

    def _int4_layer(self, layer: gs.Node) -> bool:
        """INT4 weights are never fused by ORT's CPU provider: the user asked for size (INT4_NOTE)."""
        return bool(self.options["int4_weights"]) and self._weight_bits(layer, self._edges) <= 4

    def _to_dynamic(self, graph: gs.Graph, layer: gs.Node, names: NameFactory) -> bool:
        """Re-emit a static QDQ MatMul/Gemm in the dynamic form with the same weight codes."""
        codes = dequantized_weight_codes(layer) if self.options["dynamic_fallback"] is not False and layer.op in ("MatMul", "Gemm") else None
        if codes is None:
            return False
        label = node_label(layer)  # before the rewrite: emit_dynamic renames an unnamed layer's output
        layer.inputs[0] = float_source(layer.inputs[0])
        bias = dequantized_input(layer, 2) if layer.op == "Gemm" else None
        cache = self._dynamic_caches.setdefault(id(graph), {})
        self._dynamic_weights[label] = emit_dynamic(graph, layer, *codes, cache, names, bias=bias)
        return True

    def nothing_done(self, result: PassResult, refusals: list[Refusal]) -> str:
        """``quantize: 0 of N layers quantized: <cause>; <fix>``."""
        coverage = result.stats.get("coverage")
        if coverage is None:  # refused before looking at the layers
            return super().nothing_done(result, refusals)
        return no_layer_message(self.name, coverage, NO_STATISTICS if self._no_statistics else None)

    def _ranges(self, graph: gs.Graph, ctx: PassContext, layers: list[gs.Node]) -> dict[str, ChannelRange]:
        """Per-channel ranges of the layers' inputs and of their output chain ends (:mod:`.activation_ranges`)."""
        wanted = [layer.inputs[0] for layer in layers] + [chain_end(layer.outputs[0]) for layer in layers]
        found = activation_ranges(graph, ctx, wanted, self.options, self.name)
        if found.no_statistics:
            self._no_statistics = True  # every layer is refused below; nothing_done says how to get ranges
        self._calibration_stats = found.calibration_stats
        return found.ranges

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
        if ctx.consumed_later(QuantizedLayers):  # a later pass (REx) expands the weights: estimates made for weight_bits do not hold
            return True
        if self.options["act_ranges"] in MEASURED_RANGES:  # measured ranges: per tensor (see SPIQ_AUTO_CALIBRATED)
            return False
        moment = self._moment(r)
        bits = max(self._weight_bits(reader, self._edges) for reader in readers)
        signed = not bool(np.all(r.lo >= 0))
        act_bits = self.options["act_bits"]
        levels = 2 ** (act_bits - 1) - 1 if signed else 2**act_bits - 1
        errors = spiq_rewrite.estimated_errors(readers, moment, step, tensor_step, bits, self.options["per_channel"], r.tail, levels, signed)
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
            self._float_biases[id(layer)] = constant_values(layer, 2)  # before bias correction: for a layer put back in float
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


__all__ = [
    "MOVEMENT_OPS", "Quantize", "QuantizeOptions", "correct_matmul_bias", "dequantized_input", "float_label", "float_source", "layer_refusal",
    "no_layer_message", "read_float_where_unfused", "static_weight_name", "unquantize",
]
