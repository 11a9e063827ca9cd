"""equalize (DFQ cross-layer equalization): exactness in ORT, balanced ranges, ReLU6 as
Relu + per-channel Min, refusals with reasons, BN statistics rescaled for quantize, the dfq
preset.  Small text-format graphs; every rewritten model is checked with onnx.checker
(full_check, via validate=True) and compared with the original in ORT (rtol 1e-5)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.errors import NothingToDoError
from onnxopt.passes import equalize as equalize_module
from onnxopt.passes.common.statistics import read_bn_statistics
from onnxopt.verify import run
from tests.conftest import assert_equivalent, initializers, ops, text_model
from tests.passes.quantize_builders import bn, cosine, with_data_statistics

RNG = np.random.default_rng(20250115)
PREFIX = ("eliminate-identity", "fold-constants", "fold-batchnorm")


def spread_rows(shape: tuple[int, ...], spread: float = 2.0) -> np.ndarray:
    """Random weights whose output channels (axis 0) have ranges over ~e^±spread."""
    w = RNG.standard_normal(shape) * np.exp(RNG.uniform(-spread, spread, shape[0])).reshape(-1, *([1] * (len(shape) - 1)))
    return w.astype(np.float32)


def spread_columns(shape: tuple[int, ...], spread: float = 2.0) -> np.ndarray:
    w = RNG.standard_normal(shape) * np.exp(RNG.uniform(-spread, spread, shape[1])).reshape(1, -1, *([1] * (len(shape) - 2)))
    return w.astype(np.float32)


def equalize(model: onnx.ModelProto, **options):
    optimized, report = onnxopt.optimize(model, passes=["equalize"], validate=True, **options)
    (entry,) = [p for p in report.passes if p.name == "equalize"]
    return optimized, entry


def refusals(model: onnx.ModelProto) -> list[str]:
    _, report = onnxopt.optimize(model, passes=["equalize"], allow_no_op=True)
    (entry,) = [p for p in report.passes if p.name == "equalize"]
    assert not entry.modified
    return [f"{r.subject}: {r.reason}" for r in entry.refusals]


def row_range(w: np.ndarray) -> np.ndarray:
    return np.abs(w.reshape(w.shape[0], -1)).max(axis=1)


def column_range(w: np.ndarray) -> np.ndarray:
    return np.abs(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)).max(axis=1)


# --------------------------------------------------------------------------- models
def conv_relu_conv() -> onnx.ModelProto:
    arrays = {"w1": spread_rows((8, 3, 3, 3)), "b1": RNG.normal(0, 1, 8).astype(np.float32),
              "w2": spread_columns((5, 8, 3, 3)), "b2": RNG.normal(0, 1, 5).astype(np.float32)}
    body = ["a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)", "r = Relu(a)", "y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)"]
    return text_model("(float[2, 3, 9, 9] x) => (float[2, 5, 9, 9] y)", body, arrays)


def depthwise_chain(clip: bool = True) -> onnx.ModelProto:
    """MobileNetV2's block: 1×1 expand → ReLU6 → 3×3 depthwise → ReLU6 → 1×1 project."""
    arrays = {"we": spread_rows((12, 4, 1, 1)), "be": RNG.normal(1, 1, 12).astype(np.float32),
              "wd": spread_rows((12, 1, 3, 3)), "bd": RNG.normal(1, 1, 12).astype(np.float32),
              "wp": spread_columns((6, 12, 1, 1)), "bp": RNG.normal(0, 1, 6).astype(np.float32),
              "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}
    act = "Clip(e, lo, hi)" if clip else "Relu(e)"
    act2 = "Clip(d, lo, hi)" if clip else "Relu(d)"
    body = ["e = Conv(x, we, be)", f"er = {act}", "d = Conv <group = 12, pads = [1, 1, 1, 1]> (er, wd, bd)", f"dr = {act2}", "y = Conv(dr, wp, bp)"]
    return text_model("(float[2, 4, 8, 8] x) => (float[2, 6, 8, 8] y)", body, arrays)


def dense_chain() -> onnx.ModelProto:
    """Gemm(transB) → Relu → Gemm → LeakyRelu → MatMul → Add(bias) → Relu → Gemm(transB)."""
    arrays = {"g1": spread_rows((16, 10)), "c1": RNG.normal(0, 1, 16).astype(np.float32),
              "g2": spread_rows((12, 16)).T.copy(), "c2": RNG.normal(0, 1, (1, 12)).astype(np.float32),
              "m3": spread_rows((9, 12)).T.copy(), "c3": RNG.normal(0, 1, 9).astype(np.float32),
              "g4": spread_columns((4, 9)), "c4": RNG.normal(0, 1, 4).astype(np.float32)}
    body = ["a = Gemm <transB = 1> (x, g1, c1)", "ar = Relu(a)", "b = Gemm(ar, g2, c2)", "br = LeakyRelu <alpha = 0.1> (b)",
            "p = MatMul(br, m3)", "c = Add(p, c3)", "cr = Relu(c)", "y = Gemm <transB = 1> (cr, g4, c4)"]
    return text_model("(float[5, 10] x) => (float[5, 4] y)", body, arrays)


def feeds(model: onnx.ModelProto, scale: float = 1.0) -> dict[str, np.ndarray]:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": (RNG.standard_normal(shape) * scale).astype(np.float32)}


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("builder, pairs", [(conv_relu_conv, 1), (depthwise_chain, 2), (dense_chain, 3)], ids=["conv-relu-conv", "depthwise-chain", "gemm-chain"])
def test_equalization_is_exact_in_ort(builder, pairs: int) -> None:
    model = builder()
    optimized, entry = equalize(model)
    assert entry.stats["pairs_equalized"] == pairs and entry.stats["converged"]
    before, after = initializers(model), initializers(optimized)
    first = {"conv-relu-conv": "w1", "depthwise-chain": "we", "gemm-chain": "g1"}
    name = next(k for k in first.values() if k in before)
    assert not np.allclose(before[name], after[name]), "the first layer was not rescaled"
    for scale in (1.0, 10.0):  # 10: the ReLU6 clips bind
        assert_equivalent(model, optimized, inputs=feeds(model, scale))


def test_conv_pair_ranges_become_equal_sqrt_of_the_product() -> None:
    model = conv_relu_conv()
    optimized, _ = equalize(model)
    before, after = initializers(model), initializers(optimized)
    r1, r2 = row_range(before["w1"]), column_range(before["w2"])
    np.testing.assert_allclose(row_range(after["w1"]), np.sqrt(r1 * r2), rtol=1e-5)
    np.testing.assert_allclose(column_range(after["w2"]), np.sqrt(r1 * r2), rtol=1e-5)
    s = np.sqrt(r1 * r2) / r2  # DFQ's s_c: the bias follows the row
    np.testing.assert_allclose(after["b1"], before["b1"] / s, rtol=1e-5)
    np.testing.assert_array_equal(after["b2"], before["b2"])


def test_chain_ranges_are_balanced_after_the_sweeps() -> None:
    model = depthwise_chain()
    optimized, entry = equalize(model, tolerance=1e-6)
    assert entry.stats["sweeps"] > 1  # a chain needs several sweeps
    w = initializers(optimized)
    # pair (expand, depthwise): expand rows vs depthwise kernels; pair (depthwise, project): kernels vs project columns
    np.testing.assert_allclose(row_range(w["we"]), row_range(w["wd"]), rtol=1e-4)
    np.testing.assert_allclose(row_range(w["wd"]), column_range(w["wp"]), rtol=1e-4)
    spread_before = row_range(initializers(model)["wd"])
    assert np.ptp(np.log(row_range(w["wd"]))) < np.ptp(np.log(spread_before))


def test_dense_chain_balances_gemm_and_matmul_ranges() -> None:
    model = dense_chain()
    optimized, _ = equalize(model, tolerance=1e-7)
    w = initializers(optimized)
    # Gemm transB=1 rows = outputs; Gemm transB=0 / MatMul: columns = outputs, rows = inputs
    np.testing.assert_allclose(np.abs(w["g1"]).max(axis=1), np.abs(w["g2"]).max(axis=1), rtol=1e-4)
    np.testing.assert_allclose(np.abs(w["g2"]).max(axis=0), np.abs(w["m3"]).max(axis=1), rtol=1e-4)
    np.testing.assert_allclose(np.abs(w["m3"]).max(axis=0), np.abs(w["g4"]).max(axis=0), rtol=1e-4)
    assert w["c2"].shape == (1, 12)


# --------------------------------------------------------------------------- ReLU6
def test_relu6_becomes_relu_and_a_per_channel_min_at_6_over_s() -> None:
    model = depthwise_chain(clip=True)
    optimized, entry = equalize(model)
    assert entry.stats["clips_rewritten"] == 2
    counts = ops(optimized)
    assert counts["Clip"] == 0 and counts["Relu"] == 2 and counts["Min"] == 2
    before, after = initializers(model), initializers(optimized)
    s_expand = row_range(before["we"]) / row_range(after["we"])  # expand rows were divided by s
    producers = {o: n for n in optimized.graph.node for o in n.output}
    min_node = producers["er"]
    assert min_node.op_type == "Min" and producers[min_node.input[0]].op_type == "Relu"
    bound = after[min_node.input[1]]
    assert bound.shape == (12, 1, 1)
    np.testing.assert_allclose(bound.reshape(-1), 6.0 / s_expand, rtol=1e-5)
    assert_equivalent(model, optimized, inputs=feeds(model, 10.0))


def test_equalizing_twice_keeps_the_min_and_rescales_its_bound() -> None:
    model = depthwise_chain(clip=True)
    once, _ = equalize(model, max_sweeps=2)
    twice, entry = equalize(once)
    assert entry.stats["pairs_equalized"] == 2 and entry.stats["clips_rewritten"] == 0
    assert ops(twice)["Min"] == 2
    assert_equivalent(model, twice, inputs=feeds(model, 10.0))


# --------------------------------------------------------------------------- refusals
def test_non_constant_weight_is_refused() -> None:
    arrays = {"w1": spread_rows((8, 3, 1, 1))}
    body = ["a = Conv(x, w1)", "r = Relu(a)", "y = Conv(r, w2)"]
    model = text_model("(float[1, 3, 4, 4] x, float[5, 8, 1, 1] w2) => (float[1, 5, 4, 4] y)", body, arrays)
    reasons = refusals(model)
    assert any("weight is not an initializer" in r for r in reasons), reasons


def test_sigmoid_between_layers_is_refused_as_not_homogeneous() -> None:
    model = conv_relu_conv()
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Sigmoid"
    reasons = refusals(model)
    assert any("Sigmoid" in r and "not positively homogeneous" in r for r in reasons), reasons


def test_tensor_with_a_non_layer_reader_is_refused() -> None:
    arrays = {"w1": spread_rows((8, 3, 1, 1)), "w2": spread_columns((8, 8, 1, 1))}
    body = ["a = Conv(x, w1)", "r = Relu(a)", "c = Conv(r, w2)", "y = Add(c, r)"]
    model = text_model("(float[1, 3, 4, 4] x) => (float[1, 8, 4, 4] y)", body, arrays)
    reasons = refusals(model)
    assert any("r has several readers, not all layers (Add, Conv)" in r for r in reasons), reasons


def test_several_layer_readers_share_the_scales() -> None:
    arrays = {"w1": spread_rows((8, 3, 1, 1)), "w2": spread_columns((5, 8, 1, 1)), "w3": spread_columns((4, 8, 3, 3))}
    body = ["a = Conv(x, w1)", "r = Relu(a)", "c = Conv(r, w2)", "d = Conv <pads = [1, 1, 1, 1]> (r, w3)", "y = Concat <axis = 1> (c, d)"]
    model = text_model("(float[1, 3, 4, 4] x) => (float[1, 9, 4, 4] y)", body, arrays)
    optimized, entry = equalize(model)
    assert entry.stats["pairs_equalized"] == 1 and len(entry.stats["pairs"][0]["consumers"]) == 2
    w = initializers(optimized)
    np.testing.assert_allclose(row_range(w["w1"]), np.maximum(column_range(w["w2"]), column_range(w["w3"])), rtol=1e-5)
    assert_equivalent(model, optimized, inputs=feeds(model))


def test_graph_output_on_the_path_is_refused() -> None:
    arrays = {"w1": spread_rows((8, 3, 1, 1)), "w2": spread_columns((5, 8, 1, 1))}
    body = ["a = Conv(x, w1)", "r = Relu(a)", "y = Conv(r, w2)"]
    model = text_model("(float[1, 3, 4, 4] x) => (float[1, 5, 4, 4] y, float[1, 8, 4, 4] r)", body, arrays)
    reasons = refusals(model)
    assert any("r is a graph output" in r for r in reasons), reasons


def test_nothing_equalized_is_an_error_naming_the_reason() -> None:
    model = conv_relu_conv()
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Tanh"
    with pytest.raises(NothingToDoError, match="Tanh .* not positively homogeneous"):
        onnxopt.optimize(model, passes=["equalize"])


# --------------------------------------------------------------------------- statistics and quantize
def bn_block_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Conv → BN → Relu → Conv → BN → ReLU6 → depthwise → BN → ReLU6 → Conv, with BN
    statistics measured on the data and γ spread over two decades (unbalanced channels)."""
    rng = np.random.default_rng(2)  # its own generator: the same model whichever tests run
    c = 8
    arrays: dict[str, np.ndarray] = {
        "w0": rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.5, "w1": rng.standard_normal((c, c, 1, 1)).astype(np.float32) * 0.5,
        "wd": rng.standard_normal((c, 1, 3, 3)).astype(np.float32) * 0.5, "w3": rng.standard_normal((5, c, 1, 1)).astype(np.float32) * 0.5,
        "lo": np.array(0, np.float32), "hi": np.array(6, np.float32),
    }
    for prefix in ("n0", "n1", "nd"):
        arrays.update({f"{prefix}_g": np.exp(rng.uniform(np.log(0.05), np.log(5.0), c)).astype(np.float32),
                       f"{prefix}_b": rng.normal(0.5, 1.0, c).astype(np.float32),
                       f"{prefix}_m": np.zeros(c, np.float32), f"{prefix}_v": np.ones(c, np.float32)})
    body = ["a = Conv <pads = [1, 1, 1, 1]> (x, w0)", bn("n0", "a", "an"), "ar = Relu(an)", "b = Conv(ar, w1)", bn("n1", "b", "bn"),
            "br = Clip(bn, lo, hi)", "d = Conv <group = 8, pads = [1, 1, 1, 1]> (br, wd)", bn("nd", "d", "dn"), "dr = Clip(dn, lo, hi)", "y = Conv(dr, w3)"]
    model = text_model(f"(float[N, 3, 8, 8] x) => (float[N, 5, 8, 8] y)", body, arrays)
    data = {"x": rng.standard_normal((64, 3, 8, 8)).astype(np.float32)}
    return with_data_statistics(model, data), data


def test_kept_bn_statistics_are_divided_by_s() -> None:
    model, _ = bn_block_model()
    folded, _ = onnxopt.optimize(model, passes=list(PREFIX), validate=True)
    equalized, report = onnxopt.optimize(model, passes=[*PREFIX, "equalize"], validate=True)
    (entry,) = [p for p in report.passes if p.name == "equalize"]
    assert entry.stats["statistics_rescaled"] == 3
    before, after = read_bn_statistics(folded), read_bn_statistics(equalized)
    w_before, w_after = initializers(folded), initializers(equalized)
    producers = {o: n for n in equalized.graph.node for o in n.output}
    for tensor in before:  # the tensor each folded BN now writes: its producer's bias was divided by s
        layer = producers[tensor]
        s = w_before[layer.input[2]] / w_after[layer.input[2]]  # (a depthwise's rows also took the previous pair's s)
        assert np.all(s > 0)
        assert not np.allclose(s, 1.0)
        np.testing.assert_allclose(after[tensor]["mean"], np.asarray(before[tensor]["mean"]) / s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(after[tensor]["std"], np.asarray(before[tensor]["std"]) / s, rtol=1e-5)


#: bn_block_model's last Conv writes the graph output, which ORT does not fuse: keep it QDQ so
#: that all four layers are quantized and the equalized ranges are exercised end to end
KEEP_QDQ = {"unfused_conv_to_float": False}


def quantized_cosine(model: onnx.ModelProto, data: dict[str, np.ndarray], passes: list[str], **options) -> float:
    optimized, report = onnxopt.optimize(model, passes=passes, validate=True, input_range=(-4.5, 4.5), **KEEP_QDQ, **options)
    (entry,) = [p for p in report.passes if p.name == "quantize"]
    assert entry.stats["layers_quantized"] == 4
    return cosine(run(optimized, data)["y"], run(model, data)["y"])


@pytest.mark.parametrize("spiq", [False, True], ids=["per-tensor", "spiq"])
def test_quantize_after_equalize_stays_accurate_at_w8a8(spiq: bool) -> None:
    model, data = bn_block_model()
    assert quantized_cosine(model, data, [*PREFIX, "equalize", "quantize"], spiq=spiq) > 0.99


def test_without_the_rescaled_statistics_quantize_would_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counterfactual: equalize without updating the statistics misleads quantize's ranges."""
    model, data = bn_block_model()
    good = quantized_cosine(model, data, [*PREFIX, "equalize", "quantize"], spiq=False)
    monkeypatch.setattr(equalize_module, "rescale_statistics", lambda metadata, pairs: 0)
    stale = quantized_cosine(model, data, [*PREFIX, "equalize", "quantize"], spiq=False)
    assert 1 - stale > 10 * (1 - good), (stale, good)


def test_spiq_folds_its_scales_through_the_per_channel_min() -> None:
    model, data = bn_block_model()
    optimized, report = onnxopt.optimize(model, passes=[*PREFIX, "equalize", "quantize"], validate=True, spiq=True, input_range=(-4.5, 4.5), **KEEP_QDQ)
    (entry,) = [p for p in report.passes if p.name == "quantize"]
    assert entry.stats["spiq_coverage"] > 0.5
    assert ops(optimized)["Min"] == 2
    assert cosine(run(optimized, data)["y"], run(model, data)["y"]) > 0.99


def test_dfq_preset_turns_spiq_off_unless_asked() -> None:
    model, _ = bn_block_model()
    _, report = onnxopt.optimize(model, preset="dfq", input_range=(-4.5, 4.5), **KEEP_QDQ)
    names = [p.name for p in report.passes]
    assert names.index("fold-batchnorm") < names.index("equalize") < names.index("quantize")
    (entry,) = [p for p in report.passes if p.name == "quantize"]
    assert entry.stats["spiq_coverage"] == 0.0
    _, report = onnxopt.optimize(model, preset="dfq", spiq=True, input_range=(-4.5, 4.5), **KEEP_QDQ)
    (entry,) = [p for p in report.passes if p.name == "quantize"]
    assert entry.stats["spiq_coverage"] > 0.0


def test_equalize_must_run_before_quantize() -> None:
    from onnxopt.errors import PipelineError

    with pytest.raises(PipelineError, match="equalize"):
        onnxopt.optimize(conv_relu_conv(), passes=["quantize", "equalize"])


# --------------------------------------------------------------------------- high-bias absorption
def absorb(model: onnx.ModelProto, *passes: str, **options):
    optimized, report = onnxopt.optimize(model, passes=[*PREFIX, *passes, "absorb-high-bias"], validate=True, allow_no_op=True, **options)
    (entry,) = [p for p in report.passes if p.name == "absorb-high-bias"]
    return optimized, entry


def test_high_bias_moves_into_the_next_layer_and_stays_exact_above_the_threshold() -> None:
    model, data = bn_block_model()
    folded, _ = onnxopt.optimize(model, passes=[*PREFIX, "equalize"], validate=True)
    optimized, entry = absorb(model, "equalize", sigmas=6.0)  # the data stay above β − 6|γ|: exact on them
    assert entry.stats["pairs_absorbed"] >= 1 and "Conv->d" in [p["producer"] for p in entry.stats["pairs"]]  # depthwise → w3
    before, after = initializers(folded), initializers(optimized)
    stats = read_bn_statistics(folded)
    producers = {o: n for n in optimized.graph.node for o in n.output}
    (dw,) = [n for n in optimized.graph.node if n.op_type == "Conv" and any(a.name == "group" for a in n.attribute)]
    entry_dw = stats[dw.output[0]]
    shift = np.maximum(0, np.asarray(entry_dw["mean"]) - 6 * np.asarray(entry_dw["std"]))
    bound_node = producers["dr"]
    shift = np.minimum(shift, before[bound_node.input[1]].reshape(-1))
    assert np.any(shift > 0)
    np.testing.assert_allclose(after[dw.input[2]], before[dw.input[2]] - shift, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after[bound_node.input[1]].reshape(-1), before[bound_node.input[1]].reshape(-1) - shift, rtol=1e-5, atol=1e-5)
    (last,) = [n for n in optimized.graph.node if n.output[0] == "y"]
    w3 = before[last.input[1]].reshape(5, -1)
    np.testing.assert_allclose(after[last.input[2]], before.get(last.input[2], np.zeros(5)) + w3 @ shift, rtol=1e-4, atol=1e-4)
    assert_equivalent(model, optimized, inputs=data)
    kept = read_bn_statistics(optimized)[dw.output[0]]
    np.testing.assert_allclose(kept["mean"], np.asarray(entry_dw["mean"]) - shift, rtol=1e-5, atol=1e-5)


def test_high_bias_refuses_a_padded_reader_and_an_unrewritten_relu6() -> None:
    model, _ = bn_block_model()
    _, entry = absorb(model)  # no equalize: the ReLU6 are still Clips
    reasons = [r.reason for r in entry.refusals]
    assert any("run equalize first" in r for r in reasons), reasons
    _, entry = absorb(model, "equalize")
    reasons = [r.reason for r in entry.refusals]
    assert any("Conv" in r and "zero padding: the shift is not exact at the borders" in r for r in reasons), reasons


def test_dfq_preset_runs_both_passes_and_quantizes_accurately() -> None:
    model, data = bn_block_model()
    optimized, report = onnxopt.optimize(model, preset="dfq", validate=True, input_range=(-4.5, 4.5))
    names = [p.name for p in report.passes]
    assert names.index("equalize") < names.index("absorb-high-bias") < names.index("quantize")
    assert cosine(run(optimized, data)["y"], run(model, data)["y"]) > 0.99
