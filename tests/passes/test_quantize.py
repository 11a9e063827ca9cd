"""quantize: the pass end to end on small text-format graphs (docs/quantization.md): QDQ
emission and the dtypes/parameters it writes, the options (bit-widths, input range, act_bits,
first/last layer bits, INT4 storage), bad options and calibration files, the emission guard,
calibration without BN, and bias correction.

Every test checks what was rewritten and compares numbers: the quantized models against FP32
and against an independent numpy fake-quant reference of docs/quantization.md.  Numerics are in
test_quantize_numerics.py, SPIQ in test_quantize_spiq.py, LayerNorm → MatMul layers in
test_quantize_layernorm.py, the real-model checks (ORT fusion, MobileNetV2 fidelity) in
test_quantize_models.py; the shared builders in quantize_builders.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, numpy_helper
from onnxopt.passes.common.emit import quantize_activation
from onnxopt.passes.common.numerics import ActivationQuant, checked_scales
from scipy.stats import norm

import onnxopt
from onnxopt.errors import InputDataError, NothingToDoError, PipelineError, ValidationError
from onnxopt.graph import NameFactory
from onnxopt.verify import run
from tests.conftest import text_model as model, ops, run_passes
from tests.passes.quantize_builders import (  # noqa: F401  (chain: a pytest fixture)
    HW,
    KEEP_QDQ,
    QUANTIZE,
    RNG,
    BnChain,
    C,
    bn,
    bn_params,
    chain,
    cosine,
    inits,
    intermediate,
    layer_params,
    nodes,
    plain_model,
    quantize_stats,
    relative_error,
    weights,
    with_data_statistics,
)


# =========================================================================== 1. end-to-end
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
    optimized, report = run_passes(proto, *QUANTIZE, spiq=True, **KEEP_QDQ)  # where SPIQ is possible (auto's choice is tested below)
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
    optimized, report = run_passes(proto, *QUANTIZE, input_range=(-3.0, 3.0), spiq=True, **KEEP_QDQ)
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


@pytest.mark.parametrize("spiq_on", [True, False], ids=["spiq", "per-tensor"])
def test_quantized_model_equals_an_independent_fake_quant_reference(chain: BnChain, spiq_on: bool) -> None:
    optimized, report = run_passes(chain.model, *QUANTIZE, spiq=spiq_on, **KEEP_QDQ)
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
            optimized, report = onnxopt.optimize(chain.model, preset="quantize", validate=True, weight_bits=bits, first_last_bits=None, **KEEP_QDQ)
        else:
            optimized, report = run_passes(chain.model, *QUANTIZE, weight_bits=bits, first_last_bits=None, **KEEP_QDQ)
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
    optimized, _ = run_passes(chain.model, *QUANTIZE, act_bits=4, weight_bits=8, **KEEP_QDQ)
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


# =========================================================================== 2. bias correction
@pytest.mark.parametrize("spiq_on", [True, False], ids=["spiq", "per-tensor"])
def test_bias_correction_removes_the_mean_output_shift(chain: BnChain, spiq_on: bool) -> None:
    x = chain.draw(512)  # 8192 positions per channel, drawn from the BN statistics' distribution
    reference = run(chain.model, {"x": x})["y"].astype(np.float64)
    shift = {}
    for corrected in (True, False):
        optimized, _ = run_passes(chain.model, *QUANTIZE, weight_bits=4, spiq=spiq_on, bias_correction=corrected, first_last_bits=None, **KEEP_QDQ)
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
    optimized, _ = run_passes(chain.model, *QUANTIZE, weight_bits=4, spiq=False, bias_correction=False, first_last_bits=None, **KEEP_QDQ)
    p = layer_params(optimized, "y")
    w_hat = p["w_codes"][:, :, 0, 0] * p["w_scale"][:, None].astype(np.float64)
    g = np.abs(chain.gamma.astype(np.float64))
    mu = chain.beta * norm.cdf(chain.beta / g) + g * norm.pdf(chain.beta / g)
    predicted = (w_hat - chain.w2) @ mu
    measured = (run(optimized, {"x": x})["y"].astype(np.float64) - run(chain.model, {"x": x})["y"]).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(measured, predicted, atol=0.1 * np.abs(predicted).max())


# =========================================================================== 3. bad inputs
def test_no_statistics_and_no_calibration_data_is_an_error() -> None:
    with pytest.raises(PipelineError) as info:
        run_passes(plain_model(), *QUANTIZE)
    message = str(info.value)
    assert "calibration" in message and "BatchNormalization" in message


def test_no_statistics_but_an_input_range_quantizes_only_the_first_layer() -> None:
    proto = plain_model()
    optimized, report = run_passes(proto, *QUANTIZE, input_range=(-4.0, 4.0), **KEEP_QDQ)
    stats, refusals = quantize_stats(report)
    assert stats["layers_quantized"] == 1 and stats["layers_float"] == 1
    assert any("no statistics for its input r" in r["reason"] for r in refusals)
    feeds = {"x": np.clip(RNG.standard_normal((2, 3, 8, 8)), -4, 4).astype(np.float32)}
    assert cosine(run(optimized, feeds)["y"], run(proto, feeds)["y"]) > 0.999
    # by default that layer goes back to float: its output r has no range, so no output
    # quantizer and ORT would run its QDQ form in float; then nothing is left, and the error says why
    with pytest.raises(NothingToDoError, match="0 of 2 layers quantized: 1 no statistics, 1 not fused by ORT"):
        run_passes(proto, *QUANTIZE, input_range=(-4.0, 4.0))


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
    assert quantize_stats(run_passes(proto, *QUANTIZE, **KEEP_QDQ)[1])[0]["layers_quantized"] == 1


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


# =========================================================================== 4. calibration
@pytest.mark.parametrize("mode", ["minmax", "percentile"])
def test_calibrated_quantization_without_bn(tmp_path: Path, mode: str) -> None:
    proto = plain_model()
    samples = RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "cal.npz"
    np.savez(path, x=samples)
    # spiq=True: with calibrated ranges "auto" stays per tensor (test_calibration.py)
    optimized, report = run_passes(proto, *QUANTIZE, act_ranges=mode, calibration_data=str(path), spiq=True, **KEEP_QDQ)
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
def test_outputs_quantized_counts_only_emitted_quantizers(tmp_path: Path) -> None:
    """Regression (fixed in 13b60a6): a layer output that is only a graph output got a Q→DQ
    nobody read (removed by cleanup) and was still counted in outputs_quantized."""
    proto = plain_model()
    path = tmp_path / "cal.npz"
    samples = RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.savez(path, x=samples)
    optimized, report = run_passes(proto, *QUANTIZE, act_ranges="minmax", calibration_data=str(path), **KEEP_QDQ)
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
    optimized, report = run_passes(proto, *QUANTIZE, act_ranges="minmax", calibration_data=str(path), **KEEP_QDQ)
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
    optimized, _ = run_passes(proto, *QUANTIZE, weight_bits=4, input_range=(-3.0, 3.0), first_last_bits=first_last_bits, **KEEP_QDQ)
    codes = {t.name: numpy_helper.to_array(t) for t in optimized.graph.initializer if t.data_type == TensorProto.INT8}
    conv_codes = []
    for node in (n for n in optimized.graph.node if n.op_type == "Conv"):
        dq = next(n for n in optimized.graph.node if n.output[0] == node.input[1])
        conv_codes.append(int(np.abs(codes[dq.input[0]]).max()))
    assert conv_codes == expected


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
        optimized, report = run_passes(proto, *QUANTIZE, weight_bits=4, first_last_bits=None, int4_weights=int4, **KEEP_QDQ)
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
