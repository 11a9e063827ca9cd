"""quantize and fold-batchnorm inside If/Loop bodies (issue 14): what is rewritten in the
bodies, that ORT fuses it there, and that the outputs still match the float model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

import onnxopt
from onnxopt.passes.common.measured_ranges import calibrated_ranges, expose_tensors
from onnxopt.passes.quantize.fusion import ort_optimized_graph
from onnxopt.verify import run
from tests.passes.control_flow_builders import if_cnn, loop_mlp

RNG = np.random.default_rng(1415)


def images(n: int) -> np.ndarray:
    return RNG.standard_normal((n, 3, 8, 8)).astype(np.float32)


def body_ops(model: onnx.ModelProto) -> dict[str, Counter]:
    """Op counts per body of the main graph's control-flow node(s), keyed by body name."""
    return {attr.g.name: Counter(n.op_type for n in attr.g.node) for node in model.graph.node for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH}


def ort_body_ops(model: onnx.ModelProto) -> dict[str, Counter]:
    return body_ops(ort_optimized_graph(model))


def quantize_stats(report) -> dict:
    return next(p for p in report.to_dict()["passes"] if p["name"] == "quantize")["stats"]


def assert_close(quantized: onnx.ModelProto, original: onnx.ModelProto, feeds: dict[str, np.ndarray], tolerance: float) -> None:
    """Max abs error below ``tolerance`` × the float output's max, and the outputs differ (quantized)."""
    a, b = run(quantized, feeds)["y"], run(original, feeds)["y"]
    error = float(np.abs(a - b).max())
    assert 0 < error < tolerance * float(np.abs(b).max()), error


