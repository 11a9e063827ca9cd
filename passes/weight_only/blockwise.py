"""Block-wise low-bit weight quantization in the layout of ONNX Runtime's ``MatMulNBits``.

A weight W[K, N] (the right operand of ``x @ W``) is cut along K into blocks of
``block_size`` rows per output column; each block b of column n has a float scale s and an
integer zero point z, and its codes q in [0, 2^bits − 1] decode as ``(q − z)·s``.

Layout (com.microsoft ``MatMulNBits``, checked against ONNX Runtime in the tests):

* ``B``: uint8 [N, n_blocks, block_size·bits/8]; codes along K packed low bits first
  (element j of a byte at bit ``j·bits``); the last block is zero-padded when K is not a
  multiple of ``block_size``.
* ``scales``: [N·n_blocks] in the weight's float type (column-major by block).
* ``zero_points``: uint8 [N·ceil(n_blocks·bits/8)], each column's zero points packed like
  the codes (the column padded to whole bytes); absent when symmetric, and the kernel then
  uses ``2^(bits−1)``.  With ``float_zero_points``: [N·n_blocks] in the scales' float type
  (one per block, column-major like the scales; ONNX Runtime's CPU kernel takes them for 2
  and 4 bits, not 8, and leaves its fast path for them).

Quantizers (:func:`quantize_blocks`):

* **round to nearest** (``search=False``): asymmetric — the block's range [min(w, 0),
  max(w, 0)] split into 2^bits − 1 steps, z = round(−lo/s); symmetric — the block's largest
  magnitude (with its sign) maps to code 0, s = m / −2^(bits−1), so the far side keeps
  2^(bits−1) − 1 steps (ONNX Runtime's and llama.cpp's Q4_0 convention).
* **clipping search** (``search=True``): for every block at once, the RTN step is shrunk by
  each factor of a grid from 1 down to ``min_shrink`` (``steps`` factors); with zero points
  also with the zero point moved by ±1 and the step that still covers the block's range from
  there (an integer zero point pins 0 to one of the levels, so the neighbouring placements are
  the other real choices).  The per-block candidate with the lowest squared reconstruction
  error wins.  Then ``refine_rounds`` alternations in the spirit of HQQ's, but plain least
  squares and integer zero points: with the codes fixed, refit the block's step (and, with
  zero points, the offset, rounded to an integer zero point), re-round the codes, keep the
  result per block only where the error fell.  Round to nearest is the starting point and
  every later candidate is taken only where it lowers the error, so the search's error is
  never above round to nearest's, block by block.
* **float zero points** (``float_zero_points=True``): from the result above and from float
  round to nearest on the block's [min, max] (shrunk by each of :data:`FLOAT_FIT_SHRINKS`
  about its middle), ``float_rounds`` alternations of codes = clip(round(w/s + z)) and the
  closed-form least-squares (s, z) of those codes (the line w ≈ s·q − s·z), kept per block
  where the error fell; each step minimises the (weighted) error for the other fixed.  HQQ
  fits the zero point alone, for an Lp (p < 1) loss, with the scale of the block's range.
  The padding of a last partial block weighs nothing (a float zero point does not decode it
  to 0; the kernel never reads it).

With ``row_weight`` (E[x_k²] of the input feature k; the pass takes it from a LayerNorm's
γ and β) the search minimises Σ_k E[x_k²]·(w_k − ŵ_k)², the expected output error of the
block's column, instead of the plain weight error; the reported errors stay unweighted.

Everything is vectorised over all blocks of a chunk of output columns (``CHUNK_ELEMENTS``
weights per chunk bound the temporaries; each chunk is transposed and padded on its own, so
no full copy of W is made).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)
#: Weights processed at once: each search candidate makes a few float32 temporaries of this size.
CHUNK_ELEMENTS = 1 << 21
TINY = 1e-30
#: Alternations of the float-zero-point fit (codes ↔ least-squares scale and zero point).
FLOAT_FIT_ROUNDS = 8
#: Float round-to-nearest ranges (shrunk about the block's middle) the fit also starts from.
FLOAT_FIT_SHRINKS = (1.0, 0.9, 0.8)


@dataclass
class BlockQuantized:
    """A weight quantized block-wise: codes [N, n_blocks, block_size] (uint8), scales and zero
    points [N, n_blocks]; the squared error per column of round to nearest and of the result."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    k: int
    symmetric: bool
    rtn_sq_error: float
    sq_error: float
    sq_norm: float

    @property
    def float_zero_points(self) -> bool:
        return self.zero_points.dtype.kind == "f"

    @property
    def rtn_relative_error(self) -> float:
        return float(np.sqrt(self.rtn_sq_error / max(self.sq_norm, TINY)))

    @property
    def relative_error(self) -> float:
        return float(np.sqrt(self.sq_error / max(self.sq_norm, TINY)))

    def dequantized(self) -> np.ndarray:
        """Ŵ[K, N] in float32."""
        return decode(self.codes, self.scales, self.zero_points)[:, : self.k].T.copy()


