"""The exhaustive integer-zero-point fit of bench.zero_point_bound: it is a valid 4-bit,
block-32 quantization (each block's values lie on one grid of at most 16 levels) and no
worse than round to nearest or onnxopt's search, block by block in total."""

from __future__ import annotations

import numpy as np

from bench.zero_point_bound import BLOCK, exhaustive_integer_fit
from onnxopt.passes.weight_only.blockwise import quantize_blocks


def test_exhaustive_fit_is_a_4bit_grid_and_not_worse_than_the_search() -> None:
    rng = np.random.default_rng(3)
    weight = (rng.standard_t(5, size=(96, 12)) * 0.05).astype(np.float32)
    fitted = exhaustive_integer_fit(weight)
    assert fitted.shape == weight.shape
    for column in range(weight.shape[1]):
        for start in range(0, weight.shape[0], BLOCK):
            values = np.unique(fitted[start:start + BLOCK, column])
            step = np.diff(values).min() if len(values) > 1 else 1.0
            levels = (values - values[0]) / step
            np.testing.assert_allclose(levels, np.rint(levels), atol=1e-3)  # one step apart, integer multiples
            assert levels.max() <= 15 + 1e-3  # at most 16 levels
    error = float(np.square(fitted - weight).sum())
    rtn = float(np.square(quantize_blocks(weight, 4, BLOCK, search=False).dequantized() - weight).sum())
    search = float(np.square(quantize_blocks(weight, 4, BLOCK).dequantized() - weight).sum())
    assert error <= search * (1 + 1e-6) < rtn
