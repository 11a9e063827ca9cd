"""REx in MatMulNBits form: a second, sparse MatMulNBits order over the output columns whose
base quantization left the largest error.

Before::   x ── MatMulNBits(base: W[K, N]) ── y
After::    x ─┬─ MatMulNBits(base: W[K, N]) ───────────── y_b ─┐
              └─ MatMulNBits(residual: (W − Ŵ)[:, S]) ─── r ───┴─ ScatterElements(y_b, S, r, add) ── y
           (all N columns: the two outputs are summed with an Add)

For a weight W[K, N] and its block-wise base Ŵ, the error of output column n is
e_n = Σ_k ρ_k (W_kn − Ŵ_kn)², with ρ_k = E[x_k²] of the input feature (from a
LayerNormalization's γ, β; 1 without one) — the expected squared output error of that
column.  The ``count`` columns S with the largest e_n get a residual order: the residual
(W − Ŵ)[:, S] quantized block-wise again (same block size, ``bits`` wide, the same clipping
search), computed by a MatMulNBits with N = |S| on the same input and added onto the base
output at S.  A base error is at most half a step; the residual's 2^bits − 1 levels cover
that interval, so a 4-bit residual order leaves those columns with about the error of an
8-bit weight.

The budget is in weight bytes: ``budget`` × the base's bytes (codes, scales and zero
points) buys ⌊budget · N · base column bytes / residual column bytes⌋ columns per layer
(with a residual as wide as the base, a budget of 1.0 is a full second order).  A narrower
residual covers more columns for the same bytes: the residual of a 4-bit base is nearly
uniform within ± half a step, so a 2-bit residual (3 steps over that interval) in longer
blocks (``rex_block_size``, e.g. 128: the scales are a large share of a 2-bit column's
bytes) over *all* columns removes more error per byte than a 4-bit one over some; ONNX
Runtime's CPU kernel runs 2-bit MatMulNBits on its fast path only with
``accuracy_level`` 4, though (at 0 it dequantizes the whole weight on every call).

Memory: the base is decoded a chunk of columns at a time to rank the columns
(``CHUNK_ELEMENTS``), and only the chosen columns' residual is materialised.

How the partial order joins the output was measured in ONNX Runtime 1.32 (CPU, one 2048 ×
8192 layer, 4 bits, a quarter of the columns, 1 and 2 threads, one token and 128 tokens;
``python -m bench decode --combine``): ScatterElements with ``reduction="add"`` (indices
expanded to the residual's shape) was the fastest join at 128 tokens and at one token with
2 threads, and within the timing noise of the alternatives at one token with 1 thread
(base columns reordered so S is a prefix, then Pad + Add + Gather; Split + Add + Concat +
Gather; Gather of the residual + mask Mul + Add), and it leaves the base untouched, so it is
the one emitted.  ScatterElements' reduction needs opset 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blockwise import CHUNK_ELEMENTS, BlockQuantized, decode, quantize_blocks

#: ScatterElements with ``reduction`` (the partial order's join).
MIN_OPSET = 16


@dataclass
class Residual:
    """The residual order of one weight: the columns it covers (ascending), their quantized
    residual, and the squared weight error of the whole layer after it (unweighted)."""

    columns: np.ndarray
    quantized: BlockQuantized
    sq_error: float
    full: bool


def column_bytes(k: int, bits: int, block_size: int, symmetric: bool) -> int:
    """Bytes one output column takes in MatMulNBits: packed codes, float32 scales and the
    zero points (each column's packed to whole bytes)."""
    n_blocks = -(-k // block_size)
    zero_points = 0 if symmetric else -(-n_blocks * bits // 8)
    return n_blocks * block_size * bits // 8 + 4 * n_blocks + zero_points


def budget_columns(k: int, n: int, budget: float, base_bits: int, bits: int, block_size: int, symmetric: bool, rex_block_size: int | None = None) -> int:
    """How many residual columns (``bits`` wide, blocks of ``rex_block_size``, default the
    base's) ``budget`` × the base's bytes pays for (at most N)."""
    base = column_bytes(k, base_bits, block_size, symmetric) * n
    residual = column_bytes(k, bits, rex_block_size or block_size, symmetric)
    return int(min(n, np.floor(budget * base / residual + 1e-9)))


def column_errors(weight: np.ndarray, dequantized: np.ndarray, row_weight: np.ndarray | None = None) -> np.ndarray:
    """e_n = Σ_k ρ_k (W_kn − Ŵ_kn)² (float64, [N])."""
    error = np.square(weight - dequantized, dtype=np.float32)
    if row_weight is not None:
        error *= np.asarray(row_weight, dtype=np.float32)[:, None]
    return error.sum(axis=0, dtype=np.float64)


def decoded_columns(base: BlockQuantized, columns: np.ndarray | slice) -> np.ndarray:
    """Ŵ[:, columns] (float32 [K, |columns|]) decoded from the codes of those columns only."""
    return decode(base.codes[columns], base.scales[columns], base.zero_points[columns])[:, : base.k].T


def base_errors(weight: np.ndarray, base: BlockQuantized, row_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(weighted e_n, plain Σ_k (W_kn − Ŵ_kn)²) per column, decoded a chunk of columns at a
    time (temporaries bounded by CHUNK_ELEMENTS)."""
    k, n = weight.shape
    weighted, plain = np.empty(n), np.empty(n)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        part = slice(start, min(start + step, n))
        w = weight[:, part]
        plain[part] = column_errors(w, decoded_columns(base, part))
        weighted[part] = plain[part] if row_weight is None else column_errors(w, decoded_columns(base, part), row_weight)
    return weighted, plain


def largest_columns(errors: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` columns with the largest error, ascending (ties: lower index first)."""
    if count >= errors.size:
        return np.arange(errors.size, dtype=np.int64)
    order = np.argsort(-errors, kind="stable")[:count]
    return np.sort(order).astype(np.int64)


def residual_order(
    weight: np.ndarray, base: BlockQuantized, count: int, bits: int, row_weight: np.ndarray | None = None, block_size: int | None = None, **search
) -> Residual:
    """The residual order of ``count`` columns, ``bits`` wide in blocks of ``block_size``
    (default the base's; ``search``: the quantize_blocks options)."""
    weighted, plain = base_errors(weight, base, row_weight)
    columns = largest_columns(weighted, count)
    residual = weight[:, columns] - decoded_columns(base, columns)
    quantized = quantize_blocks(residual, bits, block_size or base.block_size, symmetric=base.symmetric, row_weight=row_weight, **search)
    sq_error = float(plain.sum() - plain[columns].sum()) + quantized.sq_error
    return Residual(columns, quantized, max(sq_error, 0.0), columns.size == weight.shape[1])


__all__ = ["MIN_OPSET", "Residual", "base_errors", "budget_columns", "column_bytes", "column_errors", "decoded_columns", "largest_columns", "residual_order"]
