"""runtime_ops: every op's function body against its numpy reference in a plain
onnxruntime.InferenceSession (no registration), checker full_check and strict shape
inference on models using them, body variants, inlining and the register() API."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper

from onnxopt import runtime_ops
from onnxopt.runtime_ops import DOMAIN, add_functions, inline_functions, register
from onnxopt.runtime_ops.modular import conv_reference, matmul_reference, wrap_to_bits_reference
from onnxopt.runtime_ops.power import dequantize_reference, quantize_reference

RNG = np.random.default_rng(7)
NP_TO_ONNX = {np.float32: TP.FLOAT, np.int32: TP.INT32, np.int64: TP.INT64, np.uint8: TP.UINT8, np.int8: TP.INT8}


def single_op(op: str, feeds: dict[str, np.ndarray], outputs: dict[str, tuple[int, list[int]]], opset: int = 17, **attrs) -> onnx.ModelProto:
    """A model with one ``op`` of our domain reading ``feeds`` (all graph inputs), bodies added."""
    inputs = [helper.make_tensor_value_info(k, NP_TO_ONNX[v.dtype.type], list(v.shape)) for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(k, t, shape) for k, (t, shape) in outputs.items()]
    node = helper.make_node(op, list(feeds), list(outputs), domain=DOMAIN, **attrs)
    model = helper.make_model(helper.make_graph([node], op, inputs, outs), opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    add_functions(model)
    onnx.checker.check_model(model, full_check=True)  # includes strict shape inference of the body
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def inferred_outputs(model: onnx.ModelProto) -> dict[str, tuple[int, list[int]]]:
    """Output types/shapes shape inference derives through the function bodies (outputs declared without shape)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for out in probe.graph.output:
        out.type.tensor_type.ClearField("shape")
    del probe.graph.value_info[:]
    node = probe.graph.node[0]
    inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True)
    infos = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return {
        name: (infos[name].type.tensor_type.elem_type, [d.dim_value for d in infos[name].type.tensor_type.shape.dim])
        for name in node.output
        if infos[name].type.tensor_type.HasField("shape")
    }


# --------------------------------------------------------------------------- PowerQuant
@pytest.mark.parametrize("exponent", [0.5, 0.62, 1.0])
@pytest.mark.parametrize("per_axis", [False, True])
def test_power_quantize_dequantize_match_reference(exponent: float, per_axis: bool) -> None:
    x = (RNG.standard_normal((6, 3, 4, 4)) * 0.7).astype(np.float32)
    top = np.abs(x).reshape(6, -1).max(axis=1) if per_axis else np.abs(x).max()
    scale = (np.power(top, exponent) / 7).astype(np.float32)
    scale = scale.reshape(6, 1, 1, 1) if per_axis else np.asarray(scale, np.float32)
    feeds = {"x": x, "scale": scale}
    quant = single_op("PowerQuantizeLinear", feeds, {"q": (TP.INT32, list(x.shape))}, exponent=exponent, bits=4)
    (codes,) = run(quant, feeds)
    expected = quantize_reference(x, scale, exponent=exponent, bits=4)
    # a float Pow in ORT and numpy may differ by an ulp: at most a rare code exactly at .5 flips
    assert np.mean(codes != expected) < 1e-3 and np.abs(codes - expected).max() <= 1
    if exponent in (0.5, 1.0):
        np.testing.assert_array_equal(codes, expected)
    assert codes.min() >= -7 and codes.max() <= 7 and (np.abs(codes) == 7).any()

    dfeeds = {"q": expected.astype(np.int8), "scale": scale}
    dequant = single_op("PowerDequantizeLinear", dfeeds, {"y": (TP.FLOAT, list(x.shape))}, exponent=exponent)
    (values,) = run(dequant, dfeeds)
    np.testing.assert_allclose(values, dequantize_reference(expected, scale, exponent=exponent), rtol=2e-6, atol=0)
    # Q⁻¹(Q(x)) is close to x (one power-domain step)
    assert np.abs(values - x).max() < np.abs(x).max() * 0.35


def test_unsigned_power_quantize_uses_the_full_range() -> None:
    x = np.abs(RNG.standard_normal((2, 50))).astype(np.float32)
    scale = np.asarray(np.sqrt(x.max()) / 255, np.float32)
    feeds = {"x": x, "scale": scale}
    model = single_op("PowerQuantizeLinear", feeds, {"q": (TP.INT32, list(x.shape))}, exponent=0.5, bits=8, signed=0)
    (codes,) = run(model, feeds)
    np.testing.assert_array_equal(codes, quantize_reference(x, scale, exponent=0.5, bits=8, signed=0))
    assert codes.max() == 255 and codes.min() >= 0


def test_shape_inference_through_power_bodies() -> None:
    x = RNG.standard_normal((2, 3, 5)).astype(np.float32)
    feeds = {"x": x, "scale": np.asarray(0.1, np.float32)}
    model = single_op("PowerQuantizeLinear", feeds, {"q": (TP.INT32, [2, 3, 5])}, exponent=0.7, bits=6)
    assert inferred_outputs(model) == {"q": (TP.INT32, [2, 3, 5])}


