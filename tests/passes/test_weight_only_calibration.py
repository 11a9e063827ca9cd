"""weight-only with ``calibration_data``: the search's row weights E[x_k²] measured on the
samples (ONNX Runtime) replace the LayerNorm-derived ones; checked against numpy."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxopt.passes.weight_only.blockwise import quantize_blocks
from onnxopt.passes.weight_only.calibration import measured_row_weights, row_weights_for

import onnxopt
from onnxopt.cli import main as cli_main
from onnxopt.errors import InputDataError, PipelineError
from tests.passes.test_weight_only import (
    decoded_weight,
    heavy_tailed,
    nbits_nodes,
    run_ort,
)

K, FF, T = 64, 96, 5
EXACT = {"accuracy_level": 0}


def ln_mlp_model(with_mask: bool = False, batch: int | str = "batch") -> onnx.ModelProto:
    """x[B, T, K] ── LayerNorm ── MatMul(W1) ── Gelu ── MatMul(W2) ── y (and an unused
    attention_mask[B, T] input when ``with_mask``)."""
    rng = np.random.default_rng(3)
    arrays = {"g": rng.uniform(0.5, 2.0, K).astype(np.float32), "b": (rng.standard_normal(K) * 0.3).astype(np.float32),
              "W1": heavy_tailed(K, FF, seed=5), "W2": heavy_tailed(FF, K, seed=6)}
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "W1"], ["u"], name="up"),
             helper.make_node("Gelu", ["u"], ["a"], name="gelu"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, T, K])]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, [batch, T]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, T, K])],
                              [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model, full_check=True)
    return model


def numpy_activations(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """The LayerNorm output h and the Gelu output a, in float64 numpy."""
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    x = x.astype(np.float64)
    h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * p["g"] + p["b"]
    u = h @ p["W1"]
    erf = np.vectorize(math.erf)
    return {"h": h, "a": 0.5 * u * (1 + erf(u / math.sqrt(2)))}


def samples(count: int = 12, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((count, T, K)) * 2 + 0.5).astype(np.float32)


def layers_of(report) -> dict[str, dict]:
    return {r["layer"]: r for r in next(p for p in report.passes if p.name == "weight-only").stats["layers"]}


def test_measured_row_weights_match_numpy_and_drive_the_search(tmp_path):
    """ORT's E[x_k²] of each layer input equals numpy's; each layer is quantized exactly as
    quantize_blocks with the numpy E[x²]; the model's output matches x @ Ŵ."""
    model, x = ln_mlp_model(), samples()
    data = tmp_path / "cal.npz"
    np.savez(data, x=x)
    reference = {name: np.square(v).mean(axis=(0, 1)) for name, v in numpy_activations(model, x).items()}
    measured = measured_row_weights(model, ["h", "a"], {"x": x}, None)
    for name in ("h", "a"):
        np.testing.assert_allclose(measured[name], reference[name], rtol=2e-5)
    out, report = onnxopt.optimize(model, preset="weight-only", calibration_data=str(data), validate=True, **EXACT)
    records = layers_of(report)
    assert {r["row_weights"] for r in records.values()} == {"calibration"}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    decoded = {}
    for node in nbits_nodes(out):
        layer = "up" if node.input[0] == "h" else "down"
        weight = inits["W1" if layer == "up" else "W2"]
        expected = quantize_blocks(weight, 4, 32, row_weight=reference[node.input[0]].astype(np.float32)).dequantized()
        decoded[layer] = decoded_weight(out, node)
        np.testing.assert_allclose(decoded[layer], expected, rtol=1e-6, atol=1e-9)  # the same codes (one step is ~1e-2 relative); scales to the last bit
        assert not np.array_equal(decoded[layer], quantize_blocks(weight, 4, 32).dequantized())  # the weights did change the search
    evaluation = samples(3, seed=9)
    h = numpy_activations(model, evaluation)["h"]
    u = h @ decoded["up"]
    a = 0.5 * u * (1 + np.vectorize(math.erf)(u / math.sqrt(2)))
    np.testing.assert_allclose(run_ort(out, {"x": evaluation}), a @ decoded["down"], rtol=1e-4, atol=1e-4)


def test_token_mask_leaves_padding_out():
    """attention_mask (calibration_mask="auto") drops the positions where it is 0 from E[x²];
    "none" counts them."""
    model, x = ln_mlp_model(with_mask=True), samples()
    mask = (np.arange(T)[None, :] < np.random.default_rng(1).integers(1, T + 1, (len(x), 1))).astype(np.int64)
    feeds = {"x": x, "attention_mask": mask}
    a = numpy_activations(model, x)["a"]
    kept = a[mask.astype(bool)]
    np.testing.assert_allclose(measured_row_weights(model, ["a"], feeds, "attention_mask")["a"], np.square(kept).mean(0), rtol=2e-5)
    np.testing.assert_allclose(measured_row_weights(model, ["a"], feeds, None)["a"], np.square(a).mean((0, 1)), rtol=2e-5)


