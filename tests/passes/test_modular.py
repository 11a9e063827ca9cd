"""modular-accumulator and `onnxopt analyze accumulators`: QDQ layers rewritten into
ModularConv/ModularMatMul; with a width ≥ the worst case the outputs equal the plain integer
model bit for bit; narrow widths wrap exactly like the numpy reference; the worst-case
bound matches an independent computation and is never exceeded by observed accumulators."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxopt
from onnxopt.analyze import accumulator_report
from onnxopt.cli import main as cli_main
from onnxopt.errors import NothingToDoError, PipelineError
from onnxopt.passes.modular import bits_for
from onnxopt.runtime_ops.schema import wrap_reference
from onnxopt.verify import run, session
from tests.passes.test_power_quant import conv_model

RNG = np.random.default_rng(5)


def quantized(w: int = 4, a: int = 4) -> onnx.ModelProto:
    model, _ = onnxopt.optimize(conv_model(with_bn=True), preset="quantize", weight_bits=w, act_bits=a, input_range=(-4.0, 4.0), first_last_bits=None,
                                unfused_conv_to_float=False)  # the last Conv writes the graph output: keep it integer
    return model


def samples(n: int = 6) -> dict[str, np.ndarray]:
    """n batches of the model's fixed batch size 2, stacked on axis 0."""
    return {"x": (RNG.standard_normal((2 * n, 3, 8, 8)) * 1.5).astype(np.float32)}


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return probe


def test_wide_accumulator_equals_the_plain_integer_model_bit_for_bit() -> None:
    q = quantized()
    plain, rep_plain = onnxopt.optimize(q, passes=["modular-accumulator"], validate=True, accumulator_bits=None)
    auto, rep_auto = onnxopt.optimize(q, passes=["modular-accumulator"], validate=True, accumulator_bits="auto")
    wide, _ = onnxopt.optimize(q, passes=["modular-accumulator"], validate=True, accumulator_bits=24)
    counts = Counter(n.op_type for n in auto.graph.node)
    assert counts["ModularConv"] == 2 and counts["ModularMatMul"] == 1 and counts["Conv"] == 0 and counts["Gemm"] == 0
    assert Counter(n.op_type for n in plain.graph.node)["ConvInteger"] == 2
    stats = rep_auto.passes[0].stats
    assert stats["layers_rewritten"] == 3 and stats["layers_may_overflow"] == 0
    assert [r["bits"] for r in stats["layers"]] == [r["required_bits"] for r in stats["layers"]]
    # stored weights: uint8 w + 128, zero point 128
    w = [numpy_helper.to_array(t) for t in auto.graph.initializer if t.name.endswith("_w_uint8")]
    assert len(w) == 3 and all(a.dtype == np.uint8 and 128 - 7 <= a.min() and a.max() <= 128 + 7 for a in w)
    for x in samples()["x"].reshape(-1, 2, 3, 8, 8):
        reference = run(plain, {"x": x})["y"]
        np.testing.assert_array_equal(run(auto, {"x": x})["y"], reference)
        np.testing.assert_array_equal(run(wide, {"x": x})["y"], reference)
    # and the integer model is the QDQ model's computation
    np.testing.assert_allclose(run(plain, {"x": x})["y"], run(q, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_narrow_accumulator_wraps_exactly_like_the_numpy_reference() -> None:
    q = quantized()
    plain, rep = onnxopt.optimize(q, passes=["modular-accumulator"], accumulator_bits=None)
    narrow, rep8 = onnxopt.optimize(q, passes=["modular-accumulator"], validate=True, accumulator_bits=8)
    first_plain, first_narrow = rep.passes[0].stats["layers"][0]["accumulator"], rep8.passes[0].stats["layers"][0]["accumulator"]
    assert rep8.passes[0].stats["layers_may_overflow"] == 3
    x = samples()["x"][:2]
    a = session(with_outputs(plain, [first_plain])).run([first_plain], {"x": x})[0]
    b = session(with_outputs(narrow, [first_narrow])).run([first_narrow], {"x": x})[0]
    assert (a != b).any() and b.min() >= -128 and b.max() <= 127
    np.testing.assert_array_equal(b, wrap_reference(a, 8))  # the first layer sees the same input


def test_worst_case_bound_is_independent_and_never_exceeded() -> None:
    q = quantized()
    records = accumulator_report(q, samples(), bits=[8, 12, 16])
    assert len(records) == 3
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    int8 = [v for k, v in inits.items() if v.dtype == np.int8]
    conv1 = next(v for v in int8 if v.shape[1:] == (3, 3, 3))
    bias1 = next(v for v in inits.values() if v.dtype == np.int32 and v.shape == (conv1.shape[0],))
    x_max = records[0]["x_max"]
    assert x_max == 7  # 4-bit signed input (input_range ±4): the Clip before QuantizeLinear
    manual = (np.abs(conv1.astype(np.int64)).reshape(conv1.shape[0], -1).sum(1) * x_max + np.abs(bias1)).max()
    assert records[0]["worst_case"] == manual and records[0]["required_bits"] == bits_for(int(manual))
    for r in records:
        assert r["observed_bits"] <= r["required_bits"]
        assert r["overflow_rate"][16] == 0.0 if r["required_bits"] <= 16 else True
        assert r["overflow_rate"][8] >= r["overflow_rate"][12] >= r["overflow_rate"][16]


def test_bits_for_is_the_signed_width() -> None:
    assert [bits_for(v) for v in (0, 1, 127, 128, 255, 256)] == [1, 2, 8, 9, 9, 10]


def test_refuses_float_layers_and_bad_options() -> None:
    # nothing to rewrite in a float model: a requested compression that changes nothing is an error naming why
    with pytest.raises(NothingToDoError, match=r"modular-accumulator rewrote nothing: input is not DequantizeLinear.*\(3x\)"):
        onnxopt.optimize(conv_model(with_bn=False), passes=["modular-accumulator"])
    for bad in (1, 40, "wide", True):
        with pytest.raises(PipelineError, match="accumulator_bits"):
            onnxopt.optimize(quantized(), passes=["modular-accumulator"], accumulator_bits=bad)


def test_cli_modular_accumulator_and_analyze(tmp_path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_model(), str(src))
    out = tmp_path / "mod.onnx"
    assert cli_main([str(src), "-o", str(out), "--quantize", "w4a4", "--input-range=-4,4", "--no-unfused-conv-float", "--modular-accumulator", "auto", "-q"]) == 0
    assert Counter(n.op_type for n in onnx.load(str(out)).graph.node)["ModularConv"] >= 1
    assert cli_main([str(src), "-o", str(out), "--modular-accumulator", "12", "-q"]) == 7  # needs --quantize
    assert cli_main([str(src), "-o", str(out), "--quantize", "w4a4", "--modular-accumulator", "wide", "-q"]) == 7
    qpath, npz, report = tmp_path / "q.onnx", tmp_path / "x.npz", tmp_path / "acc.json"
    onnx.save(quantized(), str(qpath))
    np.savez(npz, x=samples(2)["x"])
    assert cli_main(["analyze", "accumulators", str(qpath), "--inputs", str(npz), "--bits", "8", "--bits", "16", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert len(data["layers"]) == 3 and set(data["layers"][0]["overflow_rate"]) == {"8", "16"}
    assert cli_main(["analyze", "accumulators", str(src)]) == 7  # float model: nothing quantized
