"""weight-only with ``rex_budget``: REx's residual order as a second MatMulNBits — its packed
bytes against a numpy reference (base + residual dequantized on the chosen columns), ONNX
Runtime against x @ (Ŵ + R̂), the budget choosing the columns with the largest (weighted)
base error, a full order beating W4 alone, bytes within the budget, refusals, exit codes
and the CLI flags."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxopt.passes.weight_only.blockwise import quantize_blocks
from onnxopt.passes.weight_only.residual import (
    budget_columns,
    column_bytes,
    column_errors,
    largest_columns,
    residual_order,
)

import onnxopt
from onnxopt.cli import main as cli_main
from onnxopt.errors import NothingToDoError, PipelineError
from tests.passes.test_weight_only import (
    attrs,
    decoded_weight,
    heavy_tailed,
    matmul_model,
    nbits_nodes,
    run_ort,
)

#: the numerics checks compare ORT with x @ dequant(W): float products (accuracy_level 0), not
#: the default 4 (int8 activations inside the kernel, checked separately)
EXACT = {"accuracy_level": 0}
#: the per-layer budget (rex_allocation="layer": the same share of every layer's bytes at
#: rex_bits); the network allocation is tested in test_weight_only_rex_network.py
LAYER = {"rex_allocation": "layer"}

RNG = np.random.default_rng(23)


def uneven_columns(k: int, n: int, seed: int = 0) -> np.ndarray:
    """Heavy-tailed weights whose columns have very different scales (so their errors differ)."""
    w = heavy_tailed(k, n, seed=seed)
    return (w * np.random.default_rng(seed + 1).uniform(0.2, 3.0, n).astype(np.float32)).astype(np.float32)


def weight_only_stats(report):
    return next(p for p in report.passes if p.name == "weight-only")


def base_and_residual(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    nodes = nbits_nodes(model)
    assert len(nodes) == 2
    base = next(n for n in nodes if "_rex_" not in n.name)
    return base, next(n for n in nodes if n is not base)


def reconstructed(model: onnx.ModelProto) -> np.ndarray:
    """Ŵ + R̂ scattered onto its columns, decoded from the model's initializers."""
    base, residual = base_and_residual(model)
    w = decoded_weight(model, base).astype(np.float64)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scatter = [n for n in model.graph.node if n.op_type == "ScatterElements"]
    columns = np.arange(w.shape[1]) if not scatter else inits[next(n.input[0] for n in model.graph.node if n.op_type == "Expand")]
    w[:, columns] += decoded_weight(model, residual)
    return w


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("budget,k,block_size", [(0.25, 128, 32), (0.5, 100, 32), (1.0, 96, 32), (0.4, 256, 64)])
def test_packed_model_matches_numpy_reference_and_ort(budget, k, block_size):
    n = 40
    weight = uneven_columns(k, n, seed=k)
    out, report = onnxopt.optimize(matmul_model(weight), preset="weight-only", **EXACT, **LAYER, rex_budget=budget, block_size=block_size, validate=True)
    base, residual = base_and_residual(out)
    count = int(np.floor(budget * n + 1e-9))
    assert attrs(residual) == {"K": k, "N": count, "bits": 4, "block_size": block_size, "accuracy_level": 0}
    ops = Counter(n.op_type for n in out.graph.node)
    assert ops == ({"MatMulNBits": 2, "Add": 1} if count == n else {"MatMulNBits": 2, "Shape": 1, "Expand": 1, "ScatterElements": 1})
    # numpy reference: the pass's own quantizers, run independently of the graph
    ref_base = quantize_blocks(weight, 4, block_size)
    ref = residual_order(weight, ref_base, count, 4)
    expected_w = ref_base.dequantized().astype(np.float64)
    expected_w[:, ref.columns] += ref.quantized.dequantized()
    np.testing.assert_array_equal(decoded_weight(out, base), ref_base.dequantized())
    np.testing.assert_allclose(reconstructed(out), expected_w, rtol=0, atol=1e-7)
    x = RNG.standard_normal((2, 3, k)).astype(np.float32)
    expected = x.astype(np.float64) @ expected_w
    np.testing.assert_allclose(run_ort(out, {"x": x}), expected, rtol=0, atol=3e-5 * np.abs(expected).max())
    (layer,) = weight_only_stats(report).stats["layers"]
    exact = np.linalg.norm(expected_w - weight) / np.linalg.norm(weight)
    assert layer["rex_columns"] == count and layer["rex_relative_error"] == pytest.approx(exact, rel=1e-4)
    assert layer["rex_relative_error"] < layer["relative_error"]