def test_report_names_the_row_weight_source(tmp_path):
    model = ln_mlp_model(with_mask=True)
    data = tmp_path / "cal.npz"
    np.savez(data, x=samples(), attention_mask=np.ones((12, T), np.int64))
    _, plain = onnxopt.optimize(model, preset="weight-only")
    assert {k: r["row_weights"] for k, r in layers_of(plain).items()} == {"up": "layernorm", "down": None}
    assert {k: r["weighted_by"] for k, r in layers_of(plain).items()} == {"up": "ln", "down": None}
    _, calibrated = onnxopt.optimize(model, preset="weight-only", calibration_data=str(data), rex_budget=0.5)
    stats = next(p for p in calibrated.passes if p.name == "weight-only").stats
    assert {k: r["row_weights"] for k, r in layers_of(calibrated).items()} == {"up": "calibration", "down": "calibration"}
    assert {k: r["weighted_by"] for k, r in layers_of(calibrated).items()} == {"up": "h", "down": "a"}
    assert stats["layers_row_weights"] == {"calibration": 2}
    assert stats["calibration_samples"] == 12 and stats["calibration_mask"] == "attention_mask"
    assert stats["rex_layers"] >= 1  # the residual order runs on the measured weights too


def test_without_calibration_nothing_changes():
    """No calibration_data: the output is deterministic (byte-identical across runs) and each
    layer keeps its data-free row weights (γ² + β² behind the LayerNorm, none elsewhere)."""
    model = ln_mlp_model()
    first, report = onnxopt.optimize(model, preset="weight-only")
    second, _ = onnxopt.optimize(model, preset="weight-only", norm_weighting=True)
    assert first.SerializeToString() == second.SerializeToString()
    g = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    b = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    up = next(n for n in nbits_nodes(first) if n.input[0] == "h")
    expected = quantize_blocks(numpy_helper.to_array(model.graph.initializer[2]), 4, 32, row_weight=(g * g + b * b).astype(np.float32))
    np.testing.assert_array_equal(decoded_weight(first, up), expected.dequantized())
    assert "calibration_samples" not in next(p for p in report.passes if p.name == "weight-only").stats


def test_fixed_batch_filler_samples_are_left_out(tmp_path):
    """A model with batch fixed to 4 and 6 samples: the second run repeats 2 samples, which
    do not count."""
    model, x = ln_mlp_model(batch=4), samples(6)
    measured = measured_row_weights(model, ["a"], {"x": x}, None)
    np.testing.assert_allclose(measured["a"], np.square(numpy_activations(model, x)["a"]).mean((0, 1)), rtol=2e-5)


def test_row_weights_for_layouts():
    real, tokens = np.array([1.0, 0.0]), np.array([[1, 1, 0], [1, 0, 0]], np.float64)
    assert row_weights_for(np.zeros((2, 3, 4)), real, tokens).tolist() == [1, 1, 0, 0, 0, 0]
    assert row_weights_for(np.zeros((6, 4)), real, tokens).tolist() == [1, 1, 0, 0, 0, 0]
    assert row_weights_for(np.zeros((2, 4)), real, None).tolist() == [1, 0]
    assert row_weights_for(np.zeros((3, 2, 4)), np.ones(2), tokens) is None  # not laid out [batch, tokens, K]
    assert row_weights_for(np.zeros((2, 3, 4)), np.ones(2), np.ones((2, 3))) is None


def test_bad_samples_and_options(tmp_path, capsys):
    model = ln_mlp_model()
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    good, nan, wrong = tmp_path / "good.npz", tmp_path / "nan.npz", tmp_path / "wrong.npz"
    np.savez(good, x=samples())
    bad = samples()
    bad[3, 1, 2] = np.nan
    np.savez(nan, x=bad)
    np.savez(wrong, x=samples()[..., :10])
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--calibration-data", str(good), "-q"]) == 0
    assert len(nbits_nodes(onnx.load(str(dst)))) == 2
    for path in (nan, wrong, tmp_path / "missing.npz"):
        assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--calibration-data", str(path), "-q"]) == 11
    assert cli_main([str(src), "-o", str(dst), "--calibration-data", str(good), "-q"]) == 7  # no --quantize
    with pytest.raises(InputDataError):
        onnxopt.optimize(model, preset="weight-only", calibration_data=str(nan))
    with pytest.raises(PipelineError):
        onnxopt.optimize(model, preset="weight-only", calibration_mask="attention_mask")  # no samples
    with pytest.raises(PipelineError, match="calibration_mask"):
        onnxopt.optimize(model, preset="weight-only", calibration_data=str(good), calibration_mask="mask")  # no such input