# --------------------------------------------------------------------------- fold-batchnorm
def test_bn_folds_inside_both_if_branches_exactly() -> None:
    proto = if_cnn()
    folded, report = onnxopt.optimize(proto, passes=["fold-batchnorm"], validate=True)
    stats = next(p for p in report.to_dict()["passes"] if p["name"] == "fold-batchnorm")["stats"]
    assert stats["bn_folded"] == 4 and stats["bn_kept"] == 0
    assert sorted((f["bn"], f["body"], f["roots"][0]) for f in stats["folds"]) == [
        ("else_bn1", "else", "else_conv1"), ("else_bn2", "else", "else_conv2"), ("then_bn1", "then", "then_conv1"), ("then_bn2", "then", "then_conv2")]
    for ops in body_ops(folded).values():
        assert "BatchNormalization" not in ops and ops["Conv"] == 2
    onnx.checker.check_model(folded, full_check=True)
    x = {"x": images(4)}
    a, b = run(folded, x)["y"], run(proto, x)["y"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    statistics = onnxopt.passes.common.statistics.read_bn_statistics(folded)
    assert {"then_c1", "then_c2", "else_c1", "else_c2"} <= set(statistics)


def test_bn_fold_in_a_body_never_reaches_into_the_enclosing_graph() -> None:
    """A body BN reading a Conv output of the main graph: folding it backward would rescale a
    tensor of the enclosing graph; refused with the reason, the outputs unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    arrays = {"w": (RNG.standard_normal((4, 3, 3, 3)) * 0.4).astype(np.float32), "g": np.full(4, 1.5, np.float32),
              "b": np.full(4, 0.2, np.float32), "m": np.full(4, 0.1, np.float32), "v": np.full(4, 2.0, np.float32)}

    def branch(tag: str) -> onnx.GraphProto:
        nodes = [helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], [f"{tag}_n"], name=f"{tag}_bn"),
                 helper.make_node("Relu", [f"{tag}_n"], [f"{tag}_y"])]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, None)])

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("ReduceMax", ["x"], ["m_x"], keepdims=0),
             helper.make_node("Greater", ["m_x", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in arrays.items()] + [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    folded, report = onnxopt.optimize(proto, passes=["fold-batchnorm"], validate=True)
    entry = next(p for p in report.to_dict()["passes"] if p["name"] == "fold-batchnorm")
    assert entry["stats"]["bn_folded"] == 0 and entry["stats"]["bn_kept"] == 2
    assert any("computed in the graph enclosing this If/Loop/Scan body" in r["reason"] for r in entry["refusals"])
    x = {"x": images(3)}
    np.testing.assert_array_equal(run(folded, x)["y"], run(proto, x)["y"])


# --------------------------------------------------------------------------- quantize in If
def test_if_branches_quantized_data_free_from_body_bn_statistics() -> None:
    proto = if_cnn()
    quantized, report = onnxopt.optimize(proto, preset="quantize", validate=True, input_range=(-4.0, 4.0))
    stats = quantize_stats(report)
    assert stats["layers_quantized"] == 6 and stats["layers_in_bodies"] == 6
    assert stats["fused_by_ort"] == {"QLinearConv": 4, "QGemm": 2} and stats["not_fused"] == []
    for ops in body_ops(quantized).values():  # the Q/DQ sit in the branches, beside the layers
        assert ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] >= 6 and "BatchNormalization" not in ops
    for ops in ort_body_ops(quantized).values():
        assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1 and "Conv" not in ops
    onnx.checker.check_model(quantized, full_check=True)
    assert_close(quantized, proto, {"x": images(8)}, 0.05)


def test_if_branches_quantized_with_calibration_data_including_the_branch_never_taken(tmp_path) -> None:
    """The condition is always true on the samples: the else branch is calibrated on the same
    samples with the condition forced (and says so)."""
    proto = if_cnn()
    np.savez(tmp_path / "cal.npz", x=images(10))
    quantized, report = onnxopt.optimize(proto, preset="quantize", validate=True, act_ranges="minmax", calibration_data=str(tmp_path / "cal.npz"))
    stats = quantize_stats(report)
    assert stats["layers_quantized"] == 6 and stats["fused_by_ort"] == {"QLinearConv": 4, "QGemm": 2}
    assert stats["calibration_forced_branch_tensors"] >= 3
    assert report.to_dict()["coverage"]["quantize"]["done"] == 6
    onnx.checker.check_model(quantized, full_check=True)
    assert_close(quantized, proto, {"x": images(8)}, 0.03)


def test_calibration_threads_body_tensors_out_of_if_and_loop() -> None:
    proto = if_cnn()
    probe, sources = expose_tensors(proto, ["then_r1", "else_r1", "x"])
    assert sources["x"] == [("x", 0)] and [depth for _, depth in sources["then_r1"]] == [0]
    assert len(probe.graph.output) == 4 and len(probe.graph.node[2].output) == 3  # y + one per branch tensor
    x = images(5)
    ranges = calibrated_ranges(proto, ["then_r1", "else_r1"], {"x": x}, "minmax")
    assert not ranges["then_r1"].forced_branch and ranges["else_r1"].forced_branch
    assert ranges["then_r1"].channels == 16 and np.all(ranges["then_r1"].lo >= 0)

    loop = loop_mlp()
    h = np.abs(RNG.standard_normal((6, 16))).astype(np.float32)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in loop.graph.initializer}
    states = [h]
    for _ in range(3):
        states.append(np.maximum(states[-1] @ weights["w"] + weights["bias"], 0))
    ranges = calibrated_ranges(loop, ["h_in", "h_out"], {"x": h}, "minmax")
    _, sources = expose_tensors(loop, ["h_in"])
    assert [depth for _, depth in sources["h_in"]] == [1]  # a scan output: iterations stacked in front
    for name, seen in (("h_in", states[:3]), ("h_out", states[1:])):
        np.testing.assert_allclose(ranges[name].lo, np.min(seen, axis=(0, 1)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ranges[name].hi, np.max(seen, axis=(0, 1)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- quantize in Loop
def test_loop_body_matmul_quantized_with_calibration_data(tmp_path) -> None:
    proto = loop_mlp()
    np.savez(tmp_path / "cal.npz", x=np.abs(RNG.standard_normal((10, 16))).astype(np.float32))
    quantized, report = onnxopt.optimize(proto, preset="quantize", validate=True, act_ranges="minmax", calibration_data=str(tmp_path / "cal.npz"))
    stats = quantize_stats(report)
    assert stats["layers_quantized"] == 1 and stats["layers_in_bodies"] == 1
    assert stats["fused_by_ort"] == {"QLinearMatMul": 1}
    ops = body_ops(quantized)["body"]
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 3 and ops["MatMul"] == 1
    onnx.checker.check_model(quantized, full_check=True)
    x = {"x": np.abs(RNG.standard_normal((4, 16))).astype(np.float32)}
    assert_close(quantized, proto, x, 0.03)


# --------------------------------------------------------------------------- unfused Conv back to float
def test_a_conv_whose_output_is_a_graph_output_goes_back_to_float() -> None:
    """The last Conv writes a graph output (no output quantizer): ORT would run its QDQ form
    in float, so it is put back in float (unfused_conv_to_float, the default) with its original bias,
    counted with the reason, and the Conv before it keeps its fusion."""
    from tests.conftest import bn_line, text_model

    arrays = {"w1": (RNG.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "b1": np.zeros(8, np.float32),
              "w2": (RNG.standard_normal((4, 8, 1, 1)) * 0.4).astype(np.float32), "b2": np.full(4, 0.25, np.float32),
              "bn_g": np.ones(8, np.float32), "bn_b": np.full(8, 0.5, np.float32), "bn_m": np.zeros(8, np.float32), "bn_v": np.ones(8, np.float32)}
    body = ["c = Conv <pads = [1,1,1,1]> (x, w1, b1)", bn_line("bn", "c", "n"), "r = Relu(n)", "y = Conv(r, w2, b2)"]
    proto = text_model("(float[N,3,8,8] x) => (float[N,4,8,8] y)", body, arrays)
    quantized, report = onnxopt.optimize(proto, preset="quantize", validate=True, input_range=(-3.0, 3.0))
    stats = quantize_stats(report)
    coverage = report.to_dict()["coverage"]["quantize"]
    assert (coverage["done"], coverage["reasons"]) == (1, {"not fused by ORT": 1})
    assert stats["fused_by_ort"] == {"QLinearConv": 1} and stats["not_fused"] == []
    last = next(n for n in quantized.graph.node if n.op_type == "Conv" and n.output[0] == "y")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    assert last.input[1] in inits and last.input[2] in inits  # float weight and bias, no DequantizeLinear
    np.testing.assert_array_equal(inits[last.input[2]], arrays["b2"])  # the bias before bias correction
    x = {"x": np.clip(images(4), -3, 3)}  # inside the given input range
    a, b = run(quantized, x)["y"], run(proto, x)["y"]
    assert 0 < np.abs(a - b).max() < 0.03 * np.abs(b).max()
