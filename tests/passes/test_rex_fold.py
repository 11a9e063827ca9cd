"""rex_combine="fold" (passes/rex/fold.py): the folded int8 codes are exactly R¹ + R² (one
divisor or one per channel), the emitted graph is the base QDQ graph (no branch, no Add)
and computes the float sum of the branches, ORT fuses it like the base, it beats W4 and the
re-quantized branch form, the divisor ladder is allocated by extra bits (+100 % = every
channel at m = 2L, the 8-bit-equivalent grid), and layers / options whose codes would not
fit int8 are refused with the reason."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnxopt.passes import rex as rex_module
from onnxopt.passes.common.operators import UniformWeightOperator
from onnxopt.passes.rex import allocate_network, expand_weight
from onnxopt.passes.rex.allocation import unit_rungs
from onnxopt.passes.rex.fold import divisor_ladder, fold_peak, fold_refusal, folded_weight, rung_bits

import onnxopt
from onnxopt.cli import main
from onnxopt.errors import OnnxoptError, PipelineError
from onnxopt.verify import run
from tests.conftest import ops
from tests.passes.test_rex import QUANT, UNIFORM, _input_shape, _scattered, conv_net, reference, single_layer, weights

FOLD = dict(rex_order=2, rex_combine="fold")


def _sum_of_orders(expansion, shape, out_axis) -> np.ndarray:
    return sum(_scattered(o, shape, out_axis) for o in expansion.orders)


@pytest.mark.parametrize("shape, axis, out_axis", [((24, 8, 3, 3), 0, 0), ((20, 16), 1, 1), ((20, 16), None, 0)])
@pytest.mark.parametrize("divisor", [7, 14, "ladder"])
def test_folded_codes_are_exactly_the_two_orders(shape, axis, out_axis, divisor):
    w = weights(*shape, rng=np.random.default_rng(11))
    c = shape[out_axis]
    if divisor == "ladder":  # one divisor per channel, as the ladder allocation gives them
        divisor = np.random.default_rng(3).choice(divisor_ladder(4), c)
    expansion = expand_weight(w, 4, axis, out_axis, UNIFORM, 2, 0.5, step_divisor=divisor)
    first, second = expansion.orders
    assert 0 < len(second.channels) < c
    m = np.broadcast_to(divisor, (c,))[second.channels]
    q2 = np.moveaxis(second.q.codes.astype(np.int64), out_axis, 0)
    assert np.all(np.abs(q2).reshape(len(m), -1).max(axis=1) <= np.minimum(7, np.ceil(m / 2)))  # order 2 keeps b-bit codes
    folded = folded_weight(expansion, out_axis)
    codes = np.moveaxis(folded.codes.astype(np.int64), out_axis, 0)
    q1 = np.moveaxis(first.q.codes.astype(np.int64), out_axis, 0)
    rest = np.setdiff1d(np.arange(c), second.channels)
    along = m.reshape([-1] + [1] * (len(shape) - 1))
    np.testing.assert_array_equal(codes[second.channels], along * q1[second.channels] + q2)  # integer identity
    np.testing.assert_array_equal(codes[rest], q1[rest])
    assert np.all(np.abs(codes[second.channels]).reshape(len(m), -1).max(axis=1) <= fold_peak(4, m)) and np.abs(codes).max() <= 127
    s1 = np.broadcast_to(first.q.scales, (c,))
    np.testing.assert_allclose(folded.scales[second.channels], s1[second.channels] / m, rtol=1e-7)
    np.testing.assert_array_equal(folded.scales[rest], s1[rest])
    np.testing.assert_allclose(UNIFORM.dequantize(folded), _sum_of_orders(expansion, shape, out_axis), rtol=1e-6, atol=1e-9)
    # m·q1 is an integer, so a folded channel is W rounded on the grid s1/m
    scale = np.moveaxis(np.broadcast_to(folded.scales.reshape([-1] + [1] * (len(shape) - 1)), codes.shape), 0, 0)
    grid = np.round(np.moveaxis(w.astype(np.float64), out_axis, 0) / scale)
    assert np.mean(grid[second.channels] == codes[second.channels]) > 0.999  # up to float ties


@pytest.mark.parametrize("divisor, peak, bits", [(None, 105, 8), (7, 53, 7)])
@pytest.mark.parametrize("kind", ["conv", "depthwise", "gemm", "matmul"])
def test_fold_is_one_qdq_layer_computing_the_float_sum_of_the_branches(kind, divisor, peak, bits):
    """rex_allocation="uniform" folds its share of channels with one divisor: the top rung
    m = 2L = 14 by default (8-bit codes), or the explicit rex_fold_divisor."""
    model, w, b, out_axis, groups = single_layer(kind)
    base, _ = onnxopt.optimize(model, passes=["quantize"], bias_correction=False, **QUANT)
    out, report = onnxopt.optimize(model, passes=["quantize", "rex"], validate=True, bias_correction=False, rex_budget=1.0,
                                   rex_allocation="uniform", rex_fold_divisor=divisor, **FOLD, **QUANT)
    assert ops(out) == ops(base)  # the same nodes: no branch, no Add, no re-quantization
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    layer = next(n for n in out.graph.node if n.op_type in ("Conv", "Gemm", "MatMul"))
    weight_dq = next(n for n in out.graph.node if n.output[0] == layer.input[1])
    m = divisor or 14
    assert 7 < np.abs(inits[weight_dq.input[0]].astype(int)).max() <= peak  # codes on the grid s1/m
    stats = next(p for p in report.passes if p.name == "rex").stats
    assert stats["layers"][0]["folded_channels"] == w.shape[out_axis] and stats["layers"][0]["branches"] == 0
    assert stats["bops_relative_to_base"] == pytest.approx(bits / 4)
    assert stats["folded_channels"] == f"m={m}:{w.shape[out_axis]}"

    expansion = expand_weight(w, 4, out_axis, out_axis, UNIFORM, 2, 1.0, groups, step_divisor=m)
    x = np.random.default_rng(5).uniform(-3, 3, _input_shape(model)).astype(np.float32)
    q = next(n for n in out.graph.node if n.op_type == "QuantizeLinear")
    x_scale, x_zero = float(inits[q.input[1]]), int(inits[q.input[2]])
    want = reference(kind, x.astype(np.float64), x_scale, x_zero, _sum_of_orders(expansion, w.shape, out_axis), b, expansion.orders[0].q.scales)
    got = run(out, {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_fold_equals_the_float_summed_branch_form_with_the_same_operator(monkeypatch, tmp_path):
    """On a network (bias correction on, network allocation, γ = 50 %): the folded model with
    one divisor m = 7 (rex_fold_divisor: one order per expanded channel, as the branch
    forms count it) and the gather branch form summed in float (rex_requantize=False)
    whose order 2 uses the same step s1/7 compute the same outputs; ORT fuses every
    folded layer like the base."""
    model = conv_net(np.random.default_rng(21))
    x = {"x": np.random.default_rng(22).uniform(-3, 3, (1, 8, 16, 16)).astype(np.float32)}
    folded, report = onnxopt.optimize(model, preset="rex", rex_budget=0.5, rex_fold_divisor=7, **FOLD, **QUANT)
    base, _ = onnxopt.optimize(model, preset="rex", rex_order=2, rex_budget=0.0, **QUANT)
    assert ops(folded) == ops(base)
    kept = [layer.get("folded_channels", 0) for layer in next(p for p in report.passes if p.name == "rex").stats["layers"]]
    assert sum(kept) > 0 and any(0 < k < c for k, c in zip(kept, (32, 32, 32, 10)))  # some layers partly folded

    original = rex_module.expand_weight
    monkeypatch.setattr(rex_module, "expand_weight", lambda *a, **k: original(*a, **{**k, "step_divisor": 7}))
    branches, _ = onnxopt.optimize(model, preset="rex", rex_order=2, rex_budget=0.5, rex_combine="gather", rex_requantize=False, **QUANT)
    assert ops(branches)["Conv"] > ops(folded)["Conv"]
    want, got = run(branches, x)["y"], run(folded, x)["y"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())

    path = tmp_path / "fold.onnx"
    onnx.save(folded, path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = ops(onnx.load(tmp_path / "ort.onnx"))
    assert fused["QLinearConv"] == 3 and fused.get("Conv", 0) == 0 and fused.get("FusedConv", 0) == 0


def test_full_fold_is_closer_to_float_than_w4_and_the_branch_form():
    rng = np.random.default_rng(2024)
    model = conv_net(rng)
    x = {"x": rng.uniform(-3, 3, (1, 8, 16, 16)).astype(np.float32)}
    ref = run(model, x)["y"]
    kwargs = dict(preset="rex", rex_order=2, spiq=False, **QUANT)

    def error(**options) -> float:
        out, _ = onnxopt.optimize(model, **kwargs, **options)
        return float(np.sqrt(np.mean((run(out, x)["y"] - ref) ** 2)))

    w4, fold = error(rex_budget=0.0), error(rex_budget=1.0, rex_combine="fold")
    permute, gather = error(rex_budget=1.0, rex_combine="permute"), error(rex_budget=1.0, rex_combine="gather")
    assert fold < min(permute, gather) < w4


def test_fold_fits_int8_only_at_k2_and_up_to_4_bits():
    assert fold_peak(4, 7) == 53 and fold_refusal(4, 7) is None and fold_refusal(4, 14) is None and fold_refusal(3, 3) is None
    assert divisor_ladder(4) == (2, 4, 8, 14) and list(rung_bits(4, divisor_ladder(4))) == [4, 5, 6, 7, 8]  # one rung per extra bit
    assert divisor_ladder(3) == (2, 4, 6) and divisor_ladder(2) == (2,) and list(rung_bits(2, (2,))) == [2, 3]
    assert "> 127" in fold_refusal(5, 15) and "> 127" in fold_refusal(8, 127)
    assert "clip" in fold_refusal(4, 15)
    with pytest.raises(PipelineError, match="K = 3 does not fit"):
        onnxopt.optimize(conv_net(), preset="rex", **{**FOLD, "rex_order": 3}, **QUANT)
    for options, message in (({"rex_operator": "power"}, "uniform weight operator"), ({"rex_fold_divisor": 1}, "m ≥ 2"),
                             ({"rex_input_expansion": True}, "rex_input_expansion")):
        with pytest.raises(PipelineError, match=message):
            onnxopt.optimize(conv_net(), preset="rex", **FOLD, **QUANT, **options)
    with pytest.raises(PipelineError, match="only applies to rex_combine='fold'"):
        onnxopt.optimize(conv_net(), preset="rex", rex_order=2, rex_combine="permute", rex_fold_divisor=7, **QUANT)
    with pytest.raises(OnnxoptError, match="not one int8 layer"):  # every layer at 5 bits: nothing folds, said loudly
        onnxopt.optimize(conv_net(), preset="rex", **FOLD, **{**QUANT, "weight_bits": 5})


def test_8_bit_first_and_last_layers_are_refused_and_kept(tmp_path, capsys):
    """first_last_bits=8 (the default): the first Conv and the classifier cannot fold; they
    are reported and left at their base quantization, the middle layers fold."""
    out, report = onnxopt.optimize(conv_net(), preset="rex", rex_budget=1.0, **FOLD, **{**QUANT, "first_last_bits": 8})
    rex = next(p for p in report.passes if p.name == "rex")
    assert len([r for r in rex.refusals if "not one int8 layer" in r.reason]) == 2
    assert [layer["folded_channels"] for layer in rex.stats["layers"]] == [32, 32]
    src = tmp_path / "net.onnx"
    onnx.save(conv_net(), src)
    assert main([str(src), "-o", str(tmp_path / "f.onnx"), "--quantize", "w4a8", "--input-range=-3,3", "--rex", "2",
                 "--rex-combine", "fold", "-q"]) == 0
    assert ops(onnx.load(tmp_path / "f.onnx"))["Conv"] == 3


def test_auto_combine_folds_where_it_applies_and_keeps_branches_elsewhere():
    """The default ``rex_combine="auto"``: K = 2 on a ≤ 4-bit base folds (no branch: the
    same node counts as the base); K = 3 cannot fold and gets permute's branches."""
    model = conv_net(np.random.default_rng(5))
    base, _ = onnxopt.optimize(model, preset="quantize", **QUANT)
    folded, report = onnxopt.optimize(model, preset="rex", rex_order=2, rex_budget=0.5, **QUANT)
    stats = next(p for p in report.passes if p.name == "rex").stats
    assert ops(folded) == ops(base) and stats["layers_expanded"] > 0
    branched, _ = onnxopt.optimize(model, preset="rex", rex_order=3, rex_budget=0.5, **QUANT)
    assert ops(branched)["Conv"] > ops(base)["Conv"]


