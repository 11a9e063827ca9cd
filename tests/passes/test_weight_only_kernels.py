"""weight-only: MatMulNBits forms that ONNX Runtime's CPU kernel runs off its fast path are
counted per reason in the coverage and printed as a warning (2-bit blocks of 256, 2/8 bits at
accuracy_level 0, float zero points, a slow residual order); fast forms print nothing.  The
slow forms still compute the right product (ORT against x @ dequant(W))."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxopt.passes.weight_only.blockwise import dequantize_packed
from onnxopt.passes.weight_only.kernels import cpu_slow_form

import onnxopt
from onnxopt.cli import main as cli_main
from onnxopt.runtime import run
from tests.passes.test_weight_only import heavy_tailed, matmul_model, nbits_nodes


@pytest.mark.parametrize(
    ("bits", "block_size", "level", "float_zero_points", "slow"),
    [
        (4, 32, 4, False, False), (4, 256, 0, False, False), (4, 16, 4, False, False),
        (8, 32, 4, False, False), (8, 32, 0, False, True),
        (2, 32, 4, False, False), (2, 128, 4, False, False), (2, 256, 4, False, True), (2, 16, 4, False, True), (2, 64, 0, False, True),
        (4, 32, 4, True, True),
    ],
)
def test_fast_path_rule(bits, block_size, level, float_zero_points, slow):
    assert (cpu_slow_form(bits, block_size, level, float_zero_points) is not None) == slow


def slow_counts(report) -> dict[str, int]:
    return next(p for p in report.passes if p.name == "weight-only").stats["coverage"]["slow_kernel"]


def test_default_w4_is_all_fast_and_prints_no_warning():
    _, report = onnxopt.optimize(matmul_model(heavy_tailed(256, 32)), preset="weight-only")
    assert slow_counts(report) == {}
    assert "fast path" not in report.format_table()


@pytest.mark.parametrize(
    ("options", "reason_start"),
    [
        ({"weight_bits": 2, "block_size": 256}, "2-bit weights in blocks of 256"),
        ({"weight_bits": 8, "accuracy_level": 0}, "8-bit weights at accuracy_level 0"),
        ({"zero_points": "float"}, "float zero points"),
    ],
)
def test_slow_base_form_is_counted_and_warned_and_still_exact(options, reason_start):
    weight = heavy_tailed(256, 32, seed=5)
    model, report = onnxopt.optimize(matmul_model(weight), preset="weight-only", **options)
    counts = slow_counts(report)
    assert list(counts.values()) == [1] and next(iter(counts)).startswith(reason_start)
    assert "warning: weight-only: 1 MatMulNBits run off ONNX Runtime's CPU fast path" in report.format_table()
    (node,) = nbits_nodes(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    a = {x.name: x.i for x in node.attribute}
    zero_points = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    decoded = dequantize_packed(inits[node.input[1]], inits[node.input[2]], zero_points, k=256, n=32, bits=a["bits"], block_size=a["block_size"])
    x = np.random.default_rng(0).standard_normal((2, 3, 256)).astype(np.float32)
    reference = x @ decoded
    tolerance = 0.02 if a["accuracy_level"] == 4 else 1e-4  # level 4 quantizes x to int8 inside the kernel
    assert np.abs(run(model, {"x": x})["y"] - reference).max() <= tolerance * np.abs(reference).max()


def test_slow_residual_order_is_counted_apart_from_a_fast_base():
    _, report = onnxopt.optimize(matmul_model(heavy_tailed(512, 64, seed=2)), preset="weight-only", rex_budget=0.5, rex_bits=2,
                                 rex_block_size=256, rex_allocation="layer")
    stats = next(p for p in report.passes if p.name == "weight-only").stats
    assert stats["layers"][0]["rex_bits"] == 2 and stats["layers"][0]["bits"] == 4
    assert slow_counts(report) == {"2-bit weights in blocks of 256 (use blocks of 32, 64, 128)": 1}


def test_cli_prints_the_warning(tmp_path, capsys):
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(matmul_model(heavy_tailed(256, 16)), str(src))
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w2", "--block-size", "256"]) == 0
    err = capsys.readouterr().err
    assert "warning: weight-only: 1 MatMulNBits run off ONNX Runtime's CPU fast path" in err and "blocks of 256" in err
