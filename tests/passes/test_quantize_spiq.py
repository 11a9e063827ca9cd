"""SPIQ (static per-channel scale folding, docs/quantization.md): the float rewrite is exact
before rounding (checked in ORT, rtol 1e-5) on Conv/Gemm/depthwise/ReLU6/pooled chains; the plan
refuses, with a reason and without touching the graph, where the scales cannot be folded; the
ratios; the data-free error estimate spiq='auto' decides with (against a Monte-Carlo
measurement, ConvTranspose readers included) and the ReLU6-before-average regression.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnxopt.passes.quantize import spiq
from onnxopt.passes.common.numerics import dequantize_weight, quantize_weight

from onnxopt.graph import NameFactory, cleanup, export_model, import_graph, with_inferred_shapes
from onnxopt.verify import run, verify
from tests.conftest import text_model as model, ops, run_passes
from tests.passes.quantize_builders import (
    KEEP_QDQ,
    QUANTIZE,
    RNG,
    BnChain,
    bn,
    bn_params,
    inits,
    intermediate,
    layer_readers,
    quantize_stats,
    relative_error,
    weights,
)


# =========================================================================== rewrite exactness
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


# =========================================================================== plan refusals, ratios
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


# =========================================================================== the error estimate of spiq='auto'
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
    _, report = run_passes(chain.model, *QUANTIZE, weight_bits=2, first_last_bits=None, **KEEP_QDQ)
    reasons = [r.reason for p in report.passes if p.name == "quantize" for r in p.refusals]
    stats = quantize_stats(report)[0]
    chosen = [r for r in reasons if r.startswith("per-tensor chosen: estimated error")]
    assert (stats["spiq_coverage"] > 0) != bool(chosen)


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
