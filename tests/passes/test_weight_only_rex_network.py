"""weight-only with ``rex_allocation="network"``: the greedy over (layer, column, rung) on
constructed error tables (2-bit rung before the 4-bit upgrade when it removes more per byte,
the byte budget, determinism, one rung per layer), a two-layer model whose budget goes to the
layer with the error (ONNX Runtime against x @ (Ŵ + R̂) of the decoded initializers), the
tables' prediction against the residual the second pass builds, exit 10, the CLI flag, and
the per-layer mode untouched by the option."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxopt.passes.weight_only.blockwise import quantize_blocks
from onnxopt.passes.weight_only.residual import (
    ColumnTable,
    allocate_network,
    column_bytes,
    column_errors,
    error_table,
    greedy_rungs,
    residual_order,
)

import onnxopt
from onnxopt.cli import main as cli_main
from onnxopt.errors import NothingToDoError
from tests.passes.test_weight_only import (
    decoded_weight,
    heavy_tailed,
    matmul_model,
    nbits_nodes,
    run_ort,
)
from tests.passes.test_weight_only_rex import EXACT, uneven_columns, weight_only_stats


def table(errors, signal=1.0, costs=(10, 20), bits=(2, 4)) -> ColumnTable:
    errors = np.asarray(errors, np.float64)
    return ColumnTable(errors, errors[0].copy(), signal, signal, tuple(bits), tuple(costs))


# --------------------------------------------------------------------------- the greedy
def test_two_bit_rung_taken_before_the_four_bit_upgrade_when_it_removes_more_per_byte():
    # each column: base 1.0, after 2 bits 0.1 (0.9 for 10 bytes), after 4 bits 0.0 (0.1 for 10 more)
    t = table([[1.0, 1.0, 1.0], [0.1, 0.1, 0.1], [0.0, 0.0, 0.0]])
    assert greedy_rungs([t], 30)[0].tolist() == [1, 1, 1]  # three 2-bit rungs, no upgrade
    assert greedy_rungs([t], 40)[0].tolist() == [2, 1, 1]  # then the upgrades, lowest column first
    # where the 2-bit residual removes little, the wider residual is worth its bytes
    poor = table([[1.0, 1.0], [0.9, 0.9], [0.0, 0.0]])
    allocation = allocate_network([poor], 40)
    bits, columns = allocation.choices[0]
    assert bits == 4 and columns.tolist() == [0, 1]


def test_greedy_respects_the_byte_budget_and_is_deterministic():
    rng = np.random.default_rng(3)
    tables = []
    for n, cost in ((50, 12), (80, 7), (30, 25)):
        base = rng.uniform(0.5, 2.0, n)
        tables.append(table([base, base * 0.12, base * 0.01], signal=float(rng.uniform(10, 100)), costs=(cost, 2 * cost)))
    for budget in (0.0, 5.0, 100.0, 777.0, 5000.0):
        taken = greedy_rungs(tables, budget)
        spent = sum(t.costs[0] * np.count_nonzero(r >= 1) + (t.costs[1] - t.costs[0]) * np.count_nonzero(r >= 2) for t, r in zip(tables, taken))
        assert spent <= budget
        allocation = allocate_network(tables, budget)
        assert allocation.spent <= budget
        again = allocate_network(tables, budget)
        assert [None if c is None else (c[0], c[1].tolist()) for c in allocation.choices] == [None if c is None else (c[0], c[1].tolist()) for c in again.choices]
    # ties (equal columns in equal layers) go to the lower layer, then the lower column
    tied = [table([[1.0, 1.0], [0.1, 0.1], [0.0, 0.0]]) for _ in range(2)]
    taken = greedy_rungs(tied, 30)
    assert taken[0].tolist() == [1, 1] and taken[1].tolist() == [1, 0]


def test_gains_are_relative_to_the_layer_s_signal():
    # the same absolute error is a larger share of a weak layer: its columns come first
    strong, weak = table([[1.0] * 4, [0.1] * 4, [0.0] * 4], signal=100.0), table([[1.0] * 4, [0.1] * 4, [0.0] * 4], signal=1.0)
    allocation = allocate_network([strong, weak], 40)
    assert allocation.choices[0] is None
    assert allocation.choices[1][0] == 2 and allocation.choices[1][1].tolist() == [0, 1, 2, 3]


def test_one_rung_per_layer_keeps_the_better_one_and_reports_the_mixed_greedy():
    # the greedy takes every 2-bit rung and one upgrade (mixed); one node per layer keeps the
    # rung that removes most with the same bytes: here 2 bits over all four columns
    t = table([[1.0] * 4, [0.1] * 4, [0.0] * 4])
    allocation = allocate_network([t], 50)
    assert allocation.mixed_layers == 1
    assert allocation.choices[0][0] == 2 and allocation.choices[0][1].tolist() == [0, 1, 2, 3]
    assert allocation.kept_gain == pytest.approx(3.6) and allocation.greedy_gain == pytest.approx(3.7)


def test_error_table_matches_the_residual_the_second_pass_quantizes():
    weight = uneven_columns(96, 24, seed=5)
    base = quantize_blocks(weight, 4, 32)
    t = error_table(weight, base, (2, 4), 32)
    residual = weight - base.dequantized()
    assert np.allclose(t.errors[0], column_errors(weight, base.dequantized()), rtol=1e-6)
    for row, bits in enumerate((2, 4), start=1):
        columns = np.array([1, 7, 20])
        quantized = quantize_blocks(residual[:, columns], bits, 32)
        assert np.allclose(t.errors[row, columns], column_errors(residual[:, columns], quantized.dequantized()), rtol=1e-5)
        assert (t.errors[row] < t.errors[0]).all()
    assert t.costs == (column_bytes(96, 2, 32, False), column_bytes(96, 4, 32, False))
    assert t.signal == pytest.approx(float(np.square(weight, dtype=np.float64).sum()), rel=1e-5)


# --------------------------------------------------------------------------- the pass
def exact_grid_weight(k: int, n: int, block_size: int = 32, seed: int = 0) -> np.ndarray:
    """Weights a 4-bit block quantizer represents exactly: integers −7..8 per column scale, every
    block holding both ends (its base error is ~0, so a residual there gains nothing)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-7, 9, size=(k, n)).astype(np.float32)
    q[::block_size] = -7
    q[1::block_size] = 8
    return (q * rng.uniform(0.01, 0.05, n).astype(np.float32)).astype(np.float32)


