"""weight-only with float zero points (``zero_points="float"``, ``--zero-points float``): the
float32 zero points laid out as ONNX Runtime's MatMulNBits reads them (ORT against the numpy
decoder at accuracy_level 0), the least-squares fit never above the uint8 search's (weighted)
error on Gaussian and heavy-tailed weights, the default path untouched, the per-layer report,
option validation and the CLI flag."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxopt.passes.weight_only.blockwise import (
    dequantize_packed,
    packed_tensors,
    quantize_blocks,
)

import onnxopt
from onnxopt.cli import main as cli_main
from onnxopt.errors import PipelineError
from tests.passes.test_weight_only import (
    EXACT,
    RNG,
    attrs,
    decoded_weight,
    heavy_tailed,
    matmul_model,
    nbits_nodes,
    run_ort,
)

FLOAT = {"zero_points": "float"}


def gaussian(k: int, n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((k, n)) * 0.02).astype(np.float32)


def weighted_error(weight: np.ndarray, decoded: np.ndarray, rows: np.ndarray | None = None) -> float:
    squared = np.square(decoded.astype(np.float64) - weight)
    return float((squared if rows is None else rows[:, None] * squared).sum())


# --------------------------------------------------------------------------- layout
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size,k", [(32, 96), (32, 100), (128, 200)])
def test_float_zero_points_pack_as_one_float_per_block(bits, block_size, k):
    weight = heavy_tailed(k, 24, seed=bits + k)
    result = quantize_blocks(weight, bits, block_size, float_zero_points=True)
    b, scales, zero_points = packed_tensors(result)
    n_blocks = -(-k // block_size)
    assert zero_points.dtype == np.float32 and zero_points.shape == (24 * n_blocks,)
    assert not np.array_equal(zero_points, np.rint(zero_points))  # really fractional
    assert result.codes.max() <= 2**bits - 1
    decoded = dequantize_packed(b, scales, zero_points, k=k, n=24, bits=bits, block_size=block_size)
    np.testing.assert_array_equal(decoded, result.dequantized())
    assert np.isclose(weighted_error(weight, decoded), result.sq_error, rtol=1e-4)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("block_size,k", [(32, 64), (32, 100), (128, 256)])
def test_ort_matches_numpy_product_with_float_zero_points(bits, block_size, k):
    weight = heavy_tailed(k, 40, seed=k + bits)
    out, report = onnxopt.optimize(matmul_model(weight), preset="weight-only", **EXACT, **FLOAT, weight_bits=bits, block_size=block_size, validate=True)
    (node,) = nbits_nodes(out)
    assert attrs(node) == {"K": k, "N": 40, "bits": bits, "block_size": block_size, "accuracy_level": 0}
    inits = {t.name: t for t in out.graph.initializer}
    assert inits[node.input[3]].data_type == onnx.TensorProto.FLOAT
    x = RNG.standard_normal((2, 3, k)).astype(np.float32)
    expected = x.astype(np.float64) @ decoded_weight(out, node).astype(np.float64)
    got = run_ort(out, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    (layer,) = next(p for p in report.passes if p.name == "weight-only").stats["layers"]
    assert layer["zero_points"] == "float" and layer["relative_error"] < layer["rtn_relative_error"]


# --------------------------------------------------------------------------- the fit
@pytest.mark.parametrize("make", [gaussian, heavy_tailed])
@pytest.mark.parametrize("bits,block_size", [(4, 32), (4, 128), (2, 32), (8, 64)])
def test_float_fit_error_at_most_the_uint8_search(make, bits, block_size):
    weight = make(512, 64, seed=block_size + bits)
    uint8 = quantize_blocks(weight, bits, block_size)
    fitted = quantize_blocks(weight, bits, block_size, float_zero_points=True)
    # block by block: the fit starts from the uint8 search's result and only ever lowers a block's error
    k_blocks = 512 // block_size
    blocks = lambda r: np.square(r.dequantized() - weight, dtype=np.float64).reshape(k_blocks, block_size, -1).sum(axis=1)
    assert np.all(blocks(fitted) <= blocks(uint8) * (1 + 1e-5) + 1e-14)
    if bits <= 4:  # the float zero point is a real extra degree of freedom at low bit-widths
        assert fitted.relative_error < 0.97 * uint8.relative_error, (fitted.relative_error, uint8.relative_error)


def test_weighted_float_fit_at_most_the_weighted_uint8_search():
    weight = heavy_tailed(256, 48, seed=5)
    rows = np.random.default_rng(8).uniform(0.01, 5.0, 256).astype(np.float32)
    uint8 = quantize_blocks(weight, 4, 32, row_weight=rows).dequantized()
    fitted = quantize_blocks(weight, 4, 32, row_weight=rows, float_zero_points=True).dequantized()
    unweighted = quantize_blocks(weight, 4, 32, float_zero_points=True).dequantized()
    assert weighted_error(weight, fitted, rows) < 0.97 * weighted_error(weight, uint8, rows)
    assert weighted_error(weight, fitted, rows) < weighted_error(weight, unweighted, rows)


def test_float_fit_alternation_lowers_the_error_of_its_starts():
    """The alternation (codes ↔ least-squares scale and zero point) improves on the best of its
    starting points (the uint8 search's result, float min/max round to nearest)."""
    weight = heavy_tailed(1024, 64, seed=9)
    fitted = quantize_blocks(weight, 4, 32, float_zero_points=True)
    no_rounds = quantize_blocks(weight, 4, 32, float_zero_points=True, float_rounds=0)
    assert fitted.relative_error < no_rounds.relative_error


def test_layers_kept_at_8_bits_keep_uint8_zero_points():
    """ORT's CPU kernel has no 8-bit weights with float zero points: keep_8bit layers stay uint8."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="proj"), helper.make_node("MatMul", ["h", "W2"], ["y"], name="lm_head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 16])],
                              [numpy_helper.from_array(heavy_tailed(64, 32, 1), "W1"), numpy_helper.from_array(heavy_tailed(32, 16, 2), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, report = onnxopt.optimize(model, preset="weight-only", **EXACT, **FLOAT, keep_8bit=["lm_head"], validate=True)
    layers = {r["layer"]: (r["bits"], r["zero_points"]) for r in next(p for p in report.passes if p.name == "weight-only").stats["layers"]}
    assert layers == {"proj": (4, "float"), "lm_head": (8, "uint8")}
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    proj, head = nbits_nodes(out)
    expected = x.astype(np.float64) @ decoded_weight(out, proj) @ decoded_weight(out, head)
    np.testing.assert_allclose(run_ort(out, {"x": x}), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_default_zero_points_stay_uint8():
    weight = heavy_tailed(128, 16, seed=2)
    out, report = onnxopt.optimize(matmul_model(weight), preset="weight-only", **EXACT)
    (node,) = nbits_nodes(out)
    inits = {t.name: t for t in out.graph.initializer}
    assert inits[node.input[3]].data_type == onnx.TensorProto.UINT8
    (layer,) = next(p for p in report.passes if p.name == "weight-only").stats["layers"]
    assert layer["zero_points"] == "uint8"
    _, symmetric = onnxopt.optimize(matmul_model(weight), preset="weight-only", symmetric=True)
    assert next(p for p in symmetric.passes if p.name == "weight-only").stats["layers"][0]["zero_points"] is None


# --------------------------------------------------------------------------- options and CLI
def test_symmetric_with_float_zero_points_is_refused():
    with pytest.raises(PipelineError, match=r"zero_points \(--zero-points\) of pass weight-only cannot be 'float' with symmetric quantization"):
        onnxopt.optimize(matmul_model(heavy_tailed(32, 8)), preset="weight-only", symmetric=True, **FLOAT)
    with pytest.raises(PipelineError, match="zero_points"):
        onnxopt.optimize(matmul_model(heavy_tailed(32, 8)), preset="weight-only", zero_points="int4")
    with pytest.raises(PipelineError, match="cannot be 'float' at weight_bits 8: ONNX Runtime's CPU MatMulNBits refuses 8-bit weights"):
        onnxopt.optimize(matmul_model(heavy_tailed(32, 8)), preset="weight-only", weight_bits=8, **FLOAT)
    with pytest.raises(ValueError, match="asymmetric"):
        quantize_blocks(heavy_tailed(32, 8), symmetric=True, float_zero_points=True)


def test_cli_zero_points_flag(tmp_path, capsys):
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(matmul_model(heavy_tailed(128, 16)), str(src))
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--zero-points", "float", "-q"]) == 0
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    (node,) = nbits_nodes(model)
    inits = {t.name: t for t in model.graph.initializer}
    assert inits[node.input[3]].data_type == onnx.TensorProto.FLOAT and attrs(node)["accuracy_level"] == 4
    x = RNG.standard_normal((2, 3, 128)).astype(np.float32)
    reference = x @ decoded_weight(model, node)
    assert np.abs(run_ort(model, {"x": x}) - reference).max() <= 0.02 * np.abs(reference).max()
    capsys.readouterr()
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--symmetric", "--zero-points", "float"]) == 7
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be 'float' with symmetric quantization" in err[0] and "Traceback" not in err[0]
    assert cli_main([str(src), "-o", str(dst), "--zero-points", "float"]) == 7
    assert "need --quantize wN" in capsys.readouterr().err


@pytest.mark.parametrize("allocation", ["network", "layer"])
def test_residual_order_on_a_float_zero_point_base(allocation: str):
    """rex_budget with float zero points: the base has float32 zero points, the residual order
    uint8 ones (per layer) or none (network: ``rex_symmetric``); ORT's output is x @ (Ŵ + R̂ on the chosen columns).  The network allocation
    decodes the base from its packed constants in its second pass: float zero points too."""
    from tests.passes.test_weight_only_rex import (
        base_and_residual,
        reconstructed,
        uneven_columns,
    )

    weight = uneven_columns(128, 40, seed=3)
    out, report = onnxopt.optimize(matmul_model(weight), preset="weight-only", **EXACT, **FLOAT, rex_budget=0.5, rex_allocation=allocation, validate=True)
    base, residual = base_and_residual(out)
    inits = {t.name: t for t in out.graph.initializer}
    assert inits[base.input[3]].data_type == onnx.TensorProto.FLOAT
    if allocation == "layer":
        assert inits[residual.input[3]].data_type == onnx.TensorProto.UINT8
    else:
        assert len(residual.input) == 3  # x, B, scales: the network residual is symmetric by default
    x = RNG.standard_normal((2, 3, 128)).astype(np.float32)
    expected = x.astype(np.float64) @ reconstructed(out)
    np.testing.assert_allclose(run_ort(out, {"x": x}), expected, rtol=0, atol=3e-5 * np.abs(expected).max())
    (layer,) = next(p for p in report.passes if p.name == "weight-only").stats["layers"]
    assert layer["zero_points"] == "float" and layer["rex_relative_error"] < layer["relative_error"]
