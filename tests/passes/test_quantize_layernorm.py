"""quantize on transformer linear layers: LayerNormalization → MatMul → Add.  The LayerNorm's
γ/β give the MatMul input's range, bias correction goes into the following Add (and nowhere
when there is none), and SPIQ folds its scales into γ/β exactly (a Shape reader does not block
it).  The dynamic fallback for static-batch models is in test_quantize_transformer.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxopt.passes.quantize import spiq

from onnxopt.graph import NameFactory, cleanup, export_model, import_graph, with_inferred_shapes
from onnxopt.verify import run, verify
from tests.conftest import text_model as model, run_passes
from tests.passes.quantize_builders import (
    RNG,
    attr,
    cosine,
    inits,
    intermediate,
    layer_readers,
    nodes,
    quantize_stats,
    weights,
)


def layernorm_linear(with_bias: bool = True) -> onnx.ModelProto:
    """x[B, T, 8] → LayerNormalization(γ, β) → MatMul(W[8, 6]) → Add(bias) (a transformer linear layer;
    a dynamic batch: with a static one ORT does not fuse the static QDQ MatMul and the pass
    re-emits it in the dynamic form, see test_quantize_transformer.py)."""
    gamma = RNG.uniform(0.05, 2.0, 8).astype(np.float32)  # spread per-feature ranges: SPIQ has work to do
    arrays = {"g": gamma, "w": weights(8, 6), "bias": weights(6)}
    inputs = "(x, g, b)" if with_bias else "(x, g)"
    if with_bias:
        arrays["b"] = RNG.normal(0, 0.5, 8).astype(np.float32)
    body = [f"n = LayerNormalization <axis = -1, epsilon = 0.00001> {inputs}", "m = MatMul(n, w)", "y = Add(m, bias)"]
    return model("(float[B,5,8] x) => (float[B,5,6] y)", body, arrays)


def test_layernorm_statistics_give_the_range_of_a_3d_matmul_input() -> None:
    """The LayerNorm output has mean β and std |γ| per feature: range β ± λ|γ| (λ = 9 at 8 bits),
    the MatMul on [B, T, K] gets per-channel int8 weights (axis 1) and a per-tensor input QDQ."""
    proto = layernorm_linear()
    optimized, report = run_passes(proto, "quantize", spiq=False)
    stats, refusals = quantize_stats(report)
    assert stats["layers_quantized"] == 1 and stats["layers_float"] == 0
    init = inits(optimized)
    (matmul,) = nodes(optimized, "MatMul")
    producers = {o: n for n in optimized.graph.node for o in n.output}
    x_dq, w_dq = producers[matmul.input[0]], producers[matmul.input[1]]
    assert x_dq.op_type == w_dq.op_type == "DequantizeLinear"
    assert init[w_dq.input[0]].dtype == np.int8 and init[w_dq.input[0]].shape == (8, 6)
    assert attr(w_dq, "axis") == 1 and init[w_dq.input[1]].shape == (6,)
    beta, gamma = inits(proto)["b"].astype(np.float64), np.abs(inits(proto)["g"].astype(np.float64))
    bound = max(abs((beta - 9 * gamma).min()), abs((beta + 9 * gamma).max()))
    assert float(init[x_dq.input[1]]) == pytest.approx(bound / 127, rel=1e-6)
    assert not any(r["subject"].startswith("layer") for r in refusals), refusals
    feeds = {"x": RNG.standard_normal((2, 5, 8)).astype(np.float32)}
    assert cosine(run(optimized, feeds)["y"], run(proto, feeds)["y"]) > 0.999


def test_matmul_bias_correction_goes_into_the_following_add() -> None:
    """Bias correction for a MatMul (eq. 3.8): the Add's constant gains (W − Ŵ)·E[x] with
    E[x] = β, the LayerNorm's shift (the constant checked exactly; on a model this small the
    effect on outputs is within the activation rounding, so it is not asserted)."""
    proto = layernorm_linear()
    corrected, _ = run_passes(proto, "quantize", spiq=False, weight_bits=4, first_last_bits=None)
    plain, _ = run_passes(proto, "quantize", spiq=False, weight_bits=4, first_last_bits=None, bias_correction=False)
    (add_c,), (add_p,) = nodes(corrected, "Add"), nodes(plain, "Add")
    bias_c, bias_p = (inits(m)[a.input[1]].astype(np.float64) for m, a in ((corrected, add_c), (plain, add_p)))
    np.testing.assert_allclose(bias_p, inits(proto)["bias"], rtol=1e-6)
    (matmul,) = nodes(corrected, "MatMul")
    (w_dq,) = [n for n in corrected.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == matmul.input[1]]
    w_hat = inits(corrected)[w_dq.input[0]].astype(np.float64) * inits(corrected)[w_dq.input[1]].astype(np.float64)
    beta = inits(proto)["b"].astype(np.float64)
    np.testing.assert_allclose(bias_c - bias_p, beta @ (inits(proto)["w"].astype(np.float64) - w_hat), rtol=1e-5, atol=1e-6)
    assert np.abs(bias_c - bias_p).max() > 1e-3  # a 4-bit weight error: a visible correction
    feeds = {"x": RNG.standard_normal((2, 5, 8)).astype(np.float32)}
    assert cosine(run(corrected, feeds)["y"], run(proto, feeds)["y"]) > 0.95


def test_matmul_without_a_following_add_gets_no_bias_correction() -> None:
    """No Add with a constant [N] after the MatMul: nowhere to put the correction, so the
    model is the same with and without bias correction (no bias is invented)."""
    arrays = {"g": RNG.uniform(0.5, 1.5, 8).astype(np.float32), "b": RNG.normal(0, 0.5, 8).astype(np.float32), "w": weights(8, 6)}
    proto = model("(float[2,5,8] x) => (float[2,5,6] y)", ["n = LayerNormalization <axis = -1, epsilon = 0.00001> (x, g, b)", "y = MatMul(n, w)"], arrays)
    corrected, _ = run_passes(proto, "quantize", spiq=False, weight_bits=4, first_last_bits=None)
    plain, _ = run_passes(proto, "quantize", spiq=False, weight_bits=4, first_last_bits=None, bias_correction=False)
    assert "Add" not in {n.op_type for n in corrected.graph.node}
    feeds = {"x": RNG.standard_normal((2, 5, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(corrected, feeds)["y"], run(plain, feeds)["y"])


@pytest.mark.parametrize("with_bias", [True, False])
def test_spiq_through_layernorm_is_exact_before_rounding(with_bias: bool) -> None:
    """SPIQ divides γ (and β) of the LayerNorm by r and multiplies the MatMul rows by r."""
    proto = layernorm_linear(with_bias)
    graph = import_graph(with_inferred_shapes(proto))
    tensor = graph.tensors()["n"]
    readers = layer_readers(tensor)
    plan = spiq.plan(graph, tensor, readers)
    assert isinstance(plan, spiq.SpiqPlan) and plan.producer.op == "LayerNormalization", plan
    ratio = RNG.uniform(0.05, 1.0, 8)
    spiq.apply(graph, plan, ratio, readers, NameFactory(graph))
    rewritten = export_model(cleanup(graph), proto)
    new = inits(rewritten)
    np.testing.assert_allclose(new[plan.producer.inputs[1].name], inits(proto)["g"] / ratio, rtol=1e-6)
    if with_bias:
        np.testing.assert_allclose(new[plan.producer.inputs[2].name], inits(proto)["b"] / ratio, rtol=1e-6)
    np.testing.assert_allclose(new[readers[0].inputs[1].name], inits(proto)["w"] * ratio[:, None], rtol=1e-6)
    feeds = {"x": RNG.standard_normal((2, 5, 8)).astype(np.float32)}
    assert not np.allclose(intermediate(rewritten, "n", feeds), intermediate(proto, "n", feeds), rtol=1e-3)
    result = verify(proto, rewritten, inputs=feeds, rtol=1e-5, atol=1e-6)
    assert result.passed, result.failures


def test_spiq_through_layernorm_ignores_shape_readers_and_beats_per_tensor() -> None:
    """A Shape reader of the LayerNorm output (ViT attention) does not block SPIQ; on spread
    γ the SPIQ model is closer to FP32 than per tensor."""
    base = layernorm_linear()
    proto = model(
        "(float[N,5,8] x) => (float[N,5,6] y, int64[3] s)",
        ["n = LayerNormalization <axis = -1, epsilon = 0.00001> (x, g, b)", "s = Shape(n)", "m = MatMul(n, w)", "y = Add(m, bias)"],
        inits(base),
    )
    feeds = {"x": RNG.standard_normal((64, 5, 8)).astype(np.float32)}
    reference = run(proto, feeds)["y"]
    errors = {}
    for mode in (True, False):
        optimized, report = run_passes(proto, "quantize", spiq=mode, weight_bits=8)
        stats, _ = quantize_stats(report)
        assert stats["spiq_coverage"] == (1.0 if mode else 0.0)
        got = run(optimized, feeds)
        np.testing.assert_array_equal(got["s"], [64, 5, 8])
        errors[mode] = float(np.mean((got["y"] - reference) ** 2))
    assert errors[True] < errors[False], errors
