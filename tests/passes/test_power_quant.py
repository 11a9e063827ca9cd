"""power-quant: the exponent search (Nelder–Mead vs a fine grid on zoo weights, convexity
near the optimum), the emitted custom ops and stored codes, numbers against a numpy
reference of eqs. 3.13/3.15, the a = 0.5 integer path against the float path, options, CLI."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxopt
from onnxopt.cli import main as cli_main
from onnxopt.errors import PipelineError
from onnxopt.passes.power_quant import (
    PowerWeightOperator,
    power_dequantize,
    power_quantize,
    reconstruction_error,
    search_exponent,
    total_error,
)
from onnxopt.runtime_ops import DOMAIN
from onnxopt.verify import run
from tests.conftest import bn_line, text_model

RNG = np.random.default_rng(11)
PIPELINE = ("fold-batchnorm", "power-quant", "eliminate-dead")


def conv_model(with_bn: bool = True, channels: int = 16) -> onnx.ModelProto:
    """x ─ Conv ─ [BN] ─ Relu ─ Conv ─ [BN] ─ Relu ─ GlobalAveragePool ─ Flatten ─ Gemm."""
    c = channels
    arrays = {
        "w1": (RNG.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32),
        "w2": (RNG.standard_laplace((c, c, 3, 3)) * 0.1).astype(np.float32) if hasattr(RNG, "standard_laplace") else (RNG.laplace(size=(c, c, 3, 3)) * 0.1).astype(np.float32),
        "wf": (RNG.standard_normal((10, c)) * 0.3).astype(np.float32),
        "bf": RNG.standard_normal(10).astype(np.float32),
    }
    body = []
    if with_bn:
        for p in ("bn1", "bn2"):
            arrays.update({f"{p}_g": RNG.uniform(0.5, 1.5, c).astype(np.float32), f"{p}_b": RNG.normal(0.2, 0.5, c).astype(np.float32),
                           f"{p}_m": RNG.normal(0, 1, c).astype(np.float32), f"{p}_v": RNG.uniform(0.5, 2, c).astype(np.float32)})
        body += ["c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)", bn_line("bn1", "c1", "b1"), "r1 = Relu (b1)",
                 "c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2)", bn_line("bn2", "c2", "b2"), "r2 = Relu (b2)"]
    else:
        body += ["c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)", "r1 = Relu (c1)", "c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2)", "r2 = Relu (c2)"]
    body += ["p = GlobalAveragePool (r2)", "f = Flatten (p)", "y = Gemm <transB = 1> (f, wf, bf)"]
    return text_model("(float[2, 3, 8, 8] x) => (float[2, 10] y)", body, arrays)


def feeds() -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}


def zoo_weights(path) -> list[tuple[np.ndarray, int, int]]:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [inits[n.input[1]].astype(np.float64) for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    return [(w, 4, 0) for w in convs]


# --------------------------------------------------------------------------- numerics
def test_operator_matches_equations_3_13_and_3_15() -> None:
    w = RNG.standard_normal((4, 50))
    codes, scales = power_quantize(w, 4, 0.6, axis=0)
    top = np.abs(w).max(axis=1, keepdims=True)
    expected = np.clip(np.round(7 * np.sign(w) * np.abs(w) ** 0.6 / top**0.6), -7, 7)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_allclose(power_dequantize(codes, scales, 0.6, 0), np.sign(expected) * (np.abs(expected) * top**0.6 / 7) ** (1 / 0.6))
    # a = 1 is uniform symmetric quantization
    uniform, _ = power_quantize(w, 4, 1.0, axis=0)
    np.testing.assert_array_equal(uniform, np.round(7 * w / top))


@pytest.mark.zoo
def test_nelder_mead_finds_the_grid_minimum_and_the_curve_is_convex_there(zoo_cache) -> None:
    from onnxopt.models.build import build_zoo_model

    weights = zoo_weights(build_zoo_model("resnet20", cache_dir=zoo_cache))[::2]  # every other layer: keeps the test fast
    found = search_exponent(weights)
    grid = np.arange(0.3, 1.0001, 0.01)
    errors = np.array([total_error(weights, a) for a in grid])
    assert abs(found - grid[errors.argmin()]) <= 0.02
    assert total_error(weights, found) <= errors.min() * 1.001
    near = np.arange(found - 0.1, found + 0.1001, 0.025)
    curve = np.array([total_error(weights, a) for a in near])
    assert np.all(np.diff(curve, 2) > -1e-3 * curve.min())  # Lemma 3.1.2: convex around a*
    assert 0.3 < found < 1.0 and total_error(weights, found) < total_error(weights, 1.0)


# --------------------------------------------------------------------------- the pass
def test_pass_emits_custom_ops_with_int8_codes_and_matches_the_numpy_reference() -> None:
    model = conv_model(with_bn=False)
    out, report = onnxopt.optimize(model, passes=list(PIPELINE), validate=True, weight_bits=6, act_bits=8, power_exponent=0.6)
    stats = report.passes[1].stats
    counts = Counter(n.op_type for n in out.graph.node)
    # no statistics: activations stay float (refused and reported), every weight is power-quantized
    assert counts["PowerDequantizeLinear"] == 3 and counts["PowerQuantizeLinear"] == 0
    assert stats["layers_quantized"] == 3 and stats["exponent"] == 0.6
    assert any("no statistics" in r.reason for r in report.passes[1].refusals)
    assert {f.name for f in out.functions} == {"PowerDequantizeLinear"} and DOMAIN in {o.domain for o in out.opset_import}
    codes = [numpy_helper.to_array(t) for t in out.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(codes) == 3
    # reference: the float model with W replaced by Q⁻¹(Q(W)) (first/last layer at 8 bits)
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    for tensor, axis, bits in zip(ref.graph.initializer[:3], (0, 0, 0), (8, 6, 8)):
        w = numpy_helper.to_array(tensor).astype(np.float64)
        q, s = power_quantize(w, bits, 0.6, axis)
        tensor.CopyFrom(numpy_helper.from_array(power_dequantize(q, s, 0.6, axis).astype(np.float32), tensor.name))
    x = feeds()
    np.testing.assert_allclose(run(out, x)["y"], run(ref, x)["y"], rtol=1e-5, atol=1e-5)


def test_activations_are_power_quantized_and_codes_shrink_the_file() -> None:
    model = conv_model(with_bn=True, channels=64)
    out, report = onnxopt.optimize(model, passes=list(PIPELINE), validate=True, weight_bits=8, act_bits=8, power_error_curve=True)
    stats = report.passes[1].stats
    counts = Counter(n.op_type for n in out.graph.node)
    assert counts["PowerQuantizeLinear"] == stats["activations_quantized"] == 2  # inputs of conv2 and the Gemm
    assert 0.05 <= stats["exponent"] <= 1 and stats["weight_error"] <= stats["weight_error_uniform"]
    curve = dict(map(tuple, stats["error_curve"]))
    assert min(curve.values()) >= stats["weight_error"] - 1e-3 * stats["weight_error"]
    float_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name.startswith("w"))
    code_bytes = sum(numpy_helper.to_array(t).nbytes for t in out.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert code_bytes * 4 == float_bytes
    x = feeds()
    ref, got = run(model, x)["y"], run(out, x)["y"]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def test_integer_path_equals_the_float_path() -> None:
    model = conv_model(with_bn=True)
    options = dict(weight_bits=4, act_bits=4, power_exponent=0.5, first_last_bits=None, input_range=(-4.0, 4.0))
    integer, rep_i = onnxopt.optimize(model, passes=list(PIPELINE), validate=True, **options)
    floating, rep_f = onnxopt.optimize(model, passes=list(PIPELINE), validate=True, power_integer=False, **options)
    counts = Counter(n.op_type for n in integer.graph.node)
    assert rep_i.passes[1].stats["integer_layers"] == 3 and rep_f.passes[1].stats["integer_layers"] == 0
    assert counts["ConvInteger"] == 2 and counts["MatMulInteger"] == 1 and counts["Conv"] == 0
    assert "ConvInteger" not in Counter(n.op_type for n in floating.graph.node)
    x = feeds()
    a, b = run(integer, x)["y"], run(floating, x)["y"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_per_layer_exponents_lower_the_weight_error() -> None:
    model = conv_model(with_bn=True)
    _, glob = onnxopt.optimize(model, passes=list(PIPELINE), weight_bits=4, act_bits=8)
    _, per = onnxopt.optimize(model, passes=list(PIPELINE), weight_bits=4, act_bits=8, power_per_layer=True)
    exps = per.passes[1].stats["exponents_per_layer"]
    assert len(exps) == 3 and all(0.05 <= a <= 1 for a in exps.values())
    assert per.passes[1].stats["weight_error"] <= glob.passes[1].stats["weight_error"] + 1e-9


def test_weight_operator_protocol_round_trip() -> None:
    import onnx_graphsurgeon as gs

    from onnxopt.graph import NameFactory

    from onnxopt.passes.common.operators import weight_operator

    assert isinstance(weight_operator("power"), PowerWeightOperator)  # how rex finds it (rex_operator="power")
    op = PowerWeightOperator(0.55)
    w = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    q = op.quantize(w, 5, 0)
    assert op.name == "power" and q.codes.dtype == np.int8 and q.scales.shape == (8,) and q.bits == 5 and q.params == {"exponent": 0.55}
    graph = gs.Graph(opset=17)
    out = op.emit(graph, q, NameFactory(graph))
    graph.outputs = [out.to_variable(dtype=np.float32, shape=list(w.shape))]
    model = gs.export_onnx(graph)
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(next(iter(run(model, {}).values())), op.dequantize(q), rtol=2e-6)
    assert reconstruction_error(w.astype(np.float64), 5, 0.55, 0) == pytest.approx(float(np.linalg.norm(w - op.dequantize(q))), rel=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {"power_exponent": 1.5},
        {"power_exponent": "x"},
        {"weight_bits": 9},
        {"power_integer": "sometimes"},
        {"lam": float("inf")},
        {"input_range": (float("-inf"), float("inf"))},
    ],
)
def test_bad_options_are_clear_errors(options) -> None:
    with pytest.raises(PipelineError, match="power-quant"):
        onnxopt.optimize(conv_model(), passes=list(PIPELINE), **options)


def test_cli_power_quant_fixed_and_inlined(tmp_path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_model(), str(src))
    out, inlined = tmp_path / "pq.onnx", tmp_path / "pq_inlined.onnx"
    assert cli_main([str(src), "-o", str(out), "--quantize", "w4a8", "--power-quant", "0.5", "-q"]) == 0
    assert cli_main([str(src), "-o", str(inlined), "--quantize", "w4a8", "--power-quant", "0.5", "--inline-functions", "-q"]) == 0
    a, b = onnx.load(str(out)), onnx.load(str(inlined))
    assert Counter(n.op_type for n in a.graph.node)["PowerDequantizeLinear"] == 5  # 3 weights + 2 activations
    assert not b.functions and all(n.domain != DOMAIN for n in b.graph.node)
    x = feeds()
    np.testing.assert_allclose(run(a, x)["y"], run(b, x)["y"], rtol=1e-6, atol=1e-6)
    assert cli_main([str(src), "-o", str(out), "--power-quant", "-q"]) == 7  # needs --quantize
    assert cli_main([str(src), "-o", str(out), "--quantize", "w4a8", "--power-quant", "abc", "-q"]) == 7


def test_fast_search_error_equals_the_exact_error() -> None:
    from onnxopt.passes.power_quant import NormalizedWeight

    w = RNG.laplace(size=(32, 16, 3, 3)) * 0.1
    prepared = NormalizedWeight(w, 4, 0)
    for a in (0.25, 0.5, 0.73, 1.0):
        assert prepared.error(a) == pytest.approx(reconstruction_error(w, 4, a, 0), rel=1e-9)


def test_bias_correction_adds_the_mean_shift_of_eq_3_8() -> None:
    from scipy.stats import norm

    model = conv_model(with_bn=True)
    arrays = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    options = dict(weight_bits=4, act_bits=8, power_exponent=0.6)
    with_bc, _ = onnxopt.optimize(model, passes=list(PIPELINE), validate=True, **options)
    without, _ = onnxopt.optimize(model, passes=list(PIPELINE), validate=True, bias_correction=False, **options)
    gemm = lambda m: next(n for n in m.graph.node if n.op_type == "Gemm")  # noqa: E731
    value = lambda m, name: numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))  # noqa: E731
    shift = value(with_bc, gemm(with_bc).input[2]) - value(without, gemm(without).input[2])
    # E[X] of the Gemm input: the rectified Gaussian of BN2's output, kept through the pooling
    beta, sigma = arrays["bn2_b"], np.abs(arrays["bn2_g"])
    mean = beta * norm.cdf(beta / sigma) + sigma * norm.pdf(beta / sigma)
    w = arrays["wf"]  # the last layer keeps 8 bits
    codes, scales = power_quantize(w, 8, 0.6, 0)
    np.testing.assert_allclose(shift, (w - power_dequantize(codes, scales, 0.6, 0)) @ mean, rtol=1e-4, atol=1e-7)
    assert np.abs(shift).max() > 0


def test_calibration_data_with_nan_is_rejected_naming_file_and_input(tmp_path) -> None:
    from onnxopt.errors import InputDataError

    samples = RNG.standard_normal((4, 3, 8, 8)).astype(np.float32)
    samples[2, 0, 0, 0] = np.nan
    path = tmp_path / "cal.npz"
    np.savez(path, x=samples)
    with pytest.raises(InputDataError, match=r"calibration data .*cal.npz: input x holds 1 NaN/inf value\(s\) \(first in sample 2\)"):
        onnxopt.optimize(conv_model(with_bn=False), passes=list(PIPELINE), power_exponent=0.5, act_ranges="minmax", calibration_data=str(path))


def test_non_finite_weight_scale_is_never_written() -> None:
    from onnxopt.errors import ValidationError

    model = conv_model(with_bn=False)
    weight = model.graph.initializer[1]  # w2
    values = numpy_helper.to_array(weight).copy()
    values[0, 0, 0, 0] = np.inf
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    with pytest.raises(ValidationError, match="w2|Conv") as info:
        onnxopt.optimize(model, passes=list(PIPELINE), power_exponent=0.5)
    assert "not finite and positive" in str(info.value) and info.value.exit_code == 8


# --------------------------------------------------------------------------- exponent 1
def _custom_ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.domain == DOMAIN] + [f.name for f in model.functions]


def test_exponent_one_emits_the_plain_qdq_of_the_quantize_pass() -> None:
    """At a = 1 power quantization is uniform quantization: no custom ops (several times
    slower in ORT for the same values), the quantize pass's QDQ instead, said in the stats."""
    model = conv_model(with_bn=True)
    options = dict(weight_bits=4, act_bits=8, input_range=(-4.0, 4.0))
    power, report = onnxopt.optimize(model, passes=list(PIPELINE), validate=True, power_exponent=1.0, **options)
    uniform, _ = onnxopt.optimize(model, passes=["fold-batchnorm", "quantize", "eliminate-dead"], validate=True, **options)
    stats = report.passes[1].stats
    assert not _custom_ops(power) and DOMAIN not in {o.domain for o in power.opset_import}
    assert stats["exponent"] == 1.0 and stats["emitted"] == "QDQ" and "uniform quantization" in stats["note"]
    assert stats["layers_quantized"] == 3
    counts = Counter(n.op_type for n in power.graph.node)
    assert counts == Counter(n.op_type for n in uniform.graph.node) and counts["QuantizeLinear"] >= 3
    x = feeds()
    np.testing.assert_allclose(run(power, x)["y"], run(uniform, x)["y"], rtol=0, atol=1e-6)
    assert "emitted=QDQ" in report.format_table()


def test_searched_exponent_of_one_also_emits_plain_qdq() -> None:
    """Uniformly distributed weights: the search ends at a = 1, the same fallback applies."""
    model = conv_model(with_bn=True)
    rng = np.random.default_rng(5)
    for tensor in model.graph.initializer:
        if tensor.name in ("w1", "w2", "wf"):
            shape = tuple(tensor.dims)
            tensor.CopyFrom(numpy_helper.from_array(rng.uniform(-0.3, 0.3, shape).astype(np.float32), tensor.name))
    power, report = onnxopt.optimize(model, passes=list(PIPELINE), validate=True, weight_bits=8, act_bits=8)
    assert report.passes[1].stats["exponent"] == 1.0 and report.passes[1].stats["emitted"] == "QDQ"
    assert not _custom_ops(power)


def test_cli_power_quant_at_exponent_one_writes_no_custom_op(tmp_path) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "pq1.onnx"
    onnx.save(conv_model(), str(src))
    assert cli_main([str(src), "-o", str(out), "--quantize", "w4a8", "--power-quant", "1.0", "-q"]) == 0
    written = onnx.load(str(out))
    assert not _custom_ops(written) and Counter(n.op_type for n in written.graph.node)["DequantizeLinear"] >= 3
