"""quantize: numerics, SPIQ rewrite exactness, end-to-end QDQ emission, bias correction,
bad inputs and calibration, on small text-format graphs (docs/quantization.md).

Every test checks what was rewritten and compares numbers: numerics against an independent
numpy reference and against ONNX Runtime's own QuantizeLinear/DequantizeLinear; SPIQ's float
rewrite against the original graph in ORT (rtol 1e-5); the quantized models against FP32 and
against an independent numpy fake-quant reference of docs/quantization.md  The real-model checks
(ORT fusion, MobileNetV2 fidelity) are in test_quantize_models.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.quantize import spiq
from onnxopt.passes.quantize.emit import quantize_activation
from onnxopt.passes.quantize.numerics import (
    ActivationQuant,
    activation_quant,
    checked_scales,
    bias_codes,
    dequantize_weight,
    fake_quantize,
    quantize_weight,
    weight_scales,
)
from scipy.stats import norm

import onnxopt
from onnxopt.errors import InputDataError, PipelineError, ValidationError
from onnxopt.graph import (
    NameFactory,
    cleanup,
    export_model,
    import_graph,
    with_inferred_shapes,
)
from onnxopt.verify import run, verify
from tests.conftest import text_model as model, ops, run_passes

RNG = np.random.default_rng(20240607)
QUANTIZE = ("fold-batchnorm", "quantize")
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# --------------------------------------------------------------------------- builders


def weights(*shape: int, scale: float = 0.4) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def bn_params(prefix: str, channels: int, *, gamma: tuple[float, float] = (0.5, 1.5), beta: tuple[float, float] = (0.0, 1.0)) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_g": RNG.uniform(*gamma, channels).astype(np.float32),
        f"{prefix}_b": RNG.normal(*beta, channels).astype(np.float32),
        f"{prefix}_m": RNG.normal(0, 1, channels).astype(np.float32),
        f"{prefix}_v": RNG.uniform(0.5, 2.0, channels).astype(np.float32),
    }




def bn(prefix: str, x: str, y: str) -> str:
    return f"{y} = BatchNormalization <epsilon = 0.00001> ({x}, {prefix}_g, {prefix}_b, {prefix}_m, {prefix}_v)"


def inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def nodes(proto: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == op]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def quantize_stats(report) -> tuple[dict, list[dict]]:
    """(stats, refusals) of the quantize pass in a report."""
    (entry,) = [p for p in report.passes if p.name == "quantize"]
    return entry.stats, [r.to_dict() for r in entry.refusals]


def intermediate(proto: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Value of an intermediate tensor (added as an extra output of a copy of the model)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.ValueInfoProto(name=name))
    return run(probe, feeds)[name]


def with_data_statistics(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The model with every BN's running mean/var set to the moments of its input on ``feeds``
    (in graph order), as training would leave them: the BN statistics then describe the data."""
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    for node in [n for n in result.graph.node if n.op_type == "BatchNormalization"]:
        values = intermediate(result, node.input[0], feeds).astype(np.float64)
        for index, stat in ((3, values.mean(axis=(0, 2, 3))), (4, values.var(axis=(0, 2, 3)))):
            (tensor,) = [t for t in result.graph.initializer if t.name == node.input[index]]
            tensor.CopyFrom(numpy_helper.from_array(stat.astype(np.float32), tensor.name))
    return result


def layer_params(proto: onnx.ModelProto, output: str) -> dict[str, np.ndarray]:
    """Quantization parameters of the layer producing ``output``: activation scale/zero point,
    weight codes/scales (and the DQ axis), bias codes/scales."""
    init = inits(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    layer = producers[output]
    x_dq, w_dq = producers[layer.input[0]], producers[layer.input[1]]
    assert x_dq.op_type == "DequantizeLinear" and producers[x_dq.input[0]].op_type == "QuantizeLinear"
    assert w_dq.op_type == "DequantizeLinear"
    params = {
        "x_scale": init[x_dq.input[1]], "x_zero": init[x_dq.input[2]],
        "w_codes": init[w_dq.input[0]], "w_scale": init[w_dq.input[1]], "w_zero": init[w_dq.input[2]], "w_axis": attr(w_dq, "axis"),
    }
    if len(layer.input) > 2 and layer.input[2]:
        b_dq = producers[layer.input[2]]
        assert b_dq.op_type == "DequantizeLinear"
        params.update(b_codes=init[b_dq.input[0]], b_scale=init[b_dq.input[1]], b_zero=init[b_dq.input[2]])
    return params


def relative_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    c, r = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(c - r) / np.linalg.norm(r))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------- ORT Q/DQ models
def qdq_model(shape: list[int], scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None, *, dequantize_only: bool = False) -> onnx.ModelProto:
    """x → QuantizeLinear → DequantizeLinear → y (outputs the codes q too), or DQ alone."""
    kwargs = {} if axis is None else {"axis": axis}
    zp_type = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    init = [numpy_helper.from_array(np.asarray(scale, np.float32), "s"), numpy_helper.from_array(zero_point, "z")]
    if dequantize_only:
        graph = helper.make_graph(
            [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kwargs)],
            "dq",
            [helper.make_tensor_value_info("q", zp_type, shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
            init,
        )
    else:
        graph = helper.make_graph(
            [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kwargs), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kwargs)],
            "qdq",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("q", zp_type, shape), helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
            init,
        )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto


