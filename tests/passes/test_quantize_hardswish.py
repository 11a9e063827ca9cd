"""Data-free ranges through hard-swish, constant affine ops and squeeze-excite gates
(passes/common/ranges.py), as Paddle2ONNX and PyTorch at opset < 14 write them: the exact
range image of a BN output, the quadrature mean against a Monte-Carlo one, and a layer reading
such a tensor now quantized (before: "no statistics ... kept in float"), with outputs close
to FP32 in ORT.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxopt.passes.common.ranges import RangeEstimator
from onnxopt.passes.common.statistics import bn_statistics

from onnxopt.graph import import_graph, with_inferred_shapes
from onnxopt.verify import run
from tests.conftest import run_passes
from tests.conftest import text_model as model
from tests.passes.quantize_builders import (
    KEEP_QDQ,
    QUANTIZE,
    bn,
    bn_params,
    quantize_stats,
    relative_error,
    weights,
)

GAMMA = (0.5, 3.0)
BETA = (-2.0, 2.0)


def paddle_hardswish(x: str, y: str) -> list[str]:
    """x · Clip(x + 3, 0, 6) / 6, the form Paddle2ONNX writes at opset 11."""
    return [f"{y}_a = Add({x}, three)", f"{y}_c = Clip({y}_a, zero, six)", f"{y}_m = Mul({x}, {y}_c)", f"{y} = Div({y}_m, six)"]


HARDSWISH_FORMS = {
    "paddle": paddle_hardswish,
    "hardsigmoid": lambda x, y: [f"{y}_g = HardSigmoid <alpha = 0.1666666716337204, beta = 0.5> ({x})", f"{y} = Mul({x}, {y}_g)"],
    "op": lambda x, y: [f"{y} = HardSwish({x})"],
}
CONSTANTS = {"three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)}


def hardswish_model(form: str) -> onnx.ModelProto:
    """Conv → BN → hard-swish → Conv."""
    arrays = {"w1": weights(8, 3, 3, 3), "b1": weights(8), "w2": weights(4, 8, 1, 1), "b2": weights(4),
              **bn_params("bn", 8, gamma=GAMMA, beta=BETA), **CONSTANTS}
    body = ["c = Conv <pads = [1,1,1,1]> (x, w1, b1)", bn("bn", "c", "z"), *HARDSWISH_FORMS[form]("z", "h"), "y = Conv(h, w2, b2)"]
    return model("(float[2,3,8,8] x) => (float[2,4,8,8] y)", body, arrays)


def squeeze_excite_model() -> onnx.ModelProto:
    """Conv → BN → Relu → SE gate (GlobalAveragePool → Conv → HardSigmoid) · → Conv (the gated tensor)."""
    arrays = {"w1": weights(8, 3, 3, 3), "b1": weights(8), "ws": weights(8, 8, 1, 1), "bs": weights(8),
              "w2": weights(4, 8, 1, 1), "b2": weights(4), **bn_params("bn", 8)}
    body = ["c = Conv <pads = [1,1,1,1]> (x, w1, b1)", bn("bn", "c", "z"), "r = Relu(z)", "p = GlobalAveragePool(r)",
            "s = Conv(p, ws, bs)", "g = HardSigmoid(s)", "m = Mul(r, g)", "y = Conv(m, w2, b2)"]
    return model("(float[2,3,8,8] x) => (float[2,4,8,8] y)", body, arrays)


def estimated(proto: onnx.ModelProto, tensor: str, lam: float = 9.0):
    graph = import_graph(with_inferred_shapes(proto))
    return RangeEstimator(bn_statistics(graph, {}), lam).range(graph.tensors()[tensor])


def hardswish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x + 3, 0, 6) / 6


@pytest.mark.parametrize("form", HARDSWISH_FORMS)
def test_hardswish_range_is_the_exact_image_of_the_bn_range(form: str) -> None:
    proto = hardswish_model(form)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    mean, sigma = arrays["bn_b"].astype(np.float64), np.abs(arrays["bn_g"]).astype(np.float64)  # BN output N(β, γ²)
    assert mean.min() < -1.5 < mean.max()  # some channels reach the minimum −3/8 inside their range
    r = estimated(proto, "h")
    grid = mean[:, None] + sigma[:, None] * np.linspace(-9, 9, 200001)[None, :]
    np.testing.assert_allclose(r.lo, hardswish(grid).min(axis=1), atol=1e-6)
    np.testing.assert_allclose(r.hi, hardswish(grid).max(axis=1), atol=1e-6)
    samples = mean[:, None] + sigma[:, None] * np.random.default_rng(0).standard_normal((8, 400000))
    np.testing.assert_allclose(r.mean, hardswish(samples).mean(axis=1), atol=0.01)
    np.testing.assert_allclose(r.second_moment, (hardswish(samples) ** 2).mean(axis=1), rtol=0.02, atol=0.01)


def test_constant_affine_ops_shift_and_scale_the_range() -> None:
    arrays = {"w1": weights(8, 3, 3, 3), "b1": weights(8), **bn_params("bn", 8), "k": np.array(-2.0, np.float32),
              "v": np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8, 1, 1)}
    body = ["c = Conv(x, w1, b1)", bn("bn", "c", "z"), "a = Add(z, v)", "m = Mul(a, k)", "d = Div(m, k)", "s = Sub(v, d)"]
    proto = model("(float[2,3,8,8] x) => (float[2,8,6,6] s)", body, arrays)
    z, a, m, d, s = (estimated(proto, t) for t in "zamds")
    shift = arrays["v"].reshape(-1)
    np.testing.assert_allclose([a.lo, a.hi, a.mean], [z.lo + shift, z.hi + shift, z.mean + shift], rtol=1e-6)
    np.testing.assert_allclose([m.lo, m.hi, m.mean], [-2 * a.hi, -2 * a.lo, -2 * a.mean], rtol=1e-6)
    np.testing.assert_allclose([d.lo, d.hi], [a.lo, a.hi], rtol=1e-6)
    np.testing.assert_allclose([s.lo, s.hi, s.mean], [shift - a.hi, shift - a.lo, shift - a.mean], rtol=1e-6, atol=1e-12)


def test_gate_widens_the_range_to_zero() -> None:
    proto = squeeze_excite_model()
    r, m = estimated(proto, "r"), estimated(proto, "m")
    np.testing.assert_allclose(m.lo, np.minimum(r.lo, 0))
    np.testing.assert_allclose(m.hi, r.hi)


@pytest.mark.parametrize("form", HARDSWISH_FORMS)
def test_layer_after_hardswish_is_quantized_and_close(form: str) -> None:
    proto = hardswish_model(form)
    quantized, report = run_passes(proto, *QUANTIZE, **KEEP_QDQ)
    stats, refusals = quantize_stats(report)
    reader = [layer for layer in stats["layers"] if layer["input"] == "h"]
    assert reader, refusals  # before: "no statistics for its input h: kept in float"
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert relative_error(run(quantized, feeds)["y"], run(proto, feeds)["y"]) < 0.05


def test_layer_after_squeeze_excite_gate_is_quantized() -> None:
    proto = squeeze_excite_model()
    quantized, report = run_passes(proto, *QUANTIZE, **KEEP_QDQ)
    stats, refusals = quantize_stats(report)
    assert [layer for layer in stats["layers"] if layer["input"] == "m"], refusals
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert relative_error(run(quantized, feeds)["y"], run(proto, feeds)["y"]) < 0.05