def test_budget_picks_the_columns_with_the_largest_error():
    weight = uneven_columns(128, 64, seed=4)
    base = quantize_blocks(weight, 4, 32)
    errors = np.square(weight.astype(np.float64) - base.dequantized()).sum(axis=0)
    for count in (1, 8, 16, 63):
        chosen = residual_order(weight, base, count, 4).columns
        assert np.all(np.diff(chosen) > 0) and chosen.size == count
        assert set(chosen) == set(np.argsort(-errors)[:count])
    # with row weights (E[x_k²]), the weighted column error decides
    rows = np.ones(128, np.float32)
    rows[:8] = 100.0
    weighted = (np.square(weight.astype(np.float64) - base.dequantized()) * rows[:, None]).sum(axis=0)
    np.testing.assert_allclose(column_errors(weight, base.dequantized(), rows), weighted, rtol=1e-5)
    assert set(largest_columns(column_errors(weight, base.dequantized(), rows), 10)) == set(np.argsort(-weighted)[:10])


def test_the_graph_adds_the_residual_on_the_chosen_columns():
    """The model's residual columns are the numpy choice, and the columns left out equal the base alone."""
    weight = uneven_columns(64, 32, seed=9)
    out, _ = onnxopt.optimize(matmul_model(weight, x_shape=(5, None)), preset="weight-only", **EXACT, **LAYER, rex_budget=0.25, validate=True)
    base, _ = base_and_residual(out)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    columns = inits[next(n.input[0] for n in out.graph.node if n.op_type == "Expand")]
    errors = column_errors(weight, decoded_weight(out, base))
    assert set(columns) == set(np.argsort(-errors)[:8])
    x = RNG.standard_normal((5, 64)).astype(np.float32)
    got = run_ort(out, {"x": x})
    others = np.setdiff1d(np.arange(32), columns)
    np.testing.assert_allclose(got[:, others], x @ decoded_weight(out, base)[:, others], rtol=0, atol=1e-4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_full_budget_is_a_second_order_strictly_better_than_w4(symmetric):
    weight = heavy_tailed(256, 48, seed=11)
    w4, r4 = onnxopt.optimize(matmul_model(weight), preset="weight-only", **EXACT, symmetric=symmetric)
    full, rf = onnxopt.optimize(matmul_model(weight), preset="weight-only", **EXACT, symmetric=symmetric, **LAYER, rex_budget=1.0, validate=True)
    error_w4 = np.linalg.norm(decoded_weight(w4, nbits_nodes(w4)[0]) - weight)
    error_full = np.linalg.norm(reconstructed(full) - weight)
    assert error_full < error_w4 / 8  # a 4-bit residual of a 4-bit base: close to an 8-bit weight
    stats = weight_only_stats(rf).stats
    assert stats["rex_columns_share"] == 1.0 and stats["rex_bytes_share"] == 1.0
    assert stats["rex_relative_error_mean"] < weight_only_stats(r4).stats["relative_error_mean"]
    assert stats["weight_bytes_after"] == 2 * weight_only_stats(r4).stats["weight_bytes_after"]


def test_bytes_stay_within_the_budget_and_8bit_residuals_cost_twice():
    k, n = 256, 64
    weight = heavy_tailed(k, n, seed=2)
    assert column_bytes(k, 4, 32, False) == 8 * 16 + 8 * 4 + 4
    assert budget_columns(k, n, 0.5, 4, 8, 32, False) < budget_columns(k, n, 0.5, 4, 4, 32, False) == 32
    for budget, bits in ((0.3, 4), (0.5, 8), (2.0, 4)):
        _, report = onnxopt.optimize(matmul_model(weight), preset="weight-only", **EXACT, **LAYER, rex_budget=budget, rex_bits=bits, validate=True)
        stats = weight_only_stats(report).stats
        assert stats["rex_bytes_share"] <= min(budget, 1.0 if bits == 4 else 2.0) + 1e-9
        assert stats["rex_columns"] == budget_columns(k, n, budget, 4, bits, 32, False)


def test_two_bit_residual_in_long_blocks_over_all_columns():
    """rex_bits 2, rex_block_size 128: the residual node's attributes, the numpy reference, ORT
    (accuracy_level 4 as well: the kernel's int8 activations), and less error per byte than a
    4-bit residual on some columns."""
    k, n = 256, 48
    weight = heavy_tailed(k, n, seed=12)
    options = {"rex_bits": 2, "rex_block_size": 128}
    full_budget = column_bytes(k, 2, 128, False) / column_bytes(k, 4, 32, False)
    out, report = onnxopt.optimize(matmul_model(weight), preset="weight-only", **EXACT, **LAYER, rex_budget=full_budget, validate=True, **options)
    base, residual = base_and_residual(out)
    assert attrs(residual) == {"K": k, "N": n, "bits": 2, "block_size": 128, "accuracy_level": 0}
    assert Counter(node.op_type for node in out.graph.node) == {"MatMulNBits": 2, "Add": 1}
    ref_base = quantize_blocks(weight, 4, 32)
    ref = residual_order(weight, ref_base, n, 2, block_size=128)
    expected_w = ref_base.dequantized().astype(np.float64) + ref.quantized.dequantized()
    np.testing.assert_allclose(reconstructed(out), expected_w, rtol=0, atol=1e-7)
    x = RNG.standard_normal((2, 3, k)).astype(np.float32)
    expected = x.astype(np.float64) @ expected_w
    np.testing.assert_allclose(run_ort(out, {"x": x}), expected, rtol=0, atol=3e-5 * np.abs(expected).max())
    level4, _ = onnxopt.optimize(matmul_model(weight), preset="weight-only", **LAYER, rex_budget=full_budget, accuracy_level=4, **options)
    np.testing.assert_allclose(run_ort(level4, {"x": x}), expected, rtol=0, atol=0.02 * np.abs(expected).max())
    two_bit = weight_only_stats(report).stats
    _, four = onnxopt.optimize(matmul_model(weight), preset="weight-only", **EXACT, **LAYER, rex_budget=full_budget)
    four_bit = weight_only_stats(four).stats
    assert two_bit["rex_bytes_share"] <= full_budget + 1e-9 and four_bit["rex_bytes_share"] <= full_budget + 1e-9
    assert two_bit["rex_relative_error_mean"] < 0.8 * four_bit["rex_relative_error_mean"]


def test_keep_8bit_layers_get_no_residual_and_say_so():
    w1, w2 = heavy_tailed(64, 64, seed=6), heavy_tailed(64, 32, seed=7)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="proj"), helper.make_node("MatMul", ["h", "W2"], ["y"], name="lm_head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 64])], [helper.make_tensor_value_info("y", 1, [2, 32])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, report = onnxopt.optimize(model, preset="weight-only", **EXACT, rex_budget=0.5, keep_8bit=["lm_head"], validate=True)
    passed = weight_only_stats(report)
    assert passed.stats["rex_layers"] == 1 and Counter(n.op_type for n in out.graph.node)["MatMulNBits"] == 3
    reasons = {r.subject: r.reason for r in passed.refusals}
    assert "kept at 8 bits" in reasons["residual order of lm_head"]


def test_opset_upgraded_for_scatter_reduction_and_outputs_match():
    weight = heavy_tailed(64, 32, seed=8)
    out, report = onnxopt.optimize(matmul_model(weight, x_shape=(4, None), opset=13, ir_version=7), preset="weight-only", **EXACT, rex_budget=0.5, validate=True)
    assert {o.domain: o.version for o in out.opset_import}[""] >= 16 and report.notes
    x = RNG.standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x}), x.astype(np.float64) @ reconstructed(out), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- errors and CLI