def reference_weight_codes(w: np.ndarray, bits: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference (float64): s = max|W|/(2^{b-1}-1), q = round-half-even(W/s)."""
    levels = 2 ** (bits - 1) - 1
    w64 = w.astype(np.float64)
    if axis is None:
        s = np.float64(np.abs(w64).max() / levels)
        return np.clip(np.rint(w64 / np.float32(s)), -levels, levels), np.float32(s)
    moved = np.moveaxis(w64, axis, 0).reshape(w.shape[axis], -1)
    s = (np.abs(moved).max(axis=1) / levels).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip(np.rint(w64 / s.reshape(shape)), -levels, levels), s


# =========================================================================== 1. numerics
@pytest.mark.parametrize("bits", [8, 6, 4, 2])
@pytest.mark.parametrize("axis", [0, 1])
def test_weight_per_channel_codes_scales_and_error_match_reference_and_ort(bits: int, axis: int) -> None:
    w = weights(6, 5, 3, 3) if axis == 0 else weights(7, 6)  # a Conv weight (axis 0), a Gemm B [K, N] (axis 1)
    w.flat[:3] = 0.0  # exact zeros stay zero
    codes, scales = quantize_weight(w, bits, axis)
    levels = 2 ** (bits - 1) - 1

    assert codes.dtype == np.int8 and scales.dtype == np.float32
    assert scales.shape == (w.shape[axis],)
    assert np.abs(codes.astype(int)).max() <= levels
    # every slice reaches ±levels exactly once its maximum is mapped (symmetric, full range)
    reach = np.moveaxis(np.abs(codes.astype(int)), axis, 0).reshape(w.shape[axis], -1).max(axis=1)
    assert np.all(reach == levels)
    ref_codes, ref_scales = reference_weight_codes(w, bits, axis)
    np.testing.assert_allclose(scales, ref_scales, rtol=1e-7)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(weight_scales(w, bits, axis), scales)

    dequantized = dequantize_weight(codes, scales, axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    error = np.abs(dequantized.astype(np.float64) - w)
    assert np.all(error <= scales.reshape(shape) / 2 * (1 + 1e-5))
    assert np.all(dequantized.flat[:3] == 0.0)

    # ORT's own per-axis QuantizeLinear (int8, zero point 0) gives the same codes and values
    ort = run(qdq_model(list(w.shape), scales, np.zeros(scales.shape, np.int8), axis), {"x": w})
    np.testing.assert_array_equal(ort["q"], codes)
    np.testing.assert_array_equal(ort["y"], dequantized)


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_per_tensor_uses_one_scale(bits: int) -> None:
    w = weights(4, 3, 3, 3)
    w[1] *= 10.0  # one dominant channel: per-tensor must use its max for everything
    codes, scale = quantize_weight(w, bits, None)
    levels = 2 ** (bits - 1) - 1
    assert np.ndim(scale) == 0
    assert scale == pytest.approx(np.abs(w).max() / levels, rel=1e-6)
    ref_codes, _ = reference_weight_codes(w, bits, None)
    np.testing.assert_array_equal(codes, ref_codes)
    assert np.abs(dequantize_weight(codes, scale, None) - w).max() <= scale / 2 * (1 + 1e-5)
    ort = run(qdq_model(list(w.shape), scale, np.array(0, np.int8)), {"x": w})
    np.testing.assert_array_equal(ort["q"], codes)
    # the small channels lose resolution compared with per-channel quantization
    per_channel_error = np.abs(dequantize_weight(*quantize_weight(w, bits, 0), 0) - w)[0].max()
    assert np.abs(dequantize_weight(codes, scale, None) - w)[0].max() > per_channel_error


def test_weight_all_zero_channel_gets_a_valid_scale() -> None:
    w = weights(3, 4, 1, 1)
    w[2] = 0.0
    codes, scales = quantize_weight(w, 8, 0)
    assert scales[2] > 0 and np.all(np.isfinite(scales))
    assert np.all(codes[2] == 0)
    ort = run(qdq_model(list(w.shape), scales, np.zeros(3, np.int8), 0), {"x": w})
    np.testing.assert_array_equal(ort["y"], dequantize_weight(codes, scales, 0))


def half_way_values(scale: np.float32, codes: range) -> np.ndarray:
    """x = (k + 0.5)·S exactly representable (S a power of two): ties of the rounding."""
    return np.array([(k + 0.5) * float(scale) for k in codes], np.float32)


def test_activation_unsigned_matches_ort_exactly_including_ties() -> None:
    quant = activation_quant(0.0, 63.75, 8)  # S = 63.75/255 = 0.25, a power of two
    assert (quant.scale, quant.signed, quant.zero_point, quant.dtype) == (np.float32(0.25), False, 0, np.uint8)
    ties = half_way_values(quant.scale, range(-3, 258))
    x = np.concatenate([RNG.uniform(-5, 70, 4000).astype(np.float32), ties])
    ort = run(qdq_model([x.size], np.float32(quant.scale), np.array(quant.zero_point, np.uint8)), {"x": x})
    reference = fake_quantize(x, quant)
    np.testing.assert_array_equal(ort["y"], reference)
    # independent restatement: round half to even, clip to [0, 255]
    np.testing.assert_array_equal(reference, np.clip(np.rint(x.astype(np.float64) / 0.25), 0, 255) * 0.25)
    assert fake_quantize(np.array([0.125, 0.375, 0.625], np.float32), quant).tolist() == [0.0, 0.5, 0.5]  # ties to even


def test_activation_signed_matches_ort_exactly_in_range_including_ties() -> None:
    quant = activation_quant(-20.0, 31.75, 8)  # bound 31.75 → S = 31.75/127 = 0.25
    assert (quant.scale, quant.signed, quant.zero_point, quant.dtype) == (np.float32(0.25), True, 128, np.uint8)
    ties = half_way_values(quant.scale, range(-127, 127))
    x = np.concatenate([RNG.uniform(-31.75, 31.75, 4000).astype(np.float32), ties, np.array([31.75, 40.0, -31.75], np.float32)])
    ort = run(qdq_model([x.size], np.float32(quant.scale), np.array(quant.zero_point, np.uint8)), {"x": x})
    np.testing.assert_array_equal(ort["y"], fake_quantize(x, quant))
    np.testing.assert_array_equal(ort["q"].astype(int) - 128, np.clip(np.rint(x / 0.25), -127, 127))
    assert fake_quantize(np.array([-0.125, -0.375], np.float32), quant).tolist() == [0.0, -0.5]


def test_activation_signed_below_range_matches_ort() -> None:
    """Regression (fixed in 13b60a6): fake_quantize clipped signed 8-bit codes at −127 while the
    emitted uint8 Q/DQ with zero point 128 saturates at code 0 = −128."""
    quant = activation_quant(-1.0, 1.0, 8)
    x = np.linspace(-1.2, 1.2, 1001).astype(np.float32)
    ort = run(qdq_model([x.size], np.float32(quant.scale), np.array(quant.zero_point, np.uint8)), {"x": x})
    np.testing.assert_array_equal(ort["y"], fake_quantize(x, quant))
    assert ort["y"].min() == pytest.approx(-128 * float(quant.scale))


@pytest.mark.parametrize("signed", [False, True])
def test_restricted_activation_emits_clip_that_matches_reference(signed: bool) -> None:
    """4-bit activations: emit.quantize_activation adds a Clip to the b-bit range before the
    8-bit QuantizeLinear; the emitted graph equals fake_quantize (ties included)."""
    quant = activation_quant(-1.75, 1.75, 4) if signed else activation_quant(0.0, 3.75, 4)  # S = 1.75/7 = 3.75/15 = 0.25
    assert quant.scale == np.float32(0.25)
    assert quant.restricted and quant.max_code == (7 if signed else 15)
    x = gs.Variable("x", dtype=np.float32, shape=[2000])
    y = gs.Variable("y", dtype=np.float32, shape=[2000])
    graph = gs.Graph(nodes=[], inputs=[x], outputs=[], opset=17)
    mid = gs.Variable("mid", dtype=np.float32, shape=[2000])
    graph.nodes.append(gs.Node("Identity", "first", inputs=[x], outputs=[mid]))
    graph.nodes.append(gs.Node("Identity", "reader", inputs=[mid], outputs=[y]))
    graph.outputs = [y]
    quantize_activation(graph, mid, quant, NameFactory(graph))
    proto = gs.export_onnx(cleanup(graph))
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node].count("Clip") == 1
    assert nodes(proto, "QuantizeLinear")[0].input[0] == nodes(proto, "Clip")[0].output[0]
    ties = half_way_values(quant.scale, range(-20, 20))
    data = np.concatenate([RNG.uniform(-6, 6, 2000 - ties.size - 3), ties, [-1.75, 3.75, 100.0]]).astype(np.float32)
    out = run(proto, {"x": data})["y"]
    np.testing.assert_array_equal(out, fake_quantize(data, quant))
    codes = np.rint(out / 0.25)
    assert codes.max() == quant.max_code and codes.min() == (-7 if signed else 0)


def test_bias_codes_are_int32_with_scale_input_times_weight_scale() -> None:
    bias = RNG.normal(0, 3, 6).astype(np.float32)
    bias[0] = 1e6  # 1e6 / (1e-3·1e-2) = 1e11 > 2^31 − 1: saturates instead of wrapping
    input_scale = np.float32(1e-3)
    w_scales = RNG.uniform(1e-2, 5e-2, 6).astype(np.float32)
    w_scales[0] = 1e-2
    codes, scales = bias_codes(bias, input_scale, w_scales)
    assert codes.dtype == np.int32 and scales.dtype == np.float32
    np.testing.assert_array_equal(scales, input_scale * w_scales)
    assert codes[0] == np.iinfo(np.int32).max
    np.testing.assert_array_equal(codes[1:], np.rint(bias[1:].astype(np.float64) / scales[1:]).astype(np.int32))
    assert np.all(np.abs(codes[1:] * scales[1:].astype(np.float64) - bias[1:]) <= scales[1:] / 2 * (1 + 1e-6))
    ort = run(qdq_model([6], scales, np.zeros(6, np.int32), 0, dequantize_only=True), {"q": codes})
    np.testing.assert_allclose(ort["y"][1:], bias[1:], atol=float(scales.max()))


# =========================================================================== 2. SPIQ exactness
def conv_chain() -> tuple[onnx.ModelProto, str]:
    arrays = {"w1": weights(8, 3, 3, 3), "b1": weights(8), "w2": weights(5, 8, 3, 3), "b2": weights(5), **bn_params("bn", 8)}
    body = ["c = Conv <pads = [1,1,1,1]> (x, w1, b1)", bn("bn", "c", "z"), "r = Relu(z)", "y = Conv <pads = [1,1,1,1]> (r, w2, b2)"]
    return model("(float[2,3,8,8] x) => (float[2,5,8,8] y)", body, arrays), "r"


def gemm_chain() -> tuple[onnx.ModelProto, str]:
    arrays = {"w1": weights(16, 8), "b1": weights(8), "w2": weights(5, 8), "b2": weights(5), **bn_params("bn", 8)}
    body = ["c = Gemm(x, w1, b1)", bn("bn", "c", "z"), "r = Relu(z)", "y = Gemm <transB = 1> (r, w2, b2)"]
    return model("(float[4,16] x) => (float[4,5] y)", body, arrays), "r"


def depthwise_reader() -> tuple[onnx.ModelProto, str]:
    arrays = {"w1": weights(8, 3, 1, 1), "w2": weights(8, 1, 3, 3), "b2": weights(8), **bn_params("bn", 8)}
    body = ["c = Conv(x, w1)", bn("bn", "c", "z"), "r = Relu(z)", "y = Conv <group = 8, pads = [1,1,1,1]> (r, w2, b2)"]
    return model("(float[2,3,6,6] x) => (float[2,8,6,6] y)", body, arrays), "r"


def relu6_chain() -> tuple[onnx.ModelProto, str]:
    """Conv→BN→Clip(0,6)→MaxPool→Conv with small BN scales: the clip's input stays below 6."""
    arrays = {
        "w1": weights(8, 3, 3, 3, scale=0.1),
        "b1": weights(8, scale=0.1),
        "w2": weights(4, 8, 1, 1),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
        **bn_params("bn", 8, gamma=(0.2, 0.6), beta=(1.0, 0.5)),
    }
    body = ["c = Conv <pads = [1,1,1,1]> (x, w1, b1)", bn("bn", "c", "z"), "r6 = Clip(z, lo, hi)", "p = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r6)", "y = Conv(p, w2)"]
    return model("(float[2,3,8,8] x) => (float[2,4,4,4] y)", body, arrays), "p"


def pooled_gemm() -> tuple[onnx.ModelProto, str]:
    """Conv→BN→Relu→GlobalAveragePool→Flatten→Gemm (SPIQ through pooling and a channel Flatten)."""
    arrays = {"w1": weights(8, 3, 3, 3), "w2": weights(8, 5), "b2": weights(5), **bn_params("bn", 8)}
    body = ["c = Conv <pads = [1,1,1,1]> (x, w1)", bn("bn", "c", "z"), "r = Relu(z)", "a = GlobalAveragePool(r)", "f = Flatten(a)", "y = Gemm(f, w2, b2)"]
    return model("(float[2,3,6,6] x) => (float[2,5] y)", body, arrays), "f"


def folded_graph(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, gs.Graph]:
    """BN folded (the producer becomes a plain layer), imported for the SPIQ functions."""
    folded, _ = run_passes(proto, "fold-batchnorm")
    assert ops(folded)["BatchNormalization"] == 0
    return folded, import_graph(with_inferred_shapes(folded))


def layer_readers(tensor: gs.Tensor) -> list[gs.Node]:
    return [n for n in tensor.outputs if n.op in LAYER_OPS]


@pytest.mark.parametrize("builder", [conv_chain, gemm_chain, depthwise_reader, relu6_chain, pooled_gemm])
def test_spiq_rewrite_is_exact_before_rounding(builder) -> None:
    proto, tensor_name = builder()
    feeds = {i.name: RNG.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in proto.graph.input}
    if builder is relu6_chain:
        assert intermediate(proto, "z", feeds).max() < 6.0, "precondition: the ReLU6 clip must be inactive on the data"
    folded, graph = folded_graph(proto)
    tensor = graph.tensors()[tensor_name]
    readers = layer_readers(tensor)
    plan = spiq.plan(graph, tensor, readers)
    assert isinstance(plan, spiq.SpiqPlan), plan
    assert plan.producer.outputs[0].name == "c"
    w_producer = np.array(plan.producer.inputs[1].values, np.float64)
    w_readers = [np.array(r.inputs[1].values, np.float64) for r in readers]
    channels = w_producer.shape[1] if plan.producer.op == "Gemm" else w_producer.shape[0]
    ratio = RNG.uniform(0.05, 1.0, channels)

    spiq.apply(graph, plan, ratio, readers, NameFactory(graph))
    rewritten = export_model(cleanup(graph), folded)
    onnx.checker.check_model(rewritten, full_check=True)

    # what was rewritten: producer output channels ÷ r, readers' input channels × r
    new_producer = np.array(plan.producer.inputs[1].values, np.float64)
    if plan.producer.op == "Gemm":
        np.testing.assert_allclose(new_producer, w_producer / ratio[None, :], rtol=1e-6)
    else:
        np.testing.assert_allclose(new_producer, w_producer / ratio.reshape(-1, 1, 1, 1), rtol=1e-6)
    for reader, old in zip(readers, w_readers):
        new = np.array(reader.inputs[1].values, np.float64)
        if reader.op == "Gemm":
            factor = ratio[None, :] if reader.attrs.get("transB", 0) else ratio[:, None]
        elif int(reader.attrs.get("group", 1)) > 1:
            factor = ratio.reshape(-1, 1, 1, 1)  # depthwise: input channel c is weight row c
        else:
            factor = ratio.reshape(1, -1, 1, 1)
        np.testing.assert_allclose(new, old * factor, rtol=1e-6)
    if builder is relu6_chain:
        assert ops(rewritten)["Clip"] == 0 and ops(rewritten)["Relu"] == 1
        assert plan.clip_high == 6.0
    # the intermediate tensor really is rescaled (otherwise the test could not fail)
    assert not np.allclose(intermediate(rewritten, tensor_name, feeds), intermediate(folded, tensor_name, feeds), rtol=1e-3)

    result = verify(proto, rewritten, inputs=feeds, rtol=1e-5, atol=1e-6)
    assert result.passed, result.failures


def fallback_graphs() -> dict[str, tuple[onnx.ModelProto, str, str]]:
    """name → (model, tensor, expected reason fragment)."""
    c8 = {"w1": weights(8, 3, 1, 1), "w2": weights(8, 8, 1, 1), "w3": weights(4, 8, 1, 1)}
    return {
        "graph input": (model("(float[1,3,4,4] x) => (float[1,8,4,4] y)", ["y = Conv(x, w1)"], {"w1": c8["w1"]}), "x", "graph input"),
        "read by Add": (
            model(
                "(float[1,3,4,4] x) => (float[1,8,4,4] y, float[1,8,4,4] s)",
                ["c = Conv(x, w1)", "r = Relu(c)", "y = Conv(r, w2)", "s = Add(r, y)"],
                {"w1": c8["w1"], "w2": c8["w2"]},
            ),
            "r",
            "also read by Add",
        ),
        "producer is Add": (
            model(
                "(float[1,3,4,4] x) => (float[1,4,4,4] y)",
                ["c = Conv(x, w1)", "d = Conv(c, w2)", "s = Add(c, d)", "r = Relu(s)", "y = Conv(r, w3)"],
                c8,
            ),
            "r",
            "Add",
        ),
        "graph output": (
            model("(float[1,3,4,4] x) => (float[1,8,4,4] r, float[1,8,4,4] y)", ["c = Conv(x, w1)", "r = Relu(c)", "y = Conv(r, w2)"], {"w1": c8["w1"], "w2": c8["w2"]}),
            "r",
            "graph output",
        ),
        "residual join on the chain": (
            model(
                "(float[1,3,4,4] x) => (float[1,4,2,2] y, float[1,8,4,4] s)",
                ["c = Conv(x, w1)", "r = Relu(c)", "p = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r)", "y = Conv(p, w3)", "s = Add(r, c)"],
                {"w1": c8["w1"], "w3": c8["w3"]},
            ),
            "p",
            "residual join",
        ),
        "ReLU6 then average": (
            model(
                "(float[1,3,4,4] x) => (float[1,4] y)",
                ["c = Conv(x, w1)", "r6 = Clip(c, lo, hi)", "a = GlobalAveragePool(r6)", "f = Flatten(a)", "y = Gemm(f, w5)"],
                {"w1": c8["w1"], "w5": weights(8, 4), "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)},
            ),
            "f",
            "average",
        ),
    }


@pytest.mark.parametrize("case", list(fallback_graphs()))
def test_spiq_plan_refuses_with_a_reason_and_leaves_the_graph_alone(case: str) -> None:
    proto, tensor_name, fragment = fallback_graphs()[case]
    graph = import_graph(with_inferred_shapes(proto))
    before = {n: np.array(t.values) for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    tensor = graph.tensors()[tensor_name]
    reason = spiq.plan(graph, tensor, layer_readers(tensor))
    assert isinstance(reason, str), reason
    assert fragment in reason
    after = export_model(cleanup(graph), proto)
    assert ops(after) == ops(proto)
    for name, values in inits(after).items():
        np.testing.assert_array_equal(values, before[name])
    result = verify(proto, after, rtol=1e-6, atol=0)
    assert result.passed


def test_spiq_plan_refuses_a_bn_producer() -> None:
    """A BN that was not folded stays in the way: its output's scales are not folded."""
    proto, _ = conv_chain()
    graph = import_graph(with_inferred_shapes(proto))
    tensor = graph.tensors()["r"]
    reason = spiq.plan(graph, tensor, layer_readers(tensor))
    assert isinstance(reason, str) and "BatchNormalization" in reason


def test_spiq_ratios_normalize_by_the_largest_step_and_floor() -> None:
    step = np.array([0.5, 2.0, 1.0, 0.0])
    ratio, top = spiq.ratios(step)
    assert top == 2.0
    np.testing.assert_array_equal(ratio, [0.25, 1.0, 0.5, spiq.MIN_RATIO])


# =========================================================================== 3. end-to-end
def residual_model() -> onnx.ModelProto:
    """x → Conv1 → BN → Relu = a;  a → Conv2 → BN → Relu = b;  s = a + b;
    s → Conv3 → BN → Relu = c;  c → Conv4 → y.  Four layers: Conv1 reads the graph input,
    Conv2 reads a tensor also read by the residual Add, Conv3 reads the Add, Conv4 is SPIQ-able."""
    arrays = {
        "w1": weights(8, 3, 3, 3), "w2": weights(8, 8, 3, 3), "w3": weights(8, 8, 1, 1), "w4": weights(4, 8, 1, 1), "b4": weights(4),
        **bn_params("bn1", 8), **bn_params("bn2", 8), **bn_params("bn3", 8),
    }
    body = [
        "c1 = Conv <pads = [1,1,1,1]> (x, w1)", bn("bn1", "c1", "z1"), "a = Relu(z1)",
        "c2 = Conv <pads = [1,1,1,1]> (a, w2)", bn("bn2", "c2", "z2"), "b = Relu(z2)",
        "s = Add(a, b)",
        "c3 = Conv(s, w3)", bn("bn3", "c3", "z3"), "c = Relu(z3)",
        "y = Conv(c, w4, b4)",
    ]
    return model("(float[N,3,8,8] x) => (float[N,4,8,8] y)", body, arrays)


def test_quantize_emits_qdq_with_the_expected_dtypes_and_reports_refusals() -> None:
    feeds = {"x": RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    proto = with_data_statistics(residual_model(), feeds)
    optimized, report = run_passes(proto, *QUANTIZE)
    stats, refusals = quantize_stats(report)

    assert ops(optimized)["BatchNormalization"] == 0
    assert stats["layers_quantized"] == 3 and stats["layers_float"] == 1
    assert stats["spiq_coverage"] == pytest.approx(1 / 3, abs=1e-3)
    modes = {r["input"]: r["mode"] for r in stats["layers"]}
    assert modes == {"a": "per-tensor", "s": "per-tensor", "c": "spiq"}
    reasons = " | ".join(f"{r['subject']}: {r['reason']}" for r in refusals)
    assert "no statistics for its input x" in reasons
    assert "also read by Add" in reasons  # a: residual join
    assert "Add" in next(r["reason"] for r in refusals if r["subject"] == "SPIQ on s")

    init = inits(optimized)
    conv = {n.output[0]: n for n in nodes(optimized, "Conv")}
    assert conv["c1"].input[1] == "w1"  # the first layer stayed float
    for name in ("c2", "c3", "y"):
        p = layer_params(optimized, name)
        assert p["x_zero"].dtype == np.uint8 and int(p["x_zero"]) == 0  # after ReLU: unsigned, zero point 0
        assert p["x_scale"].ndim == 0  # per-tensor activation scale
        assert p["w_codes"].dtype == np.int8 and p["w_axis"] == 0 and p["w_scale"].shape == (p["w_codes"].shape[0],)
        assert p["w_zero"].dtype == np.int8 and np.all(p["w_zero"] == 0)
        assert np.abs(p["w_codes"].astype(int)).max() == 127
        # folded BN shift became a bias: int32 with scale S_x · s_w per output channel, zero point 0
        assert p["b_codes"].dtype == np.int32 and p["b_zero"].dtype == np.int32 and np.all(p["b_zero"] == 0)
        np.testing.assert_allclose(p["b_scale"], p["x_scale"] * p["w_scale"], rtol=1e-6)
    # no float weight initializer left for the quantized layers
    assert not {"w2", "w3", "w4"} & set(init)
    # every layer output that another layer reads carries a Q→DQ (the pass quantizes the
    # output of each quantized layer too, so ORT can fuse it): b (Conv2's output chain end)
    q_inputs = {n.input[0] for n in nodes(optimized, "QuantizeLinear")}
    assert {"a", "b", "s", "c"} <= q_inputs
    assert stats["outputs_quantized"] == 1

    # BN statistics = the data's moments: W8A8 stays close on that data.  Bound: each of the
    # 3 quantized inputs and 1 output has a step of max(β+9|γ|)/255 (the Add's range is the sum
    # of its branches'), i.e. ~1 % RMS noise each; measured 1.5–4 % over 8 seeds.
    reference, quantized = run(proto, feeds)["y"], run(optimized, feeds)["y"]
    assert cosine(quantized, reference) > 0.998
    assert relative_error(quantized, reference) < 0.06


def test_input_range_quantizes_the_first_layer_with_a_signed_quantizer() -> None:
    feeds = {"x": np.clip(RNG.standard_normal((16, 3, 8, 8)), -3, 3).astype(np.float32)}
    proto = with_data_statistics(residual_model(), feeds)
    optimized, report = run_passes(proto, *QUANTIZE, input_range=(-3.0, 3.0))
    stats, refusals = quantize_stats(report)
    assert stats["layers_quantized"] == 4 and stats["layers_float"] == 0
    assert stats["spiq_coverage"] == pytest.approx(1 / 4, abs=1e-3)
    assert any(r["subject"] == "SPIQ on x" and "graph input" in r["reason"] for r in refusals)
    init = inits(optimized)
    (q_x,) = [n for n in nodes(optimized, "QuantizeLinear") if n.input[0] == "x"]
    assert init[q_x.input[2]].dtype == np.uint8 and int(init[q_x.input[2]]) == 128  # signed: zero point 2^{b-1}
    assert float(init[q_x.input[1]]) == pytest.approx(3.0 / 127, rel=1e-6)
    assert layer_params(optimized, "c1")["x_scale"] == init[q_x.input[1]]
    reference, quantized = run(proto, feeds)["y"], run(optimized, feeds)["y"]
    assert cosine(quantized, reference) > 0.999


# --- a 1x1 chain whose BN statistics are exactly those of the data
C, K, HW = 8, 6, 4
EPS = 1e-5


class BnChain:
    """x → Conv1 (1x1, invertible) → BN → Relu = r → Conv2 (1x1) → y.

    Inputs are drawn so that Conv1's output is N(μ, v) per channel exactly: the BN output then
    is N(β, γ²) — the statistics the pass derives its ranges and its bias correction from."""

    def __init__(self, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.w1 = (rng.standard_normal((C, C)) + 2 * np.eye(C)).astype(np.float32)
        self.b1 = rng.normal(0, 1, C).astype(np.float32)
        self.mean = rng.normal(0, 1, C).astype(np.float32)
        self.var = rng.uniform(0.5, 2, C).astype(np.float32)
        self.gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
        self.beta = rng.normal(0.5, 1, C).astype(np.float32)
        self.w2 = (rng.standard_normal((K, C)) * 0.5).astype(np.float32)
        self.b2 = rng.normal(0, 1, K).astype(np.float32)
        arrays = {
            "w1": self.w1.reshape(C, C, 1, 1), "b1": self.b1, "bn_g": self.gamma, "bn_b": self.beta, "bn_m": self.mean,
            "bn_v": self.var, "w2": self.w2.reshape(K, C, 1, 1), "b2": self.b2,
        }
        body = ["c = Conv(x, w1, b1)", bn("bn", "c", "z"), "r = Relu(z)", "y = Conv(r, w2, b2)"]
        self.model = model(f"(float[N,{C},{HW},{HW}] x) => (float[N,{K},{HW},{HW}] y)", body, arrays)

    def draw(self, n: int) -> np.ndarray:
        c = self.mean[None, :, None, None] + np.sqrt(self.var)[None, :, None, None] * self.rng.standard_normal((n, C, HW, HW))
        x = np.einsum("ij,njhw->nihw", np.linalg.inv(self.w1.astype(np.float64)), c - self.b1[None, :, None, None])
        return x.astype(np.float32)

    def relu_input(self, x: np.ndarray) -> np.ndarray:
        c = np.einsum("ij,njhw->nihw", self.w1.astype(np.float64), x.astype(np.float64)) + self.b1[None, :, None, None]
        s = self.gamma.astype(np.float64) / np.sqrt(self.var.astype(np.float64) + EPS)
        return s[None, :, None, None] * (c - self.mean[None, :, None, None]) + self.beta[None, :, None, None]

    def reference(self, x: np.ndarray, *, spiq_on: bool, bits: int = 8, lam: float = 9.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.float32]:
        """Independent numpy fake-quant of docs/quantization.md (output, weight codes, bias codes, S)."""
        r = np.maximum(self.relu_input(x), 0.0)
        hi = np.maximum(self.beta + lam * np.abs(self.gamma), 0.0).astype(np.float64)  # range [β ± λ|γ|] after ReLU
        g = np.abs(self.gamma.astype(np.float64))
        mu = self.beta * norm.cdf(self.beta / g) + g * norm.pdf(self.beta / g)  # E[ReLU(N(β, γ²))]
        if spiq_on:
            step = hi / 255
            top = step.max()
            ratio = np.maximum(step / top, 1e-3)
        else:
            top, ratio = hi.max() / 255, np.ones(C)
        scale = np.float32(top)
        w2 = (self.w2.astype(np.float64) * ratio[None, :]).astype(np.float32)  # columns × r
        levels = 2 ** (bits - 1) - 1
        sw = (np.abs(w2).max(axis=1) / levels).astype(np.float32)
        codes = np.clip(np.rint(w2 / sw[:, None]), -levels, levels)
        w2_hat = codes * sw[:, None]
        bias = self.b2.astype(np.float64) + (w2.astype(np.float64) - w2_hat) @ (mu / ratio)  # eq. 3.8
        bias_scale = (scale * sw).astype(np.float32)
        bias_codes_ = np.rint(bias / bias_scale)
        a = np.clip(np.rint((r / ratio[None, :, None, None]).astype(np.float32) / scale), 0, 255) * scale
        y = np.einsum("kc,nchw->nkhw", w2_hat, a) + (bias_codes_ * bias_scale)[None, :, None, None]
        return y, codes, bias_codes_, scale


@pytest.fixture(scope="module")
def chain() -> BnChain:
    return BnChain()


@pytest.mark.parametrize("spiq_on", [True, False], ids=["spiq", "per-tensor"])
def test_quantized_model_equals_an_independent_fake_quant_reference(chain: BnChain, spiq_on: bool) -> None:
    optimized, report = run_passes(chain.model, *QUANTIZE, spiq=spiq_on)
    stats, _ = quantize_stats(report)
    assert stats["layers_quantized"] == 1 and stats["spiq_coverage"] == (1.0 if spiq_on else 0.0)
    x = chain.draw(64)
    expected, codes, bias_q, scale = chain.reference(x, spiq_on=spiq_on)
    p = layer_params(optimized, "y")
    assert float(p["x_scale"]) == pytest.approx(float(scale), rel=1e-6)
    np.testing.assert_array_equal(p["w_codes"][:, :, 0, 0], codes)
    assert np.abs(p["b_codes"].astype(np.int64) - bias_q).max() <= 1
    got = run(optimized, {"x": x})["y"].astype(np.float64)
    diff = np.abs(got - expected)
    # at most a rare one-code flip where float32 and float64 round a tie differently
    assert np.mean(diff > 1e-4) < 0.005
    assert diff.max() <= 2 * float(scale) * float(np.abs(chain.w2).max())


@pytest.mark.parametrize("preset", [False, True], ids=["passes", "preset"])
def test_w8a8_is_close_to_fp32_and_fewer_weight_bits_are_worse(chain: BnChain, preset: bool) -> None:
    x = chain.draw(128)
    reference = run(chain.model, {"x": x})["y"]
    errors = {}
    for bits in (8, 4, 2):
        if preset:
            optimized, report = onnxopt.optimize(chain.model, preset="quantize", validate=True, weight_bits=bits, first_last_bits=None)
        else:
            optimized, report = run_passes(chain.model, *QUANTIZE, weight_bits=bits, first_last_bits=None)
        assert quantize_stats(report)[0]["layers_quantized"] == 1
        got = run(optimized, {"x": x})["y"]
        errors[bits] = relative_error(got, reference)
        if bits == 8:
            # W8A8 bound: activation step S = max(β+9|γ|)/255 gives an RMS error S/√12 per input,
            # the weights ~0.4 % more: about 1 % of the output norm (measured 0.5–1.0 % over seeds).
            assert cosine(got, reference) > 0.9998
            assert errors[8] < 0.02
    assert errors[8] < errors[4] < errors[2], errors
    assert errors[4] > 2 * errors[8]


def test_act_bits_4_clips_to_16_levels(chain: BnChain) -> None:
    optimized, _ = run_passes(chain.model, *QUANTIZE, act_bits=4, weight_bits=8)
    assert ops(optimized)["Clip"] == 1
    (clip,) = nodes(optimized, "Clip")
    init = inits(optimized)
    (q_r,) = nodes(optimized, "QuantizeLinear")
    scale = float(init[q_r.input[1]])
    assert q_r.input[0] == clip.output[0]
    assert float(init[clip.input[2]]) == pytest.approx(15 * scale, rel=1e-6)
    # λ = 4 at ≤ 6 bits: S = max(β + 4|γ|)/15
    assert scale == pytest.approx(float(np.maximum(chain.beta + 4 * chain.gamma, 0).max()) / 15, rel=1e-5)
    x = chain.draw(32)
    (dq_r,) = [n for n in nodes(optimized, "DequantizeLinear") if n.input[0] == q_r.output[0]]
    codes = np.rint(intermediate(optimized, dq_r.output[0], {"x": x}) / scale)
    assert codes.min() >= 0 and codes.max() <= 15 and np.unique(codes).size <= 16
    reference, got = run(chain.model, {"x": x})["y"], run(optimized, {"x": x})["y"]
    assert 0.01 < relative_error(got, reference) < 0.2  # visibly coarser than W8A8, still the same function


# =========================================================================== 4. bias correction
@pytest.mark.parametrize("spiq_on", [True, False], ids=["spiq", "per-tensor"])
def test_bias_correction_removes_the_mean_output_shift(chain: BnChain, spiq_on: bool) -> None:
    x = chain.draw(512)  # 8192 positions per channel, drawn from the BN statistics' distribution
    reference = run(chain.model, {"x": x})["y"].astype(np.float64)
    shift = {}
    for corrected in (True, False):
        optimized, _ = run_passes(chain.model, *QUANTIZE, weight_bits=4, spiq=spiq_on, bias_correction=corrected, first_last_bits=None)
        got = run(optimized, {"x": x})["y"].astype(np.float64)
        shift[corrected] = (got - reference).mean(axis=(0, 2, 3))  # per output channel
        assert layer_params(optimized, "y")["b_codes"].dtype == np.int32
    # without correction the shift is the weights' (W − Ŵ)·E[X]: clearly visible at 4 bits
    assert np.abs(shift[False]).max() > 0.05
    assert np.abs(shift[True]).max() < 0.1 * np.abs(shift[False]).max(), shift
    assert np.linalg.norm(shift[True]) < np.linalg.norm(shift[False])


def test_uncorrected_shift_is_the_predicted_weight_error_times_the_mean(chain: BnChain) -> None:
    """The mean shift bias correction removes is (W − Ŵ)·E[ReLU(N(β, γ²))] (eq. 3.8)."""
    x = chain.draw(512)
    optimized, _ = run_passes(chain.model, *QUANTIZE, weight_bits=4, spiq=False, bias_correction=False, first_last_bits=None)
    p = layer_params(optimized, "y")
    w_hat = p["w_codes"][:, :, 0, 0] * p["w_scale"][:, None].astype(np.float64)
    g = np.abs(chain.gamma.astype(np.float64))
    mu = chain.beta * norm.cdf(chain.beta / g) + g * norm.pdf(chain.beta / g)
    predicted = (w_hat - chain.w2) @ mu
    measured = (run(optimized, {"x": x})["y"].astype(np.float64) - run(chain.model, {"x": x})["y"]).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(measured, predicted, atol=0.1 * np.abs(predicted).max())


# =========================================================================== 5. bad inputs
def plain_model(batch: str = "N") -> onnx.ModelProto:
    """Conv → Relu → Conv without any BatchNormalization."""
    arrays = {"w1": weights(8, 3, 3, 3), "b1": weights(8), "w2": weights(4, 8, 1, 1), "b2": weights(4)}
    body = ["c = Conv <pads = [1,1,1,1]> (x, w1, b1)", "r = Relu(c)", "y = Conv(r, w2, b2)"]
    return model(f"(float[{batch},3,8,8] x) => (float[{batch},4,8,8] y)", body, arrays)


def test_no_statistics_and_no_calibration_data_is_an_error() -> None:
    with pytest.raises(PipelineError) as info:
        run_passes(plain_model(), *QUANTIZE)
    message = str(info.value)
    assert "calibration" in message and "BatchNormalization" in message


def test_no_statistics_but_an_input_range_quantizes_only_the_first_layer() -> None:
    proto = plain_model()
    optimized, report = run_passes(proto, *QUANTIZE, input_range=(-4.0, 4.0))
    stats, refusals = quantize_stats(report)
    assert stats["layers_quantized"] == 1 and stats["layers_float"] == 1
    assert any("no statistics for its input r" in r["reason"] for r in refusals)
    feeds = {"x": np.clip(RNG.standard_normal((2, 3, 8, 8)), -4, 4).astype(np.float32)}
    assert cosine(run(optimized, feeds)["y"], run(proto, feeds)["y"]) > 0.999


@pytest.mark.parametrize("mode", ["minmax", "percentile"])
def test_calibration_mode_without_data_is_an_error(mode: str) -> None:
    with pytest.raises(PipelineError, match="calibration"):
        run_passes(plain_model(), *QUANTIZE, act_ranges=mode)


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"weight_bits": 9}, "weight_bits"),
        ({"weight_bits": 1}, "weight_bits"),
        ({"act_bits": 16}, "act_bits"),
        ({"act_ranges": "kl"}, "act_ranges"),
        ({"add_range": "bogus"}, "add_range"),
        ({"input_range": (3.0, -3.0)}, "input_range"),
        ({"input_range": 3.0}, "input_range"),
        ({"lam": -9.0}, "lam"),
        ({"lam": 0}, "lam"),
        ({"lam": float("inf")}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"input_range": (float("-inf"), float("inf"))}, "input_range"),
        ({"input_range": (float("nan"), 3.0)}, "input_range"),
        ({"first_last_bits": 9}, "first_last_bits"),
        ({"calibration_data": "x.npz"}, "calibration_data"),
    ],
)
def test_bad_options_are_pipeline_errors(options: dict, fragment: str) -> None:
    proto = BnChain().model
    with pytest.raises(PipelineError, match=fragment):
        run_passes(proto, *QUANTIZE, **options)
    # the same model quantizes fine with valid options (the error is about the option)
    assert quantize_stats(run_passes(proto, *QUANTIZE)[1])[0]["layers_quantized"] == 1