def two_layer_model(first: np.ndarray, second: np.ndarray) -> onnx.ModelProto:
    """x ── MatMul(A) ── h ── MatMul(B) ── y (A exact on the 4-bit grid, B not)."""
    k = first.shape[0]
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="first"), helper.make_node("MatMul", ["h", "B"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, second.shape[1]])],
                              [numpy_helper.from_array(first, "A"), numpy_helper.from_array(second, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def layer_weight(model: onnx.ModelProto, label: str) -> np.ndarray:
    """Ŵ (+ R̂ on its columns) of one layer, decoded from the initializers."""
    nodes = [n for n in nbits_nodes(model) if n.name.startswith(label)]
    base = next(n for n in nodes if "_rex_" not in n.name)
    w = decoded_weight(model, base).astype(np.float64)
    residual = next((n for n in nodes if "_rex_" in n.name), None)
    if residual is not None:
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        expand = next((n for n in model.graph.node if n.op_type == "Expand" and n.name.startswith(label)), None)
        columns = np.arange(w.shape[1]) if expand is None else inits[expand.input[0]]
        w[:, columns] += decoded_weight(model, residual)
    return w


def test_network_puts_the_residual_on_the_layer_with_the_error_and_ort_matches():
    first, second = exact_grid_weight(128, 128), uneven_columns(128, 48, seed=9)
    model = two_layer_model(first, second)
    out, report = onnxopt.optimize(model, preset="weight-only", **EXACT, rex_budget=0.25, rex_allocation="network", validate=True)
    stats = weight_only_stats(report).stats
    by_layer = {r["layer"]: r for r in stats["layers"]}
    assert "rex_columns" not in by_layer["first"]  # exact on the grid: no residual there
    assert by_layer["second"]["rex_columns"] > 0 and by_layer["second"]["rex_bits"] in (2, 4)
    # the whole model's budget went to the second layer: more columns than its own share would buy
    per_layer, per_layer_report = onnxopt.optimize(model, preset="weight-only", **EXACT, rex_budget=0.25, rex_allocation="layer")
    per_layer_second = next(r for r in weight_only_stats(per_layer_report).stats["layers"] if r["layer"] == "second")
    assert by_layer["second"]["rex_bytes"] > 1.5 * per_layer_second["rex_bytes"]
    assert stats["rex_bytes"] == by_layer["second"]["rex_bytes"] <= stats["rex_budget_bytes"]
    assert any(name == "weight-only" and "went to layers" in r.reason for name, r in report.refusals)
    x = RNG.standard_normal((2, 3, 128)).astype(np.float32)
    expected = (x.astype(np.float64) @ layer_weight(out, "first")) @ layer_weight(out, "second")
    assert np.allclose(run_ort(out, {"x": x}), expected, rtol=1e-4, atol=1e-4)
    # and the network's residual beats the per-layer one on the product's error
    truth = x.astype(np.float64) @ first @ second
    error = lambda m: np.linalg.norm(run_ort(m, {"x": x}) - truth)
    assert error(out) < error(per_layer)


RNG = np.random.default_rng(31)


def test_network_budget_buying_nothing_is_exit_10():
    with pytest.raises(NothingToDoError, match="buys no residual column"):
        onnxopt.optimize(matmul_model(heavy_tailed(64, 8)), preset="weight-only", **EXACT, rex_budget=0.01, rex_allocation="network")


def test_layer_mode_is_the_per_layer_residual_order():
    """rex_allocation="layer" builds exactly residual_order's columns and codes (the
    behaviour before the option)."""
    weight = uneven_columns(128, 40, seed=2)
    out, report = onnxopt.optimize(matmul_model(weight), preset="weight-only", **EXACT, rex_budget=0.3, rex_allocation="layer")
    assert weight_only_stats(report).stats["rex_allocation"] == "layer"
    base = quantize_blocks(weight, 4, 32)
    reference = residual_order(weight, base, 12, 4)
    residual = next(n for n in nbits_nodes(out) if "_rex_" in n.name)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert np.array_equal(inits[next(n.input[0] for n in out.graph.node if n.op_type == "Expand")], reference.columns)
    assert np.array_equal(decoded_weight(out, residual), reference.quantized.dequantized())


def test_cli_rex_allocation_flag(tmp_path, capsys):
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(two_layer_model(exact_grid_weight(64, 64), uneven_columns(64, 128, seed=4)), str(src))
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--rex-budget", "0.25", "--rex-allocation", "network", "--verify", "-q"]) == 0
    names = [n.name for n in nbits_nodes(onnx.load(str(dst)))]
    assert not any(n.startswith("first_rex") for n in names) and any(n.startswith("second_rex") for n in names)
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--rex-budget", "0.25", "--rex-allocation", "layer", "-q"]) == 0
    names = [n.name for n in nbits_nodes(onnx.load(str(dst)))]
    assert any(n.startswith("first_rex") for n in names) and any(n.startswith("second_rex") for n in names)
    capsys.readouterr()
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--rex-budget", "0.25", "--rex-allocation", "uniform"]) == 7
    assert "'network' or 'layer'" in capsys.readouterr().err
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--rex-allocation", "network"]) == 7
    assert "needs --rex-budget" in capsys.readouterr().err


def test_bytes_left_by_the_one_rung_choice_are_refilled():
    # A: the greedy gives three 2-bit rungs and one 4-bit upgrade (45 bytes, mixed); one node
    # keeps 2 bits over its three columns (30 bytes) and the 15 left buy a 2-bit column of B
    a = table([[1.0] * 3, [0.1] * 3, [0.0] * 3], costs=(10, 25))
    b = table([[1.0] * 4, [0.1] * 4, [0.0] * 4], signal=20.0, costs=(10, 25))
    assert [r.tolist() for r in greedy_rungs([a, b], 45)] == [[2, 1, 1], [0, 0, 0, 0]]
    allocation = allocate_network([a, b], 45)
    assert allocation.mixed_layers == 1
    assert [(c[0], c[1].tolist()) for c in allocation.choices] == [(2, [0, 1, 2]), (2, [0])]
    assert allocation.spent == 40
    assert allocation.kept_gain == pytest.approx(2.7 + 0.9 / 20)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (2, False)])
