"""quantize numerics against an independent numpy reference and ONNX Runtime's own
QuantizeLinear/DequantizeLinear: weight codes and scales (per channel, per tensor, all-zero
channels), activation codes (unsigned, signed, ties, saturation, the restricted-range Clip of
emit.quantize_activation) and int32 bias codes (docs/quantization.md).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.common.emit import quantize_activation
from onnxopt.passes.common.numerics import (
    activation_quant,
    bias_codes,
    dequantize_weight,
    fake_quantize,
    quantize_weight,
    weight_scales,
)

from onnxopt.graph import NameFactory, cleanup
from onnxopt.verify import run
from tests.passes.quantize_builders import RNG, nodes, weights


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


# =========================================================================== weights, activations, biases
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