def test_calibration_file_with_wrong_input_names_is_an_input_data_error(tmp_path: Path) -> None:
    path = tmp_path / "cal.npz"
    np.savez(path, images=RNG.standard_normal((8, 3, 8, 8)).astype(np.float32))
    with pytest.raises(InputDataError) as info:
        run_passes(plain_model(), *QUANTIZE, act_ranges="minmax", calibration_data=str(path))
    message = str(info.value)
    assert "missing ['x']" in message and "unexpected ['images']" in message


def test_calibration_file_with_wrong_shape_is_an_input_data_error(tmp_path: Path) -> None:
    path = tmp_path / "cal.npz"
    np.savez(path, x=RNG.standard_normal((8, 3, 9, 9)).astype(np.float32))
    with pytest.raises(InputDataError) as info:
        run_passes(plain_model(), *QUANTIZE, act_ranges="minmax", calibration_data=str(path))
    message = str(info.value)
    assert "x has shape [8, 3, 9, 9]" in message and "model expects ['N', 3, 8, 8]" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_calibration_file_with_non_finite_values_is_a_verification_error(tmp_path: Path, bad: float) -> None:
    """A NaN/inf sample would give a NaN/inf range and scale: rejected, naming file and input."""
    path = tmp_path / "cal.npz"
    samples = RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)
    samples[5, 1, 2, 3] = bad
    np.savez(path, x=samples)
    with pytest.raises(InputDataError) as info:
        run_passes(plain_model(), *QUANTIZE, act_ranges="minmax", calibration_data=str(path))
    message = str(info.value)
    assert str(path) in message and "input x holds 1 NaN/inf value(s) (first in sample 5)" in message
    assert info.value.exit_code == 11