def test_half_exponent_gets_the_sqrt_body_other_exponents_pow() -> None:
    feeds = {"x": np.ones((2, 2), np.float32), "scale": np.asarray(0.1, np.float32)}
    half = single_op("PowerQuantizeLinear", feeds, {"q": (TP.INT32, [2, 2])}, exponent=0.5, bits=4)
    other = single_op("PowerQuantizeLinear", feeds, {"q": (TP.INT32, [2, 2])}, exponent=0.55, bits=4)
    body_ops = lambda m: [n.op_type for n in m.functions[0].node]  # noqa: E731
    # both compute 2^(bits−signed) with a constant Pow; only the generic body raises x to a power
    assert "Sqrt" in body_ops(half) and "Sqrt" not in body_ops(other)
    assert body_ops(half).count("Pow") == body_ops(other).count("Pow") - 1
    dq = single_op("PowerDequantizeLinear", {"q": np.ones((2, 2), np.int8), "scale": feeds["scale"]}, {"y": (TP.FLOAT, [2, 2])}, exponent=0.5)
    assert "Pow" not in body_ops(dq)


# --------------------------------------------------------------------------- modular
@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_wrap_to_bits_is_exact(opset: int, dtype) -> None:
    x = RNG.integers(-(2**20), 2**20, size=4000).astype(dtype)
    x[:4] = [-2048, 2047, 2048, -2049]
    model = single_op("WrapToBits", {"x": x}, {"y": (NP_TO_ONNX[dtype], [4000])}, opset=opset, bits=12)
    (y,) = run(model, {"x": x})
    np.testing.assert_array_equal(y, wrap_to_bits_reference(x, bits=12))
    assert y.dtype == dtype and y.min() >= -2048 and y.max() <= 2047
    assert list(y[:4]) == [-2048, 2047, -2048, 2047]
    assert ("BitwiseAnd" in {n.op_type for n in model.functions[0].node}) == (opset >= 18)


@pytest.mark.parametrize("bits", [8, 12, 31])
def test_modular_matmul_is_exact(bits: int) -> None:
    feeds = {
        "A": RNG.integers(0, 256, (5, 64)).astype(np.uint8),
        "B": RNG.integers(0, 256, (64, 7)).astype(np.uint8),
        "a_zero_point": np.asarray(128, np.uint8),
        "b_zero_point": np.asarray(128, np.uint8),
        "bias": RNG.integers(-5000, 5000, 7).astype(np.int32),
    }
    model = single_op("ModularMatMul", feeds, {"Y": (TP.INT32, [5, 7])}, opset=18, bits=bits)
    (y,) = run(model, feeds)
    expected = matmul_reference(*feeds.values(), bits=bits)
    np.testing.assert_array_equal(y, expected)
    plain = matmul_reference(*feeds.values(), bits=40)
    assert (bits < 16) == bool((y != plain).any())  # narrow widths really wrap, 31 bits does not
    assert inferred_outputs(model) == {"Y": (TP.INT32, [5, 7])}


@pytest.mark.parametrize("attrs", [{}, {"strides": [2, 2], "pads": [1, 1, 1, 1]}, {"group": 2, "dilations": [2, 2], "pads": [2, 1, 2, 1]}])
def test_modular_conv_is_exact(attrs: dict) -> None:
    group = attrs.get("group", 1)
    feeds = {
        "x": RNG.integers(0, 256, (2, 4, 9, 9)).astype(np.uint8),
        "w": RNG.integers(0, 256, (6, 4 // group, 3, 3)).astype(np.uint8),
        "x_zero_point": np.asarray(3, np.uint8),
        "w_zero_point": np.asarray(128, np.uint8),
        "bias": RNG.integers(-1000, 1000, (6, 1, 1)).astype(np.int32),
    }
    expected = conv_reference(*feeds.values(), bits=13, **attrs)
    model = single_op("ModularConv", feeds, {"y": (TP.INT32, list(expected.shape))}, opset=18, bits=13, **attrs)
    for optimize in (False, True):
        (y,) = run(model, feeds, optimize)
        np.testing.assert_array_equal(y, expected)
    assert inferred_outputs(model) == {"y": (TP.INT32, list(expected.shape))}


# --------------------------------------------------------------------------- API
def test_inline_functions_gives_the_same_numbers_without_functions() -> None:
    feeds = {"x": RNG.integers(-(2**14), 2**14, 100).astype(np.int32)}
    model = single_op("WrapToBits", feeds, {"y": (TP.INT32, [100])}, opset=18, bits=9)
    inlined = inline_functions(model)
    assert not inlined.functions and all(n.domain in ("", "ai.onnx") for n in inlined.graph.node)
    assert DOMAIN not in {o.domain for o in inlined.opset_import}
    onnx.checker.check_model(inlined, full_check=True)
    np.testing.assert_array_equal(run(inlined, feeds)[0], run(model, feeds)[0])


def test_add_functions_rejects_old_opsets_and_unknown_ops() -> None:
    model = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ValueError, match="opset"):
        add_functions(model, ops=["WrapToBits"])
    with pytest.raises(KeyError, match="unknown op"):
        runtime_ops.function_for("NoSuchOp", 18)


def test_register_without_library_is_a_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv(runtime_ops.LIBRARY_ENV, raising=False)
    options = ort.SessionOptions()
    assert register(options) is False
    with pytest.raises(FileNotFoundError):
        register(options, tmp_path / "missing.so")


def test_every_schema_describes_itself() -> None:
    text = runtime_ops.describe()
    for name, schema in runtime_ops.SCHEMAS.items():
        assert f"{DOMAIN}::{name}" in text
        assert set(schema.attributes) >= {"bits"} or name == "PowerDequantizeLinear"