@pytest.mark.parametrize("kind", ["conv", "depthwise", "gemm", "matmul"])
def test_full_budget_ladder_is_the_8_bit_equivalent_grid_on_every_channel(kind):
    """The default fold (network allocation over the divisor ladder) at γ = 100 % spends the
    extra BOPs of 4 more bits on every channel: all at the top rung m = 2L = 14, the folded
    codes are round(W / (s1/14)) (98 levels per side, W8-size codes) and ORT computes the
    layer with that quantization."""
    model, w, b, out_axis, _ = single_layer(kind)
    base, _ = onnxopt.optimize(model, passes=["quantize"], bias_correction=False, **QUANT)
    out, report = onnxopt.optimize(model, passes=["quantize", "rex"], validate=True, bias_correction=False, rex_budget=1.0, **FOLD, **QUANT)
    assert ops(out) == ops(base)
    c = w.shape[out_axis]
    stats = next(p for p in report.passes if p.name == "rex").stats
    assert stats["folded_channels"] == f"m=14:{c}" and stats["bops_relative_to_base"] == pytest.approx(2.0)

    s1 = np.broadcast_to(expand_weight(w, 4, out_axis, out_axis, UNIFORM, 1, 0.0).orders[0].q.scales, (c,)).astype(np.float64)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    layer = next(n for n in out.graph.node if n.op_type in ("Conv", "Gemm", "MatMul"))
    weight_dq = next(n for n in out.graph.node if n.output[0] == layer.input[1])
    codes, scales = inits[weight_dq.input[0]].astype(np.int64), inits[weight_dq.input[1]].astype(np.float64)
    np.testing.assert_allclose(scales, s1 / 14, rtol=1e-6)
    shape = [1] * w.ndim
    shape[out_axis] = -1
    np.testing.assert_array_equal(codes, np.round(w.astype(np.float64) / (s1 / 14).reshape(shape)))  # the 8-bit-equivalent grid
    assert np.abs(codes).max() == 98  # L·m: the largest weight of a channel sits on its last level

    x = np.random.default_rng(5).uniform(-3, 3, _input_shape(model)).astype(np.float32)
    q = next(n for n in out.graph.node if n.op_type == "QuantizeLinear")
    x_scale, x_zero = float(inits[q.input[1]]), int(inits[q.input[2]])
    # the bias keeps quantize's int32 codes on x_scale·s1 (a multiple of the finer x_scale·s1/14)
    want = reference(kind, x.astype(np.float64), x_scale, x_zero, codes * (s1 / 14).reshape(shape), b, s1)
    got = run(out, {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_full_budget_ladder_folds_every_channel_of_a_network_at_the_top_rung():
    """On a network (bias correction on, every layer 4-bit): +100 % puts every channel of
    every layer at m = 14; +75 % a mix of rungs whose extra BOPs stay within 75 % of the
    base's."""
    model = conv_net(np.random.default_rng(31))
    _, report = onnxopt.optimize(model, preset="rex", rex_budget=1.0, **FOLD, **QUANT)
    stats = next(p for p in report.passes if p.name == "rex").stats
    assert stats["folded_channels"] == f"m=14:{32 + 32 + 32 + 10}" and stats["bops_relative_to_base"] == pytest.approx(2.0)
    _, report = onnxopt.optimize(model, preset="rex", rex_budget=0.75, **FOLD, **QUANT)
    stats = next(p for p in report.passes if p.name == "rex").stats
    assert 1.7 < stats["bops_relative_to_base"] <= 1.75 and len(stats["folded_channels"].split()) > 1  # a mix of rungs


def test_ladder_allocation_takes_rungs_in_order_by_gain_per_extra_bit_within_the_budget():
    """The fold's ladder through allocate_network: the rows of each table are the base and
    the rungs, a step costs the unit's MACs × its extra bits; candidates are taken by gain
    per cost, a unit's rungs in order (the cheaper, lower rung first even when the next one
    removes more error), and the taken cost never exceeds the budget."""
    # layer 0: 2 units of 10 MACs, rungs of 1, 1 and 2 extra bits; layer 1: one unit of 100 MACs
    errors = [np.array([[8.0, 8.0], [2.0, 7.0], [1.0, 2.0], [0.2, 1.9]]), np.array([[45.0], [10.0], [5.0], [1.0]])]
    costs = [10 * np.array([1.0, 1.0, 2.0]), 100 * np.array([1.0, 1.0, 2.0])]
    signals = np.array([1.0, 1.0])
    # gains per cost: u0: 0.6, 0.1, 0.04; u1: 0.1, then 0.5 made 0.1 (non-increasing), 0.005; layer 1: 0.35, 0.05, 0.02

    def rungs(budget: float) -> list[list[int]]:
        return [list(unit_rungs(s, len(e[0]))) for s, e in zip(allocate_network(errors, signals, costs, budget, spend_all=True), errors)]

    def spent(r: list[list[int]]) -> float:
        return sum(float(np.sum(np.cumsum(c)[np.array(units) - 1][np.array(units) > 0])) for units, c in zip(r, costs))

    assert rungs(10.0) == [[1, 0], [0]]
    assert rungs(109.0) == [[1, 0], [0]]  # layer 1's first rung (100) does not fit: the greedy stops there
    assert rungs(110.0) == [[1, 0], [1]]
    assert rungs(120.0) == [[1, 1], [1]]  # u1's first rung ties with u0's second (0.1 per cost): the lower rung first ...
    assert rungs(130.0) == [[2, 1], [1]]
    assert rungs(140.0) == [[2, 2], [1]]  # ... and u1's second rung (5 removed) only after its first (1 removed)
    for budget in (0.0, 10.0, 55.0, 139.9, 140.0, 260.0, 480.0, 1e6):
        assert spent(rungs(budget)) <= budget
    assert spent(rungs(480.0)) == 480.0 and rungs(480.0) == [[3, 3], [3]]  # the budget of every rung takes them all


@pytest.mark.parametrize("shape, axis, out_axis, groups", [((24, 8, 3, 3), 0, 0, 1), ((20, 16), 1, 1, 4), ((20, 16), None, 0, 1)])
def test_ladder_error_table_quantizes_the_base_once_and_matches_one_expansion_per_rung(shape, axis, out_axis, groups):
    """Rex._rung_errors: the base row, then each rung's dense order-2 expansion on step s1/m,
    exactly as separate expand_weight calls give them, with the base quantized once (not once
    per rung)."""
    w = weights(*shape, rng=np.random.default_rng(5))
    error_weights = np.random.default_rng(6).random(shape) + 0.5
    site = SimpleNamespace(weight=w, bits=4, axis=axis, out_axis=out_axis, groups=groups, fold=divisor_ladder(4))
    calls = []

    class Counting(UniformWeightOperator):
        def quantize(self, *args, **kwargs):
            calls.append(args[0].shape)
            return super().quantize(*args, **kwargs)

    table = rex_module.Rex._rung_errors(site, Counting(), error_weights)
    assert calls == [shape]  # the base only (the rungs use the base's step, no quantize call of their own)
    separate = [expand_weight(w, 4, axis, out_axis, UniformWeightOperator(), 2, 1.0, groups, error_weights=error_weights, step_divisor=m)
                for m in site.fold]
    want = np.array([separate[0].unit_errors[0], *(e.unit_errors[1] for e in separate)])
    assert table.shape == (1 + len(site.fold), shape[out_axis] if groups == 1 else groups)
    np.testing.assert_array_equal(table, want)