def test_non_finite_weights_stop_the_pass_instead_of_writing_a_nan_scale() -> None:
    """The emission guard: a weight holding inf gives an inf scale, which is never written."""
    proto = plain_model()
    weight = next(t for t in proto.graph.initializer if t.name == "w1")
    values = numpy_helper.to_array(weight).copy()
    values[1, 0, 0, 0] = np.inf
    weight.CopyFrom(numpy_helper.from_array(values, "w1"))
    with pytest.raises(ValidationError, match=r"quantization scale\(s\) not finite and positive \(e.g. inf\)") as info:
        run_passes(proto, *QUANTIZE, input_range=(-3.0, 3.0))
    assert info.value.exit_code == 8


@pytest.mark.parametrize("scale", [np.nan, np.inf, 0.0, -1.0])
def test_emission_refuses_a_scale_that_is_not_finite_and_positive(scale: float) -> None:
    graph = gs.Graph(inputs=[gs.Variable("x", np.float32, [1, 4])])
    reader = gs.Node("Relu", inputs=[graph.inputs[0]], outputs=[gs.Variable("y", np.float32, [1, 4])])
    graph.nodes.append(reader)
    with pytest.raises(ValidationError, match="activation x: 1 of 1 quantization scale"):
        quantize_activation(graph, graph.inputs[0], ActivationQuant(np.float32(scale), True, 8), NameFactory(graph))
    assert checked_scales(np.array([0.5, 2.0]), "w").dtype == np.float32