def test_budget_buying_no_column_is_exit_10():
    with pytest.raises(NothingToDoError, match="buys no 4-bit residual column"):
        onnxopt.optimize(matmul_model(heavy_tailed(64, 8)), preset="weight-only", **EXACT, **LAYER, rex_budget=0.05)


@pytest.mark.parametrize("options", [{"rex_budget": -0.1}, {"rex_bits": 3}, {"rex_budget": 0.5, "weight_bits": 8}, {"rex_budget": True}, {"rex_block_size": 48}])
def test_bad_rex_options(options):
    with pytest.raises(PipelineError):
        onnxopt.optimize(matmul_model(heavy_tailed(32, 8)), preset="weight-only", **EXACT, **options)


def test_cli_rex_flags_with_weight_only(tmp_path, capsys):
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(matmul_model(uneven_columns(128, 16)), str(src))
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--rex-budget", "25%", "--rex-allocation", "layer", "-q"]) == 0
    out = onnx.load(str(dst))
    assert attrs(base_and_residual(out)[1])["N"] == 4
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--rex", "2", "--rex-allocation", "layer", "--verify", "-q"]) == 0  # default budget 0.5
    assert attrs(base_and_residual(onnx.load(str(dst)))[1])["N"] == 8
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--rex-budget", "1", "--rex-allocation", "layer", "-q"]) == 0
    assert Counter(n.op_type for n in onnx.load(str(dst)).graph.node) == {"MatMulNBits": 2, "Add": 1}
    capsys.readouterr()
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--rex", "3"]) == 7
    assert "one residual order" in capsys.readouterr().err
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--rex", "2", "--rex-combine", "fold"]) == 7
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w8", "--rex-budget", "0.5"]) == 7
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--rex-budget", "0.01"]) == 10