def test_second_pass_decodes_the_base_columns_from_the_packed_bytes(bits, symmetric):
    from onnxopt.passes.weight_only.blockwise import packed_tensors
    from onnxopt.passes.weight_only.residual import decoded_packed_columns

    weight = uneven_columns(100, 24, seed=bits)
    base = quantize_blocks(weight, bits, 32, symmetric=symmetric)
    columns = np.array([0, 3, 4, 17, 23])
    decoded = decoded_packed_columns(*packed_tensors(base), columns, k=100, bits=bits, block_size=32)
    assert np.array_equal(decoded, base.dequantized()[:, columns])


def test_symmetric_network_residual_matches_ort():
    weight = uneven_columns(128, 40, seed=11)
    out, report = onnxopt.optimize(matmul_model(weight), preset="weight-only", **EXACT, symmetric=True, rex_budget=0.3, validate=True)
    assert weight_only_stats(report).stats["rex_layers"] == 1
    x = RNG.standard_normal((2, 3, 128)).astype(np.float32)
    expected = x.astype(np.float64) @ layer_weight(out, "proj")
    assert np.allclose(run_ort(out, {"x": x}), expected, rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(layer_weight(out, "proj") - weight) < np.linalg.norm(quantize_blocks(weight, 4, 32, symmetric=True).dequantized() - weight)