# =========================================================================== 6. calibration
@pytest.mark.parametrize("mode", ["minmax", "percentile"])
def test_calibrated_quantization_without_bn(tmp_path: Path, mode: str) -> None:
    proto = plain_model()
    samples = RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "cal.npz"
    np.savez(path, x=samples)
    optimized, report = run_passes(proto, *QUANTIZE, act_ranges=mode, calibration_data=str(path))
    stats, refusals = quantize_stats(report)
    assert stats["layers_quantized"] == 2 and stats["layers_float"] == 0
    assert {r["input"]: r["mode"] for r in stats["layers"]} == {"x": "per-tensor", "r": "spiq"}
    assert any("graph input" in r["reason"] for r in refusals)

    init = inits(optimized)
    q = {n.input[0]: n for n in nodes(optimized, "QuantizeLinear")}
    assert set(q) == {"x", "r"}
    assert int(init[q["x"].input[2]]) == 128 and int(init[q["r"].input[2]]) == 0
    x_scale, r_scale = float(init[q["x"].input[1]]), float(init[q["r"].input[1]])
    bound = float(np.abs(samples).max())
    relu = intermediate(proto, "r", {"x": samples})
    if mode == "minmax":
        # the calibrated ranges are the samples' extremes: x symmetric over 127 codes, r over 255
        assert x_scale == pytest.approx(bound / 127, rel=1e-6)
        assert r_scale == pytest.approx(float(relu.max()) / 255, rel=1e-5)
    else:
        # the 0.01/99.99 percentiles clip the extremes
        assert x_scale < bound / 127 and x_scale > 0.8 * bound / 127
        assert r_scale < float(relu.max()) / 255

    reference, got = run(proto, {"x": samples})["y"], run(optimized, {"x": samples})["y"]
    assert cosine(got, reference) > 0.9995
    assert relative_error(got, reference) < 0.03


