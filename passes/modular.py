"""modular-accumulator: integer layers whose accumulator wraps to b bits (docs/modular-arithmetic.md,
thesis §4.5), for evaluating W b / A b / acc b configurations.

Before (QDQ, as the ``quantize`` pass emits it)::

    x_q ── DequantizeLinear(s_x, z_x) ──┐
    q_W (int8) ── DequantizeLinear(s_w) ─┼── Conv ── y
    q_b (int32) ── DequantizeLinear(s_x·s_w) ┘

After::

    x_q ── ModularConv(q_W + 128 as uint8, z_x, 128, q_b; bits=B) ── Cast ── Mul(s_x·s_w) ── y

``ModularConv`` / ``ModularMatMul`` (:mod:`onnxopt.runtime_ops.modular`) compute
``wrap_B(Σ (x_q − z_x)(q_W) + q_b)`` with ``wrap_B(v) = ((v + 2^{B−1}) mod 2^B) − 2^{B−1}``:
the bias is part of the accumulator.  Weights are stored uint8 ``q_W + 128`` with an
explicit zero point 128 (ConvInteger with int8 weights is ~4.7× slower on ORT 1.32, §7).

``accumulator_bits``: an int (2..31) for every layer; ``"auto"`` for the per-layer minimum
safe width; ``None`` for no wrap at all (the plain integer model — the reference the wrapped
model equals bit for bit when the width is ≥ the worst case).  Worst case per output channel
(data-free, [derived] in docs/modular-arithmetic.md): ``Σ_k |q_W[c, k]|·max|x_q − z_x| + |q_b[c]|``, needing
``⌈log2(v + 1)⌉ + 1`` signed bits; ``max|x_q − z_x|`` is the activation's clip range when a
Clip feeds the QuantizeLinear (sub-8-bit activations), else the 8-bit storage range.

Refused (reported): layers whose input or weight is not a DequantizeLinear of the expected
form (uint8 activation codes, constant int8 weight codes with zero point 0), Gemm with transA
or alpha/beta ≠ 1, bias DQ whose scale is not s_x·s_w (then the float bias is added after the
scaling, outside the accumulator — reported, not refused).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import PipelineError
from onnxopt.flags import FlagFamily
from onnxopt.graph import NameFactory, cleanup, constant_values, is_default_domain, node_label, optional_input, producer
from onnxopt.options import OptionProblem, PassOptions, option
from onnxopt.pass_base import Pass, PassContext, PassResult, PreconditionFailed, Stage
from onnxopt.runtime_ops import DOMAIN, MIN_OPSET, add_functions_to_graph

from .common.layers import transposed_weight
from .common.numerics import checked_scales
from .common.ops import WITHOUT_TRANSPOSE_OPS

MAX_BITS = 31


@dataclass
class IntegerLayer:
    """A QDQ layer seen as integers: y = (s_x·s_w)·(Σ (x_q − z_x)·q_w + q_b) (+ float bias)."""

    layer: gs.Node
    x_codes: gs.Tensor
    x_zero: np.ndarray
    x_scale: float
    x_max: int
    weight: np.ndarray  # int codes; Conv: [M, C/g, k...]; MatMul/Gemm: [K, N]
    w_scale: np.ndarray  # per output channel (or scalar)
    bias_codes: np.ndarray | None  # int32 per output channel, inside the accumulator
    float_bias: np.ndarray | None  # added after the scaling when the bias scale does not match

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0] if self.layer.op == "Conv" else self.weight.shape[1]

    def worst_case(self) -> np.ndarray:
        """Σ|q_w|·max|x| + |q_b| per output channel."""
        w = np.abs(self.weight.astype(np.int64))
        total = w.reshape(w.shape[0], -1).sum(axis=1) if self.layer.op == "Conv" else w.sum(axis=0)
        total = total * self.x_max
        if self.bias_codes is not None:
            total = total + np.abs(self.bias_codes.astype(np.int64))
        return total

    def required_bits(self) -> int:
        return bits_for(int(self.worst_case().max()))


def bits_for(magnitude: int) -> int:
    """Signed bits holding ±magnitude: ⌈log2(v + 1)⌉ + 1."""
    return int(math.ceil(math.log2(magnitude + 1))) + 1


def _dq_parts(tensor: gs.Tensor) -> tuple[gs.Node, gs.Tensor, np.ndarray, np.ndarray, int] | None:
    node = producer(tensor)
    if node is None or node.op != "DequantizeLinear" or not is_default_domain(node) or len(node.inputs) < 2:
        return None
    scale = node.inputs[1]
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if not isinstance(scale, gs.Constant) or (zero is not None and not isinstance(zero, gs.Constant)):
        return None
    zero_values = np.zeros((), np.uint8) if zero is None else np.asarray(zero.values)
    return node, node.inputs[0], np.asarray(scale.values, np.float64), zero_values, int(node.attrs.get("axis", 1))


def _activation_max(codes: gs.Tensor, scale: float, zero: int) -> int:
    """max |x_q − z|: the Clip range before the QuantizeLinear if any, else uint8 storage."""
    storage = max(zero, 255 - zero)
    quantizer = producer(codes)
    if quantizer is None or quantizer.op != "QuantizeLinear":
        return storage
    clip = producer(quantizer.inputs[0])
    if clip is None or clip.op != "Clip" or len(clip.inputs) < 3:
        return storage
    bounds = [constant_values(clip, i) for i in (1, 2)]
    if any(b is None for b in bounds):
        return storage
    return min(storage, int(np.round(max(abs(float(bounds[0])), abs(float(bounds[1]))) / scale)))


def match(layer: gs.Node) -> IntegerLayer | str:
    """The integer view of a QDQ layer, or why it has none."""
    if layer.op == "Gemm" and (layer.attrs.get("transA", 0) or layer.attrs.get("alpha", 1.0) != 1.0 or layer.attrs.get("beta", 1.0) != 1.0):
        return "Gemm with transA or alpha/beta ≠ 1"
    x_parts, w_parts = _dq_parts(layer.inputs[0]), _dq_parts(layer.inputs[1])
    if x_parts is None:
        return "input is not DequantizeLinear with constant scale/zero point"
    if w_parts is None or not isinstance(w_parts[1], gs.Constant):
        return "weight is not DequantizeLinear of constant codes"
    _, x_codes, x_scale, x_zero, _ = x_parts
    _, w_const, w_scale, w_zero, w_axis = w_parts
    if x_scale.size != 1 or x_zero.size != 1 or x_zero.dtype != np.uint8 or x_codes.dtype not in (np.uint8, None):
        return "activation quantization is not per-tensor uint8"
    codes = np.asarray(w_const.values)
    if codes.dtype != np.int8 or np.any(w_zero != 0):
        return "weight codes are not int8 with zero point 0"
    out_axis = 0 if layer.op == "Conv" or transposed_weight(layer) else 1
    if w_scale.size > 1 and w_axis % codes.ndim != out_axis:
        return "weight scales do not run along the output channels"
    weight = codes.T if transposed_weight(layer) else codes
    if layer.op != "Conv" and weight.ndim != 2:
        return "MatMul weight of rank ≠ 2"
    s_x = float(x_scale.reshape(()))
    n_out = weight.shape[0] if layer.op == "Conv" else weight.shape[1]
    w_scale = np.broadcast_to(w_scale.reshape(-1), (n_out,)).astype(np.float64)
    bias_codes, float_bias = None, None
    if layer.op != "MatMul" and optional_input(layer, 2) is not None:
        b_parts = _dq_parts(layer.inputs[2])
        if b_parts is not None and isinstance(b_parts[1], gs.Constant) and np.asarray(b_parts[1].values).dtype == np.int32:
            b_scale = np.broadcast_to(b_parts[2].reshape(-1), (n_out,))
            if np.allclose(b_scale, np.float32(s_x) * w_scale.astype(np.float32), rtol=1e-6, atol=0):
                bias_codes = np.asarray(b_parts[1].values).reshape(-1)
            else:
                float_bias = (np.asarray(b_parts[1].values) * b_scale).astype(np.float32)
        else:
            values = constant_values(layer, 2)
            if values is None:
                return "bias is neither an int32 DequantizeLinear nor a constant"
            float_bias = values.astype(np.float32).reshape(-1)
    return IntegerLayer(layer, x_codes, x_zero.reshape(()), s_x, _activation_max(x_codes, s_x, int(x_zero)), weight, w_scale, bias_codes, float_bias)


def integer_layers(graph: gs.Graph) -> tuple[list[IntegerLayer], list[tuple[gs.Node, str]]]:
    found, refused = [], []
    for node in graph.nodes:
        if node.op in WITHOUT_TRANSPOSE_OPS and is_default_domain(node):
            result = match(node)
            (refused.append((node, result)) if isinstance(result, str) else found.append(result))
    return found, refused


def rewrite(graph: gs.Graph, item: IntegerLayer, bits: int | None, names: NameFactory) -> gs.Variable:
    """Replace the QDQ layer by the modular (or, bits None, plain) integer layer; returns the
    int32 accumulator tensor."""
    layer, label = item.layer, node_label(item.layer)
    conv = layer.op == "Conv"
    rank_tail = [1] * (item.weight.ndim - 2) if conv else []
    w_u8 = gs.Constant(names.new(f"{label}_w_uint8"), (item.weight.astype(np.int16) + 128).astype(np.uint8))
    zp_x = gs.Constant(names.new(f"{label}_x_zero_point"), np.asarray(item.x_zero, np.uint8))
    zp_w = gs.Constant(names.new(f"{label}_w_zero_point"), np.array(128, np.uint8))
    bias = item.bias_codes if item.bias_codes is not None else np.zeros(item.out_channels, np.int32)
    bias_c = gs.Constant(names.new(f"{label}_bias_int32"), bias.astype(np.int32).reshape(-1, *rank_tail))
    acc = gs.Variable(names.new(f"{label}_accumulator"), dtype=np.int32)
    conv_attrs = {k: v for k, v in layer.attrs.items() if k in ("strides", "pads", "dilations", "group", "kernel_shape", "auto_pad")} if conv else {}
    nodes: list[gs.Node] = []
    if bits is None:
        product = gs.Variable(names.new(f"{label}_product"), dtype=np.int32)
        op = "ConvInteger" if conv else "MatMulInteger"
        nodes.append(gs.Node(op, names.new(f"{label}_{op}"), attrs=conv_attrs, inputs=[item.x_codes, w_u8, zp_x, zp_w], outputs=[product]))
        nodes.append(gs.Node("Add", names.new(f"{label}_bias_add"), inputs=[product, bias_c], outputs=[acc]))
    else:
        op = "ModularConv" if conv else "ModularMatMul"
        attrs = {"bits": int(bits), **conv_attrs}
        nodes.append(gs.Node(op, names.new(f"{label}_{op}"), attrs=attrs, inputs=[item.x_codes, w_u8, zp_x, zp_w, bias_c], outputs=[acc], domain=DOMAIN))
    as_float = gs.Variable(names.new(f"{label}_accumulator_float"), dtype=np.float32)
    nodes.append(gs.Node("Cast", names.new(f"{label}_Cast"), attrs={"to": onnx.TensorProto.FLOAT}, inputs=[acc], outputs=[as_float]))
    scale = (np.float32(item.x_scale) * item.w_scale.astype(np.float32)).astype(np.float32).reshape(-1, *rank_tail)
    y = layer.outputs[0]
    scaled = gs.Variable(names.new(f"{label}_scaled"), dtype=np.float32) if item.float_bias is not None else y
    nodes.append(gs.Node("Mul", names.new(f"{label}_scale"), inputs=[as_float, gs.Constant(names.new(f"{label}_out_scale"), checked_scales(scale, f"{label} output"))], outputs=[scaled]))
    if item.float_bias is not None:
        bias_f = gs.Constant(names.new(f"{label}_float_bias"), item.float_bias.reshape(-1, *rank_tail))
        nodes.append(gs.Node("Add", names.new(f"{label}_float_bias_add"), inputs=[scaled, bias_f], outputs=[y]))
    layer.outputs.clear()
    layer.inputs.clear()
    graph.nodes.extend(nodes)
    return acc


@dataclass(frozen=True)
class ModularOptions(PassOptions):
    #: the accumulator width the integer layers wrap to ('auto': per layer, the safe width)
    accumulator_bits: int | Literal["auto"] | None = option("auto", flag="--modular-accumulator")

    def check(self) -> None:
        super().check()
        bits = self.accumulator_bits
        if isinstance(bits, int) and not 2 <= bits <= MAX_BITS:
            raise OptionProblem("accumulator_bits", f"must be an integer in 2..{MAX_BITS}, 'auto' or None, got {bits!r}")

class ModularAccumulator(Pass):
    name = "modular-accumulator"
    summary = "rewrite QDQ layers into integer ModularConv/ModularMatMul whose accumulator wraps to b bits (or 'auto': per-layer safe width)"
    stage = Stage.EXPAND
    lossless = False
    tags = frozenset({"modular-accumulator"})
    request = "modular-accumulator"
    min_opset = MIN_OPSET  # CastLike in the function bodies
    runs_after = frozenset({"quantize"})
    Options = ModularOptions

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if graph.opset < MIN_OPSET:
            raise PreconditionFailed(f"opset {graph.opset} < {MIN_OPSET}: the custom-op function bodies need CastLike")

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        found, refused = integer_layers(graph)
        for node, reason in refused:
            ctx.refuse(f"layer {node_label(node)}", reason)
        if not found:
            return PassResult(False, {"layers_rewritten": 0})
        names = NameFactory(graph)
        option = self.options["accumulator_bits"]
        records = []
        for item in found:
            needed = item.required_bits()
            bits = None if option is None else min(needed, MAX_BITS) if option == "auto" else int(option)
            label = node_label(item.layer)  # before the rewrite detaches the node
            if item.float_bias is not None:
                ctx.refuse(f"bias of {label}", "bias scale is not s_x·s_w: added in float after the accumulator")
            acc = rewrite(graph, item, bits, names)
            records.append({"layer": label, "op": item.layer.op, "required_bits": needed, "bits": bits, "accumulator": acc.name})
        add_functions_to_graph(graph)
        cleanup(graph)
        wrapping = sum(1 for r in records if r["bits"] is not None and r["bits"] < r["required_bits"])
        return PassResult(True, {"layers_rewritten": len(records), "layers_may_overflow": wrapping, "layers": records})


__all__ = ["ModularAccumulator", "IntegerLayer", "integer_layers", "match", "rewrite", "bits_for"]


# --------------------------------------------------------------------------- CLI flags
def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("modular arithmetic (custom ops with ONNX function bodies)")
    group.add_argument("--modular-accumulator", metavar="BITS|auto", help="after --quantize: integer layers whose accumulator wraps to BITS bits ('auto': per-layer safe width)")


def pipeline_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """``--modular-accumulator BITS|auto`` → the pass and its accumulator_bits."""
    if args.modular_accumulator is None:
        return {}, []
    if args.quantize is None or args.power_quant is not None:
        raise PipelineError("--modular-accumulator needs --quantize wNaM (uniform QDQ quantization)")
    spec = args.modular_accumulator.strip().lower()
    if spec == "auto":
        return {"accumulator_bits": "auto"}, ["modular-accumulator"]
    if spec.isdigit():
        return {"accumulator_bits": int(spec)}, ["modular-accumulator"]
    raise PipelineError(f"bad --modular-accumulator {args.modular_accumulator!r}: expected BITS (2..31) or auto")


FLAGS = FlagFamily("modular-accumulator", add_arguments, pipeline_options)