# --------------------------------------------------------------------------- layout helpers
def blocked(weight: np.ndarray, block_size: int) -> np.ndarray:
    """W[K, N] → float32 [N, n_blocks, block_size], zero-padded along K."""
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    out = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    out[:, :k] = weight.T
    return out.reshape(n, n_blocks, block_size)


def decode(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray) -> np.ndarray:
    """(q − z)·s over [N, n_blocks, block_size] → [N, n_blocks·block_size] float32."""
    values = (codes.astype(np.float32) - zero_points[..., None].astype(np.float32)) * scales[..., None].astype(np.float32)
    return values.reshape(codes.shape[0], -1)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-wide codes along the last axis, low bits first (its length
    must be a multiple of 8 / bits)."""
    per_byte = 8 // bits
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte).astype(np.uint8)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for j in range(per_byte):
        packed |= grouped[..., j] << np.uint8(bits * j)
    return packed


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the last axis grows by 8 / bits."""
    per_byte = 8 // bits
    mask = np.uint8(2**bits - 1)
    parts = [(packed >> np.uint8(bits * j)) & mask for j in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """[N, n_blocks] → uint8 [N·ceil(n_blocks·bits/8)]: each column packed, padded to bytes."""
    n, n_blocks = zero_points.shape
    per_byte = 8 // bits
    padded = np.zeros((n, -(-n_blocks // per_byte) * per_byte), dtype=np.uint8)
    padded[:, :n_blocks] = zero_points
    return pack_codes(padded, bits).reshape(-1)


def unpack_zero_points(packed: np.ndarray, bits: int, n: int, n_blocks: int) -> np.ndarray:
    return unpack_codes(packed.reshape(n, -1), bits)[:, :n_blocks]


def packed_tensors(result: BlockQuantized) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, scales, zero_points or None) as the MatMulNBits inputs."""
    b = pack_codes(result.codes, result.bits)
    scales = result.scales.reshape(-1)
    if result.symmetric:
        return b, scales, None
    if result.float_zero_points:  # [N·n_blocks] in the scales' float type, as ORT reads it
        return b, scales, result.zero_points.reshape(-1).astype(scales.dtype)
    return b, scales, pack_zero_points(result.zero_points, result.bits)


def dequantize_packed(
    b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *, k: int, n: int, bits: int, block_size: int
) -> np.ndarray:
    """Ŵ[K, N] from the MatMulNBits inputs (the reference decoder of the tests)."""
    n_blocks = -(-k // block_size)
    codes = unpack_codes(b.reshape(n, n_blocks, -1), bits)
    if zero_points is None:
        z = np.full((n, n_blocks), 2 ** (bits - 1), dtype=np.uint8)
    elif zero_points.dtype.kind == "f":
        z = zero_points.reshape(n, n_blocks)
    else:
        z = unpack_zero_points(zero_points, bits, n, n_blocks)
    return decode(codes, scales.reshape(n, n_blocks), z)[:, :k].T.copy()


# --------------------------------------------------------------------------- quantizers
def _codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, top: int, float_zero: bool = False) -> np.ndarray:
    """Codes (float32, integral) for scale/zero [.., n_blocks] (computed in place); with
    ``float_zero`` the zero point is added before rounding (it need not be an integer)."""
    q = w * (1.0 / np.where(scale == 0, 1.0, scale))[..., None]
    if float_zero:
        q += zero[..., None]
        np.rint(q, out=q)
    else:
        np.rint(q, out=q)
        q += zero[..., None]
    return np.clip(q, 0, top, out=q)


def _encode(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray, top: int, rows: np.ndarray | None = None, float_zero: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Codes and squared error per block (weighted by ``rows`` [n_blocks, block_size] when
    given) for scale/zero [.., n_blocks]."""
    q = _codes(w, scale, zero, top, float_zero)
    residual = q - zero[..., None]
    residual *= scale[..., None]
    residual -= w
    np.square(residual, out=residual)
    if rows is not None:
        residual *= rows
    return q, residual.sum(axis=-1)


def _rtn_params(w: np.ndarray, bits: int, symmetric: bool, shrink: float | np.ndarray = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per block for round to nearest on the block range shrunk by ``shrink``."""
    top = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        index = np.abs(w).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(w, index, axis=-1)[..., 0] * shrink
        scale = (extreme / -half).astype(np.float32)
        return np.where(scale == 0, 1.0, scale).astype(np.float32), np.full(scale.shape, half, np.float32)
    lo = np.minimum(w.min(axis=-1), 0) * shrink
    hi = np.maximum(w.max(axis=-1), 0) * shrink
    scale = ((hi - lo) / top).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, top).astype(np.float32)
    return scale, zero


def _line_fit(w: np.ndarray, q: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the weighted least-squares line w ≈ a·q + c for fixed codes q (a = 0 where
    the codes are all equal)."""
    n = np.broadcast_to(r.sum(-1), q.shape[:-1])
    sq, sw = (r * q).sum(-1), (r * w).sum(-1)
    sqq, sqw = (r * np.square(q)).sum(-1), (r * q * w).sum(-1)
    det = n * sqq - sq * sq
    a = np.where(det > 0, (n * sqw - sq * sw) / np.where(det > 0, det, 1.0), 0.0)
    c = (sw - a * sq) / np.where(n > 0, n, 1.0)
    return a, c


def _refit(
    w: np.ndarray, q: np.ndarray, zero: np.ndarray, top: int, symmetric: bool, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(Weighted) least-squares scale (and integer zero point) for fixed codes ``q``."""
    r = np.ones(w.shape[-1:], np.float32) if rows is None else rows
    if not symmetric:  # w ≈ a·q + c, then z = round(−c/a)
        a, c = _line_fit(w, q, r)
        ok = a > TINY
        zero = np.where(ok, np.clip(np.rint(-c / np.where(ok, a, 1.0)), 0, top), zero).astype(np.float32)
    d = q - zero[..., None]
    dd = (r * np.square(d)).sum(-1)
    scale = np.where(dd > 0, (r * d * w).sum(-1) / np.where(dd > 0, dd, 1.0), 0.0)
    return np.where(scale == 0, 1.0, scale).astype(np.float32), zero


def shrink_grid(steps: int, min_shrink: float) -> np.ndarray:
    """``steps`` factors from 1 down to ``min_shrink``."""
    return np.linspace(1.0, min_shrink, max(int(steps), 1), dtype=np.float32)


def _covering_scale(lo: np.ndarray, hi: np.ndarray, zero: np.ndarray, top: int, fallback: np.ndarray) -> np.ndarray:
    """The smallest step that, with integer zero point ``zero``, still reaches both ends of
    [lo, hi] (codes 0 and ``top``)."""
    up = np.where(zero < top, hi / np.maximum(top - zero, 1), 0.0)
    down = np.where(zero > 0, -lo / np.maximum(zero, 1), 0.0)
    scale = np.maximum(up, down)
    return np.where(scale > 0, scale, fallback).astype(np.float32)


def _candidates(w: np.ndarray, bits: int, symmetric: bool, scale: np.ndarray, zero: np.ndarray, grid: np.ndarray):
    """(scale, zero point) candidates of the search: the RTN step shrunk by each grid factor;
    asymmetric, also with the zero point moved by ±1 (and the step that covers the range
    with it): an integer zero point pins 0 to a level, so its neighbours are real
    alternatives."""
    if symmetric:
        for factor in grid:
            yield scale * factor, zero
        return
    top = 2**bits - 1
    lo, hi = np.minimum(w.min(axis=-1), 0), np.maximum(w.max(axis=-1), 0)
    for shift in (0, -1, 1):
        moved = np.clip(zero + shift, 0, top).astype(np.float32)
        base = scale if shift == 0 else _covering_scale(lo, hi, moved, top, scale)
        for factor in grid:
            yield (base * factor).astype(np.float32), moved


def _float_rtn_params(w: np.ndarray, bits: int, shrink: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest with a float zero point: the block's [min, max] (0 need not be a
    level), shrunk by ``shrink`` about its middle, in 2^bits − 1 steps."""
    lo, hi = w.min(axis=-1), w.max(axis=-1)
    half = (hi - lo) * np.float32(shrink / 2)
    lo = (lo + hi) / 2 - half
    scale = (2 * half / (2**bits - 1)).astype(np.float32)
    scale = np.where(scale > TINY, scale, 1.0).astype(np.float32)
    return scale, (-lo / scale).astype(np.float32)


def _float_fit(
    w: np.ndarray, top: int, starts: list[tuple[np.ndarray, np.ndarray]], rounds: int, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Float zero points: from each start (scale, zero), ``rounds`` alternations of codes =
    clip(round(w/s + z)) and the (weighted) least-squares (s, z) of those codes in closed
    form; both steps minimise the block's error for the other fixed, so it never rises.  Per
    block, the best over the starts."""
    r = np.ones(w.shape[-1:], np.float32) if rows is None else rows
    best = None
    for scale, zero in starts:
        state = (scale, zero, _encode(w, scale, zero, top, rows, True)[1])
        for _ in range(rounds):
            a, c = _line_fit(w, _codes(w, state[0], state[1], top, True), r)
            ok = a > TINY
            s2 = np.where(ok, a, state[0]).astype(np.float32)
            z2 = np.where(ok, -c / np.where(ok, a, 1.0), state[1]).astype(np.float32)
            state = _keep_better(state, w, s2, z2, top, rows, True)
        best = state if best is None else _keep_better(best, w, state[0], state[1], top, rows, True)
    return best[0], best[1]


def _quantize_chunk(
    w: np.ndarray, bits: int, symmetric: bool, grid: np.ndarray | None, refine_rounds: int, rows: np.ndarray | None,
    float_rounds: int | None = None, valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """codes, scales, zero points, RTN squared error, final squared error of one chunk (the
    errors unweighted, whatever the search minimised).  ``float_rounds`` (not None): float
    zero points, fitted from the integer result and from the float round to nearest; ``valid``
    [n_blocks, block_size] masks the padding out of their error (a float zero point does not
    decode a padded 0 to 0; the fit ignores the padding through ``rows``)."""
    top = 2**bits - 1
    scale, zero = _rtn_params(w, bits, symmetric)
    q, plain = _encode(w, scale, zero, top)
    rtn_error = float(plain.sum(dtype=np.float64))
    if grid is None and float_rounds is None:
        return q.astype(np.uint8), scale, zero.astype(np.uint8), rtn_error, rtn_error
    if grid is not None:
        state = (scale, zero, plain if rows is None else _encode(w, scale, zero, top, rows)[1])
        for s2, z2 in _candidates(w, bits, symmetric, scale, zero, grid):
            state = _keep_better(state, w, s2, z2, top, rows)
        for _ in range(refine_rounds):
            q = _codes(w, state[0], state[1], top)
            state = _keep_better(state, w, *_refit(w, q, state[1], top, symmetric, rows), top, rows)
        scale, zero, _ = state
    if float_rounds is None:
        q, error = _encode(w, scale, zero, top)
        return q.astype(np.uint8), scale, zero.astype(np.uint8), rtn_error, float(error.sum(dtype=np.float64))
    starts = [(scale, zero), *(_float_rtn_params(w, bits, factor) for factor in FLOAT_FIT_SHRINKS)]
    scale, zero = _float_fit(w, top, starts, float_rounds, rows)
    q, error = _encode(w, scale, zero, top, valid, float_zero=True)
    return q.astype(np.uint8), scale, zero, rtn_error, float(error.sum(dtype=np.float64))


def _keep_better(
    state: tuple[np.ndarray, ...], w: np.ndarray, scale: np.ndarray, zero: np.ndarray, top: int, rows: np.ndarray | None = None,
    float_zero: bool = False,
) -> tuple[np.ndarray, ...]:
    """Per block, the candidate (scale, zero) where its (weighted) squared error is lower than
    the current one (only the per-block parameters are kept; the codes follow from them)."""
    current_scale, current_zero, current_error = state
    _, error = _encode(w, scale, zero, top, rows, float_zero)
    better = error < current_error
    return (
        np.where(better, scale, current_scale).astype(np.float32),
        np.where(better, zero, current_zero).astype(np.float32),
        np.where(better, error, current_error),
    )


def quantize_blocks(
    weight: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    *,
    symmetric: bool = False,
    search: bool = True,
    steps: int = 10,
    min_shrink: float = 0.7,
    refine_rounds: int = 2,
    row_weight: np.ndarray | None = None,
    float_zero_points: bool = False,
    float_rounds: int = FLOAT_FIT_ROUNDS,
) -> BlockQuantized:
    """Quantize W[K, N] block-wise along K (see the module docstring).  ``row_weight`` [K]
    (≥ 0, e.g. E[x_k²] of the input) weights the search's squared error per row of W.
    ``float_zero_points``: float32 zero points fitted by ``float_rounds`` least-squares
    alternations (asymmetric only)."""
    if float_zero_points and symmetric:
        raise ValueError("float zero points need asymmetric quantization (symmetric has no zero points)")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    codes = np.empty((n, n_blocks, block_size), dtype=np.uint8)
    scales = np.empty((n, n_blocks), dtype=np.float32)
    zeros = np.empty((n, n_blocks), dtype=np.float32 if float_zero_points else np.uint8)
    grid = shrink_grid(steps, min_shrink) if search else None
    fit = float_rounds if float_zero_points else None
    rows_weight = valid = None
    if row_weight is not None and (search or float_zero_points):
        padded = np.zeros(n_blocks * block_size, dtype=np.float32)
        padded[:k] = np.asarray(row_weight, dtype=np.float32) / max(float(np.mean(row_weight)), TINY)
        rows_weight = padded.reshape(n_blocks, block_size)
    if float_zero_points and k % block_size:  # the padding must weigh nothing in the fit and its error
        valid = (np.arange(n_blocks * block_size) < k).astype(np.float32).reshape(n_blocks, block_size)
        rows_weight = valid if rows_weight is None else rows_weight
    rows = max(1, CHUNK_ELEMENTS // max(n_blocks * block_size, 1))
    rtn_total = total = sq_norm = 0.0
    for start in range(0, n, rows):
        part = slice(start, min(start + rows, n))
        w = blocked(weight[:, part], block_size)  # one chunk of columns at a time: no full transposed copy
        codes[part], scales[part], zeros[part], rtn_error, error = _quantize_chunk(w, bits, symmetric, grid, refine_rounds, rows_weight, fit, valid)
        rtn_total += rtn_error
        total += error
        sq_norm += float(np.square(w, dtype=np.float64).sum())
    return BlockQuantized(codes, scales.astype(weight.dtype), zeros, bits, block_size, k, symmetric, rtn_total, total, sq_norm)


__all__ = [
    "BlockQuantized",
    "SUPPORTED_BITS",
    "SUPPORTED_BLOCK_SIZES",
    "decode",
    "dequantize_packed",
    "pack_codes",
    "pack_zero_points",
    "packed_tensors",
    "quantize_blocks",
    "shrink_grid",
    "unpack_codes",
    "unpack_zero_points",
]