# =========================================================================== regressions of bugs found
def test_spiq_keeps_relu6_before_average_pooling_when_the_producer_stays_float() -> None:
    """Regression (fixed in 13b60a6): SPIQ walked through GlobalAveragePool after a Clip(0,6) and
    turned the Clip into a Relu, relying on the reader's quantizer clip — but the clip of an
    average is not the average of clips.  With a float producer (no output quantizer at the old
    Clip) the ReLU6 was lost: relative error 0.26 vs 0.002 per-tensor.  Now SPIQ refuses."""
    arrays = {
        "w1": weights(8, 3, 1, 1, scale=1.0),
        "bn_g": np.full(8, 2.0, np.float32), "bn_b": np.linspace(1, 6, 8).astype(np.float32),
        "bn_m": np.zeros(8, np.float32), "bn_v": np.ones(8, np.float32),
        "w2": weights(8, 5), "b2": weights(5),
        "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32),
    }
    body = ["c = Conv(x, w1)", bn("bn", "c", "z"), "r6 = Clip(z, lo, hi)", "a = GlobalAveragePool(r6)", "f = Flatten(a)", "y = Gemm(f, w2, b2)"]
    proto = model("(float[N,3,4,4] x) => (float[N,5] y)", body, arrays)
    x = RNG.standard_normal((64, 3, 4, 4)).astype(np.float32)
    assert (intermediate(proto, "z", {"x": x}) > 6).mean() > 0.05  # the ReLU6 is active on this data
    reference = run(proto, {"x": x})["y"]
    errors = {}
    for spiq_on in (False, True):
        optimized, report = run_passes(proto, *QUANTIZE, spiq=spiq_on)
        stats, refusals = quantize_stats(report)
        assert stats["layers_quantized"] == 1
        errors[spiq_on] = relative_error(run(optimized, {"x": x})["y"], reference)
        if spiq_on:
            # either the clip survives in the graph or SPIQ was refused for it, with the reason
            assert ops(optimized)["Clip"] == 1 or stats["spiq_coverage"] == 1.0
            if stats["spiq_coverage"] == 0.0:
                assert any("average" in r["reason"] for r in refusals), refusals
    assert errors[False] < 0.01
    assert errors[True] < 0.01, errors


def test_outputs_quantized_counts_only_emitted_quantizers(tmp_path: Path) -> None:
    """Regression (fixed in 13b60a6): a layer output that is only a graph output got a Q→DQ
    nobody read (removed by cleanup) and was still counted in outputs_quantized."""
    proto = plain_model()
    path = tmp_path / "cal.npz"
    samples = RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.savez(path, x=samples)
    optimized, report = run_passes(proto, *QUANTIZE, act_ranges="minmax", calibration_data=str(path))
    stats, _ = quantize_stats(report)
    emitted = {n.input[0] for n in nodes(optimized, "QuantizeLinear")}
    assert emitted == {"x", "r"}  # the layers' inputs; y, a graph output, keeps its float value
    assert cosine(run(optimized, {"x": samples})["y"], run(proto, {"x": samples})["y"]) > 0.999
    assert stats["outputs_quantized"] == len(emitted - {r["input"] for r in stats["layers"]})


def test_fixed_batch_model_accepts_several_calibration_samples(tmp_path: Path) -> None:
    """Regression (fixed in 13b60a6): Quantize._calibrate validated stacked samples against the
    model's fixed [1, …] input, so a batch-1 model could be calibrated on one sample only."""
    proto = plain_model(batch="1")
    samples = RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "cal.npz"
    np.savez(path, x=samples)
    optimized, report = run_passes(proto, *QUANTIZE, act_ranges="minmax", calibration_data=str(path))
    assert quantize_stats(report)[0]["layers_quantized"] == 2
    got = np.concatenate([run(optimized, {"x": samples[i : i + 1]})["y"] for i in range(8)])
    reference = np.concatenate([run(proto, {"x": samples[i : i + 1]})["y"] for i in range(8)])
    assert cosine(got, reference) > 0.9995


