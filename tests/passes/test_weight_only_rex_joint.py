"""weight-only's network residual in its default form: base and residual codes rounded
together (``rex_joint``) and the residual without zero points (``rex_symmetric``).  The joint
rounding on its own (never worse than the sequential residual, base codes moved by at most
one level, the reported error the decoded one), and the pass: the rewritten base and residual
initializers decoded with numpy against ONNX Runtime, only the residual's columns of the base
changed, and the joint form's error below the sequential one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxopt.passes.weight_only.blockwise import quantize_blocks
from onnxopt.passes.weight_only.residual import BaseColumns, column_errors, joint_column_errors, joint_rounding

import onnxopt
from tests.passes.test_weight_only import decoded_weight, matmul_model, nbits_nodes, run_ort
from tests.passes.test_weight_only_rex import EXACT, uneven_columns, weight_only_stats
from tests.passes.test_weight_only_rex_network import layer_weight, two_layer_model

RNG = np.random.default_rng(41)


@pytest.mark.parametrize("bits,block_size,symmetric", [(2, 128, True), (2, 64, False), (4, 32, True)])
def test_joint_rounding_lowers_the_error_and_moves_base_codes_by_at_most_one(bits, block_size, symmetric):
    weight = uneven_columns(200, 16, seed=bits + block_size)  # K not a multiple of either block size
    base = quantize_blocks(weight, 4, 32)
    sequential = quantize_blocks(weight - base.dequantized(), bits, block_size, symmetric=symmetric)
    rows = RNG.uniform(0.5, 2.0, 200).astype(np.float32)
    codes, joint = joint_rounding(weight, BaseColumns.of(base, slice(None)), sequential, rows)
    moved = codes.astype(np.int16) - base.codes.astype(np.int16)
    assert np.abs(moved).max() <= 1 and moved.any()
    assert codes.max() <= 15 and joint.codes.max() <= 2**bits - 1
    assert np.array_equal(joint.zero_points, sequential.zero_points)
    new_base = BaseColumns(codes, base.scales, base.zero_points, 4, 32).decoded(200)
    decoded = new_base + joint.dequantized()
    assert joint.sq_error == pytest.approx(float(np.square(weight.astype(np.float64) - decoded).sum()), rel=1e-4)
    before = column_errors(weight, base.dequantized() + sequential.dequantized(), rows)
    after = column_errors(weight, decoded, rows)
    assert (after <= before * (1 + 1e-5)).all() and after.sum() < 0.95 * before.sum()
    assert np.allclose(joint_column_errors(weight, BaseColumns.of(base, slice(None)), sequential, rows), after, rtol=1e-5)


def test_network_joint_residual_matches_ort_and_only_its_columns_of_the_base_move():
    weight = uneven_columns(256, 48, seed=7)
    model = matmul_model(weight)
    plain, _ = onnxopt.optimize(model, preset="weight-only", **EXACT, rex_budget=0.3)
    out, report = onnxopt.optimize(model, preset="weight-only", **EXACT, rex_budget=0.3, rex_joint=False, validate=True)
    onnx.checker.check_model(plain, full_check=True)
    stats = weight_only_stats(report).stats
    assert stats["rex_layers"] == 1 and stats["layers"][0]["rex_bits"] == 2
    x = RNG.standard_normal((2, 3, 256)).astype(np.float32)
    for m in (plain, out):
        assert np.allclose(run_ort(m, {"x": x}), x.astype(np.float64) @ layer_weight(m, "proj"), rtol=1e-4, atol=1e-4)
    base_joint, base_sequential = (decoded_weight(m, next(n for n in nbits_nodes(m) if "_rex_" not in n.name)) for m in (plain, out))
    moved = np.flatnonzero(np.abs(base_joint - base_sequential).sum(axis=0) > 0)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in plain.graph.initializer}
    columns = inits[next(n for n in plain.graph.node if n.op_type == "Expand").input[0]]
    assert moved.size and set(moved) <= set(columns.tolist())
    error = lambda m: np.linalg.norm(layer_weight(m, "proj") - weight)
    assert error(plain) < 0.95 * error(out)


def test_network_residual_is_symmetric_by_default_and_matches_ort():
    first, second = uneven_columns(128, 128, seed=3), uneven_columns(128, 24, seed=4)
    model = two_layer_model(first, second)
    x = RNG.standard_normal((2, 3, 128)).astype(np.float32)
    for symmetric, inputs in ((True, 3), (False, 4)):
        out, _ = onnxopt.optimize(model, preset="weight-only", **EXACT, rex_budget=0.25, rex_symmetric=symmetric, validate=True)
        onnx.checker.check_model(out, full_check=True)
        residuals = [n for n in nbits_nodes(out) if "_rex_" in n.name]
        assert residuals and all(len(n.input) == inputs for n in residuals)  # x, B, scales (+ zero points)
        bases = [n for n in nbits_nodes(out) if "_rex_" not in n.name]
        assert all(len(n.input) == 4 for n in bases)  # the base keeps its zero points
        expected = (x.astype(np.float64) @ layer_weight(out, "first")) @ layer_weight(out, "second")
        assert np.allclose(run_ort(out, {"x": x}), expected, rtol=1e-4, atol=1e-4)


def test_joint_rounding_a_chunk_of_columns_at_a_time_equals_all_at_once(monkeypatch):
    """The second pass rounds a layer's chosen columns a chunk at a time (bounded
    temporaries); the columns are independent, so the result is the same."""
    import onnxopt.passes.weight_only.residual as residual_module

    weight = uneven_columns(200, 37, seed=5)
    base = quantize_blocks(weight, 4, 32)
    sequential = quantize_blocks(weight - base.dequantized(), 2, 128, symmetric=True)
    rows = RNG.uniform(0.5, 2.0, 200).astype(np.float32)
    whole_codes, whole = joint_rounding(weight, BaseColumns.of(base, slice(None)), sequential, rows)
    monkeypatch.setattr(residual_module, "CHUNK_ELEMENTS", 200 * 8)  # 8 columns per chunk: 5 chunks, the last partial
    codes, chunked = residual_module.joint_rounding_chunked(weight, BaseColumns.of(base, slice(None)), sequential, rows)
    assert np.array_equal(codes, whole_codes) and np.array_equal(chunked.codes, whole.codes)
    np.testing.assert_array_equal(chunked.scales, whole.scales)
    assert chunked.sq_error == pytest.approx(whole.sq_error, rel=1e-9)