@pytest.mark.parametrize("first_last_bits, expected", [(8, [127, 7, 7, 127]), (None, [7, 7, 7, 7])])
def test_first_and_last_layer_keep_8_bit_weights_by_default(first_last_bits, expected) -> None:
    """Common practice at low bit-widths: first and last layer at 8 bits unless told otherwise."""
    rng = np.random.default_rng(3)
    arrays = {"w0": rng.standard_normal((C, C, 1, 1)).astype(np.float32)}
    body = ["c0 = Conv(x, w0)"]
    for i in range(3):
        arrays[f"w{i + 1}"] = rng.standard_normal((C, C, 1, 1)).astype(np.float32)
        arrays |= bn_params(f"bn{i}", C)
        body += [bn(f"bn{i}", f"c{i}", f"z{i}"), f"r{i} = Relu(z{i})", f"c{i + 1} = Conv(r{i}, w{i + 1})"]
    body.append("y = Relu(c3)")
    proto = model(f"(float[N,{C},{HW},{HW}] x) => (float[N,{C},{HW},{HW}] y)", body, arrays)
    optimized, _ = run_passes(proto, *QUANTIZE, weight_bits=4, input_range=(-3.0, 3.0), first_last_bits=first_last_bits)
    codes = {t.name: numpy_helper.to_array(t) for t in optimized.graph.initializer if t.data_type == TensorProto.INT8}
    conv_codes = []
    for node in (n for n in optimized.graph.node if n.op_type == "Conv"):
        dq = next(n for n in optimized.graph.node if n.output[0] == node.input[1])
        conv_codes.append(int(np.abs(codes[dq.input[0]]).max()))
    assert conv_codes == expected


def _gemm_reader(weight: np.ndarray) -> gs.Node:
    graph = gs.Graph()
    x, y = gs.Variable("x", np.float32, (1, weight.shape[1])), gs.Variable("y", np.float32, (1, weight.shape[0]))
    node = gs.Node("Gemm", inputs=[x, gs.Constant("w", weight.astype(np.float32))], outputs=[y], attrs={"transB": 1})
    graph.nodes.append(node)
    return node


def _measured_errors(weight: np.ndarray, spread: np.ndarray, bits: int, n: int = 20000) -> tuple[float, float]:
    """Monte-Carlo output error of a quantized x @ W.T with x ~ N(0, spread²) per channel:
    (SPIQ: per-channel steps, W·r quantized per row; per tensor: one step, W quantized)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n, len(spread))) * spread
    levels = 2 ** (bits - 1) - 1
    steps, step = 4 * spread / levels, 4 * spread.max() / levels  # ±4σ signed ranges
    ratio = steps / steps.max()
    codes, scales = quantize_weight(weight * ratio, 8, 0)
    spiq_weight = dequantize_weight(codes, scales, 0) / ratio
    codes, scales = quantize_weight(weight, 8, 0)
    plain_weight = dequantize_weight(codes, scales, 0)
    exact = x @ weight.T
    spiq_out = (np.clip(np.round(x / steps), -levels, levels) * steps) @ spiq_weight.T
    plain_out = (np.clip(np.round(x / step), -levels, levels) * step) @ plain_weight.T
    return float(np.mean(np.sum((spiq_out - exact) ** 2, 1))), float(np.mean(np.sum((plain_out - exact) ** 2, 1)))


@pytest.mark.parametrize("decades", [0.0, 1.0, 2.0])
def test_spiq_error_estimate_matches_a_monte_carlo_measurement(decades: float) -> None:
    """The data-free estimate used by spiq='auto' predicts the measured errors (±25 %) and
    therefore picks the same winner; with equal ranges both are the same."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((16, 8)).astype(np.float32)
    spread = np.geomspace(10 ** -decades, 1.0, 8) if decades else np.full(8, 0.5)
    reader = _gemm_reader(weight)
    levels = 2**7 - 1
    estimate = spiq.estimated_errors([reader], spread**2, 4 * spread / levels, 4 * spread.max() / levels, 8, True)
    measured = _measured_errors(weight.astype(np.float64), spread, 8)
    np.testing.assert_allclose(estimate, measured, rtol=0.25)
    if decades == 0.0:
        assert estimate[0] == pytest.approx(estimate[1], rel=1e-9)
    else:
        assert (estimate[0] < estimate[1]) == (measured[0] < measured[1])


def test_spiq_auto_records_why_it_kept_a_tensor_per_tensor() -> None:
    """spiq='auto' (the default) either folds the scales or says which estimate won."""
    chain = BnChain()
    _, report = run_passes(chain.model, *QUANTIZE, weight_bits=2, first_last_bits=None)
    reasons = [r.reason for p in report.passes if p.name == "quantize" for r in p.refusals]
    stats = quantize_stats(report)[0]
    chosen = [r for r in reasons if r.startswith("per-tensor chosen: estimated error")]
    assert (stats["spiq_coverage"] > 0) != bool(chosen)


# --------------------------------------------------------------------------- transformer linear layers


def layernorm_linear(with_bias: bool = True) -> onnx.ModelProto:
    """x[B, T, 8] → LayerNormalization(γ, β) → MatMul(W[8, 6]) → Add(bias) (a transformer linear layer;
    a dynamic batch: with a static one ORT does not fuse the static QDQ MatMul and the pass
    re-emits it in the dynamic form, see test_quantize_transformer.py)."""
    gamma = RNG.uniform(0.05, 2.0, 8).astype(np.float32)  # spread per-feature ranges: SPIQ has work to do
    arrays = {"g": gamma, "w": weights(8, 6), "bias": weights(6)}
    inputs = "(x, g, b)" if with_bias else "(x, g)"
    if with_bias:
        arrays["b"] = RNG.normal(0, 0.5, 8).astype(np.float32)
    body = [f"n = LayerNormalization <axis = -1, epsilon = 0.00001> {inputs}", "m = MatMul(n, w)", "y = Add(m, bias)"]
    return model("(float[B,5,8] x) => (float[B,5,6] y)", body, arrays)


def test_layernorm_statistics_give_the_range_of_a_3d_matmul_input() -> None:
    """The LayerNorm output has mean β and std |γ| per feature: range β ± λ|γ| (λ = 9 at 8 bits),
    the MatMul on [B, T, K] gets per-channel int8 weights (axis 1) and a per-tensor input QDQ."""
    proto = layernorm_linear()
    optimized, report = run_passes(proto, "quantize", spiq=False)
    stats, refusals = quantize_stats(report)
    assert stats["layers_quantized"] == 1 and stats["layers_float"] == 0
    init = inits(optimized)
    (matmul,) = nodes(optimized, "MatMul")
    producers = {o: n for n in optimized.graph.node for o in n.output}
    x_dq, w_dq = producers[matmul.input[0]], producers[matmul.input[1]]
    assert x_dq.op_type == w_dq.op_type == "DequantizeLinear"
    assert init[w_dq.input[0]].dtype == np.int8 and init[w_dq.input[0]].shape == (8, 6)
    assert attr(w_dq, "axis") == 1 and init[w_dq.input[1]].shape == (6,)
    beta, gamma = inits(proto)["b"].astype(np.float64), np.abs(inits(proto)["g"].astype(np.float64))
    bound = max(abs((beta - 9 * gamma).min()), abs((beta + 9 * gamma).max()))
    assert float(init[x_dq.input[1]]) == pytest.approx(bound / 127, rel=1e-6)
    assert not any(r["subject"].startswith("layer") for r in refusals), refusals
    feeds = {"x": RNG.standard_normal((2, 5, 8)).astype(np.float32)}
    assert cosine(run(optimized, feeds)["y"], run(proto, feeds)["y"]) > 0.999


def test_matmul_bias_correction_goes_into_the_following_add() -> None:
    """Bias correction for a MatMul (eq. 3.8): the Add's constant gains (W − Ŵ)·E[x] with
    E[x] = β, the LayerNorm's shift (the constant checked exactly; on a model this small the
    effect on outputs is within the activation rounding, so it is not asserted)."""
    proto = layernorm_linear()
    corrected, _ = run_passes(proto, "quantize", spiq=False, weight_bits=4, first_last_bits=None)
    plain, _ = run_passes(proto, "quantize", spiq=False, weight_bits=4, first_last_bits=None, bias_correction=False)
    (add_c,), (add_p,) = nodes(corrected, "Add"), nodes(plain, "Add")
    bias_c, bias_p = (inits(m)[a.input[1]].astype(np.float64) for m, a in ((corrected, add_c), (plain, add_p)))
    np.testing.assert_allclose(bias_p, inits(proto)["bias"], rtol=1e-6)
    (matmul,) = nodes(corrected, "MatMul")
    (w_dq,) = [n for n in corrected.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == matmul.input[1]]
    w_hat = inits(corrected)[w_dq.input[0]].astype(np.float64) * inits(corrected)[w_dq.input[1]].astype(np.float64)
    beta = inits(proto)["b"].astype(np.float64)
    np.testing.assert_allclose(bias_c - bias_p, beta @ (inits(proto)["w"].astype(np.float64) - w_hat), rtol=1e-5, atol=1e-6)
    assert np.abs(bias_c - bias_p).max() > 1e-3  # a 4-bit weight error: a visible correction
    feeds = {"x": RNG.standard_normal((2, 5, 8)).astype(np.float32)}
    assert cosine(run(corrected, feeds)["y"], run(proto, feeds)["y"]) > 0.95


def test_matmul_without_a_following_add_gets_no_bias_correction() -> None:
    """No Add with a constant [N] after the MatMul: nowhere to put the correction, so the
    model is the same with and without bias correction (no bias is invented)."""
    arrays = {"g": RNG.uniform(0.5, 1.5, 8).astype(np.float32), "b": RNG.normal(0, 0.5, 8).astype(np.float32), "w": weights(8, 6)}
    proto = model("(float[2,5,8] x) => (float[2,5,6] y)", ["n = LayerNormalization <axis = -1, epsilon = 0.00001> (x, g, b)", "y = MatMul(n, w)"], arrays)
    corrected, _ = run_passes(proto, "quantize", spiq=False, weight_bits=4, first_last_bits=None)
    plain, _ = run_passes(proto, "quantize", spiq=False, weight_bits=4, first_last_bits=None, bias_correction=False)
    assert "Add" not in {n.op_type for n in corrected.graph.node}
    feeds = {"x": RNG.standard_normal((2, 5, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(corrected, feeds)["y"], run(plain, feeds)["y"])


@pytest.mark.parametrize("with_bias", [True, False])
def test_spiq_through_layernorm_is_exact_before_rounding(with_bias: bool) -> None:
    """SPIQ divides γ (and β) of the LayerNorm by r and multiplies the MatMul rows by r."""
    proto = layernorm_linear(with_bias)
    graph = import_graph(with_inferred_shapes(proto))
    tensor = graph.tensors()["n"]
    readers = layer_readers(tensor)
    plan = spiq.plan(graph, tensor, readers)
    assert isinstance(plan, spiq.SpiqPlan) and plan.producer.op == "LayerNormalization", plan
    ratio = RNG.uniform(0.05, 1.0, 8)
    spiq.apply(graph, plan, ratio, readers, NameFactory(graph))
    rewritten = export_model(cleanup(graph), proto)
    new = inits(rewritten)
    np.testing.assert_allclose(new[plan.producer.inputs[1].name], inits(proto)["g"] / ratio, rtol=1e-6)
    if with_bias:
        np.testing.assert_allclose(new[plan.producer.inputs[2].name], inits(proto)["b"] / ratio, rtol=1e-6)
    np.testing.assert_allclose(new[readers[0].inputs[1].name], inits(proto)["w"] * ratio[:, None], rtol=1e-6)
    feeds = {"x": RNG.standard_normal((2, 5, 8)).astype(np.float32)}
    assert not np.allclose(intermediate(rewritten, "n", feeds), intermediate(proto, "n", feeds), rtol=1e-3)
    result = verify(proto, rewritten, inputs=feeds, rtol=1e-5, atol=1e-6)
    assert result.passed, result.failures


def test_spiq_through_layernorm_ignores_shape_readers_and_beats_per_tensor() -> None:
    """A Shape reader of the LayerNorm output (ViT attention) does not block SPIQ; on spread
    γ the SPIQ model is closer to FP32 than per tensor."""
    base = layernorm_linear()
    proto = model(
        "(float[N,5,8] x) => (float[N,5,6] y, int64[3] s)",
        ["n = LayerNormalization <axis = -1, epsilon = 0.00001> (x, g, b)", "s = Shape(n)", "m = MatMul(n, w)", "y = Add(m, bias)"],
        inits(base),
    )
    feeds = {"x": RNG.standard_normal((64, 5, 8)).astype(np.float32)}
    reference = run(proto, feeds)["y"]
    errors = {}
    for mode in (True, False):
        optimized, report = run_passes(proto, "quantize", spiq=mode, weight_bits=8)
        stats, _ = quantize_stats(report)
        assert stats["spiq_coverage"] == (1.0 if mode else 0.0)
        got = run(optimized, feeds)
        np.testing.assert_array_equal(got["s"], [64, 5, 8])
        errors[mode] = float(np.mean((got["y"] - reference) ** 2))
    assert errors[True] < errors[False], errors


# --------------------------------------------------------------------------- INT4 storage


def at_opset_21(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model converted as the int4_weights error message advises (and IR 10, which INT4 needs)."""
    from onnx import version_converter

    converted = version_converter.convert_version(proto, 21)
    converted.ir_version = 10
    onnx.checker.check_model(converted, full_check=True)
    return converted


def test_int4_weights_store_4_bit_codes_and_compute_what_int8_storage_computes(chain: BnChain, tmp_path: Path) -> None:
    proto = at_opset_21(chain.model)
    built = {}
    for int4 in (False, True):
        optimized, report = run_passes(proto, *QUANTIZE, weight_bits=4, first_last_bits=None, int4_weights=int4)
        stats, _ = quantize_stats(report)
        path = tmp_path / f"int4_{int4}.onnx"
        onnx.save(optimized, str(path))
        built[int4] = (optimized, stats, path.stat().st_size)
    (int8_model, int8_stats, int8_size), (int4_model, int4_stats, int4_size) = built[False], built[True]
    assert "int4_layers" not in int8_stats
    assert int4_stats["int4_layers"] == int4_stats["layers_quantized"] == int8_stats["layers_quantized"] > 0
    assert "does not fuse" in int4_stats["int4_note"]
    kinds = Counter(t.data_type for t in int4_model.graph.initializer)
    assert kinds[TensorProto.INT4] == 2 * int4_stats["layers_quantized"]  # codes and zero points
    assert kinds[TensorProto.INT8] == 0
    int8_codes = {t.name: numpy_helper.to_array(t) for t in int8_model.graph.initializer if t.data_type == TensorProto.INT8}
    int4_codes = {t.name: numpy_helper.to_array(t) for t in int4_model.graph.initializer if t.data_type == TensorProto.INT4}
    assert sorted(int8_codes) == sorted(int4_codes)
    for name, codes in int8_codes.items():
        np.testing.assert_array_equal(int4_codes[name].astype(np.int8), codes)
    assert int4_size < int8_size
    feeds = {"x": chain.draw(4)}
    np.testing.assert_array_equal(run(int4_model, feeds)["y"], run(int8_model, feeds)["y"])


def test_int4_weights_below_opset_21_is_an_error_naming_the_opset(chain: BnChain) -> None:
    with pytest.raises(PipelineError, match=r"opset >= 21.*opset 17.*version_converter"):
        run_passes(chain.model, *QUANTIZE, weight_bits=4, int4_weights=True)


def test_cli_int4_weights_flag(tmp_path: Path, capsys) -> None:
    """--int4-weights reaches the pass: INT4 codes at opset 21, a clear error (exit 1) below."""
    from onnxopt.cli import main

    arrays = {"w1": weights(8, 3, 1, 1), "w2": weights(8, 8, 1, 1), "w3": weights(4, 8, 1, 1), **bn_params("p", 8), **bn_params("q", 8)}
    body = ["c = Conv(x, w1)", bn("p", "c", "z"), "r = Relu(z)", "d = Conv(r, w2)", bn("q", "d", "e"), "s = Relu(e)", "y = Conv(s, w3)"]
    three = model("(float[1,3,4,4] x) => (float[1,4,4,4] y)", body, arrays)  # the middle Conv gets 4-bit weights
    old, new = tmp_path / "opset17.onnx", tmp_path / "opset21.onnx"
    onnx.save(three, str(old))
    onnx.save(at_opset_21(three), str(new))
    assert main([str(new), "-o", str(tmp_path / "out.onnx"), "--quantize", "w4a8", "--int4-weights", "-q"]) == 0
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert any(t.data_type == TensorProto.INT4 for t in out.graph.initializer)
    assert main([str(old), "-o", str(tmp_path / "bad.onnx"), "--quantize", "w4a8", "--int4-weights", "-q"]) != 0
    assert "opset 17" in capsys.readouterr().err


def test_spiq_estimate_models_a_convtranspose_like_the_equivalent_conv() -> None:
    """A 1x1 ConvTranspose with weight W[C_in, C_out] computes what a 1x1 Conv with Wᵀ does:
    the estimate gives both the same errors (it used to skip ConvTranspose readers)."""
    w = weights(6, 4, 1, 1)
    x, y = gs.Variable("x", np.float32, (1, 6, 3, 3)), gs.Variable("y", np.float32, (1, 4, 3, 3))
    transposed = gs.Node("ConvTranspose", inputs=[x, gs.Constant("w", w)], outputs=[y])
    conv = gs.Node("Conv", inputs=[x, gs.Constant("wc", np.ascontiguousarray(w.transpose(1, 0, 2, 3)))], outputs=[y])
    spread = np.geomspace(0.01, 1.0, 6)
    args = (spread**2, 4 * spread / 127, 4 * spread.max() / 127, 4, True)
    got = spiq.estimated_errors([transposed], *args)
    assert got is not None
    np.testing.assert_allclose(got, spiq.estimated_errors([conv], *args), rtol=1e-9)
    grouped = gs.Node("ConvTranspose", inputs=[x, gs.Constant("wg", weights(6, 2, 1, 1))], outputs=[y], attrs={"group": 2})
    assert spiq.estimated_errors([grouped], *args) is None
