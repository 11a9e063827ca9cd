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

**Network-wide allocation** (``rex_allocation="network"``): the budget is ``budget`` × the
bytes of all low-bit bases together, spent where the output error falls most per byte.  A
first pass over the layers keeps only per-column tables (:func:`error_table`): the weighted
error e_n of the base and after a residual of each rung (2 bits, then ``rex_bits``; the
residual of every column quantized as it would be, a chunk of columns at a time), and the
layer's weighted signal Σ_k ρ_k Σ_n W_kn².  :func:`allocate_network` ranks the candidates
(layer, column, rung) by the share of the layer's relative error they remove per residual
byte — the 2-bit rung first, the wider one as its upgrade (marginal gain / marginal bytes,
made non-increasing so the choices nest) — and takes them greedily until the bytes are spent.
A layer's residual is one MatMulNBits with one ``bits``, so each layer then keeps the one rung
that removes most of its error with the bytes the greedy gave it (the top columns of that
rung's gain), and the bytes this leaves go, by the same ranking, to more columns at each
layer's rung (:func:`refill`); what keeping one node per layer costs against the mixed
greedy is reported.
A second pass reads each weight again and quantizes the chosen columns' residual.  With
``joint`` (the pass's ``rex_joint``) the tables and the second pass round the base codes of
a column together with its residual (:func:`joint_rounding`); the second pass then rewrites
those columns of the packed base.

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

from ..common.knapsack import greedy_nested_rungs, greedy_prefix
from .blockwise import (
    CHUNK_ELEMENTS,
    TINY,
    BlockQuantized,
    decode,
    quantize_blocks,
    unpack_codes,
    unpack_zero_points,
)

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
    #: The base's codes of ``columns`` where they were rounded jointly with the residual.
    base_codes: np.ndarray | None = None


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
        w, decoded = weight[:, part], decoded_columns(base, part)
        plain[part] = column_errors(w, decoded)
        weighted[part] = plain[part] if row_weight is None else column_errors(w, decoded, row_weight)
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


# --------------------------------------------------------------------------- joint rounding
#: Alternations of the joint rounding: (base code ± 1, residual code) per weight for the
#: residual's scales, then the residual's least-squares scales for those codes.
JOINT_ROUNDS = 3


@dataclass
class BaseColumns:
    """The base of some columns as codes [n, n_blocks, block_size] with their scales and zero
    points [n, n_blocks] (float32 or uint8), ``bits`` and ``block_size``."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int

    @classmethod
    def of(cls, base: BlockQuantized, columns: np.ndarray | slice) -> "BaseColumns":
        return cls(base.codes[columns], base.scales[columns], base.zero_points[columns], base.bits, base.block_size)

    def decoded(self, k: int) -> np.ndarray:
        """Ŵ[:, these columns] (float32 [K, n])."""
        return decode(self.codes, self.scales, self.zero_points)[:, :k].T


def _per_weight(values: np.ndarray, block_size: int, k: int) -> np.ndarray:
    """[n, n_blocks] per-block values → float32 [n, K], one per weight."""
    return np.repeat(np.asarray(values, np.float32), block_size, axis=1)[:, :k]


def _block_sums(values: np.ndarray, block_size: int, n_blocks: int) -> np.ndarray:
    """[n, K] → float64 [n, n_blocks] sums over each block's rows (zero-padded)."""
    padded = np.zeros((values.shape[0], n_blocks * block_size), np.float64)
    padded[:, : values.shape[1]] = values
    return padded.reshape(values.shape[0], n_blocks, block_size).sum(axis=-1)


def joint_rounding(weight: np.ndarray, base: BaseColumns, residual: BlockQuantized, row_weight: np.ndarray | None = None,
                   rounds: int = JOINT_ROUNDS) -> tuple[np.ndarray, BlockQuantized]:
    """Base and residual codes of W[K, n] chosen together: each weight takes the base code
    q − 1, q or q + 1 (within range) with the residual code that, for the residual's scales
    and zero points, makes Ŵ + R̂ nearest to it ((weighted) squared error), then each
    residual block's scale is refitted by least squares for those codes; ``rounds`` times.
    Rounding the base alone to nearest leaves a residual in ± half its step, which a 2-bit
    residual (levels −2..1 or −1..2 steps: 0 is always one) covers unevenly; choosing the
    pair makes the two grids one finer grid.  The sequential result is one of the choices
    and each step lowers the error for the other fixed, so it never rises.  (new base codes
    [n, n_blocks, block_size] uint8, the residual with its new codes, scales and error)."""
    k, n = weight.shape
    w = np.ascontiguousarray(weight.T, dtype=np.float32)
    rows = np.ones(k, np.float32) if row_weight is None else np.asarray(row_weight, np.float32) / max(float(np.mean(row_weight)), TINY)
    base_codes = base.codes.reshape(n, -1)[:, :k].astype(np.float32)
    base_scale, base_zero = _per_weight(base.scales, base.block_size, k), _per_weight(base.zero_points, base.block_size, k)
    base_top, top = 2**base.bits - 1, 2**residual.bits - 1
    size, n_blocks = residual.block_size, residual.scales.shape[1]
    zero = _per_weight(residual.zero_points, size, k)
    scales = residual.scales.astype(np.float32).copy()
    for round_ in range(rounds + 1):
        scale = _per_weight(scales, size, k)
        best = None
        for shift in (0.0, -1.0, 1.0):
            q = np.clip(base_codes + shift, 0, base_top)
            target = w - base_scale * (q - base_zero)
            code = np.clip(np.rint(target / np.where(scale == 0, 1.0, scale)) + zero, 0, top)
            error = np.square(target - scale * (code - zero))
            if best is None:
                best = [error, q, code, target]
            else:
                better = error < best[0]
                for slot, value in enumerate((error, q, code, target)):
                    best[slot] = np.where(better, value, best[slot])
        if round_ == rounds:
            break
        d = best[2] - zero  # least-squares scale per residual block for these codes
        dd = _block_sums(rows * np.square(d), size, n_blocks)
        scales = np.where(dd > 0, _block_sums(rows * d * best[3], size, n_blocks) / np.where(dd > 0, dd, 1.0), scales).astype(np.float32)
        scales = np.where(scales == 0, residual.scales, scales).astype(np.float32)
    error, q, code, _ = best
    new_base = base.codes.reshape(n, -1).copy()
    new_base[:, :k] = q.astype(np.uint8)
    codes = np.repeat(residual.zero_points.astype(np.uint8), size, axis=1)  # the padding decodes to 0
    codes[:, :k] = code.astype(np.uint8)
    quantized = BlockQuantized(codes.reshape(n, n_blocks, size), scales.astype(residual.scales.dtype), residual.zero_points, residual.bits, size,
                               residual.k, residual.symmetric, residual.rtn_sq_error, float(error.sum(dtype=np.float64)), residual.sq_norm)
    return new_base.reshape(base.codes.shape), quantized


def joint_rounding_chunked(weight: np.ndarray, base: BaseColumns, residual: BlockQuantized,
                           row_weight: np.ndarray | None = None) -> tuple[np.ndarray, BlockQuantized]:
    """:func:`joint_rounding` a chunk of columns at a time (its temporaries are a dozen
    float32 copies of the columns it gets; columns are independent), joined back."""
    k, n = weight.shape
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    if n <= step:
        return joint_rounding(weight, base, residual, row_weight)
    parts = [joint_rounding(weight[:, s], BaseColumns(base.codes[s], base.scales[s], base.zero_points[s], base.bits, base.block_size),
                            _columns_of(residual, s), row_weight) for s in (slice(i, min(i + step, n)) for i in range(0, n, step))]
    codes = np.concatenate([c for c, _ in parts])
    joined = [q for _, q in parts]
    quantized = BlockQuantized(np.concatenate([q.codes for q in joined]), np.concatenate([q.scales for q in joined]),
                               np.concatenate([q.zero_points for q in joined]), residual.bits, residual.block_size, residual.k,
                               residual.symmetric, residual.rtn_sq_error, float(sum(q.sq_error for q in joined)), residual.sq_norm)
    return codes, quantized


def _columns_of(quantized: BlockQuantized, columns: slice) -> BlockQuantized:
    """The block-wise quantization of some columns (codes, scales, zero points sliced; the
    errors are the whole weight's, as joint_rounding only reads the format from them)."""
    return BlockQuantized(quantized.codes[columns], quantized.scales[columns], quantized.zero_points[columns], quantized.bits,
                          quantized.block_size, quantized.k, quantized.symmetric, quantized.rtn_sq_error, quantized.sq_error, quantized.sq_norm)


def joint_column_errors(weight: np.ndarray, base: BaseColumns, residual: BlockQuantized, row_weight: np.ndarray | None = None) -> np.ndarray:
    """The weighted column errors e_n of W against the jointly rounded base + residual."""
    codes, quantized = joint_rounding(weight, base, residual, row_weight)
    k = weight.shape[0]
    joint = BaseColumns(codes, base.scales, base.zero_points, base.bits, base.block_size).decoded(k)
    return column_errors(weight, joint + quantized.dequantized(), row_weight)


# --------------------------------------------------------------------------- network allocation
#: The residual rung every network allocation offers first: per byte, a 2-bit residual removes
#: most of a 4-bit base's error (that error is nearly uniform within ± half a step).
FIRST_RUNG_BITS = 2


@dataclass
class ColumnTable:
    """What the network allocation keeps of one weight (no weights): ``errors`` [1 + rungs, N],
    the weighted column errors of the base (row 0) and after a residual of each rung;
    ``plain`` [N] the unweighted base errors; the layer's weighted signal Σ_k ρ_k Σ_n W_kn²
    and plain ‖W‖²; each rung's bytes per column; ``readers``: layers reading the weight (its
    gains count that many times)."""

    errors: np.ndarray
    plain: np.ndarray
    signal: float
    sq_norm: float
    bits: tuple[int, ...]
    costs: tuple[int, ...]
    readers: int = 1
    #: The residual's format: block size and whether it has zero points.
    block_size: int = 0
    symmetric: bool = False


@dataclass
class Allocation:
    """The network allocation: per table, (bits, columns ascending) or None; the bytes spent
    and the budget; the greedy's (mixed-rung) relative error reduction and what the one
    residual per layer keeps of it."""

    choices: list[tuple[int, np.ndarray] | None]
    spent: int
    budget: float
    greedy_gain: float
    kept_gain: float
    mixed_layers: int


def rung_bits(rex_bits: int) -> tuple[int, ...]:
    """The residual widths the network allocation offers: 2 bits, then ``rex_bits``."""
    return tuple(sorted({FIRST_RUNG_BITS, int(rex_bits)}))


def error_table(weight: np.ndarray, base: BlockQuantized, bits: tuple[int, ...], block_size: int, row_weight: np.ndarray | None = None,
                symmetric: bool | None = None, joint: bool = False, **search) -> ColumnTable:
    """The per-column error table of one weight: its residual W − Ŵ quantized at each rung
    (blocks of ``block_size``, the same search as the residual order), a chunk of columns at
    a time (quantize_blocks treats columns independently, so this is what the second pass
    gets for the columns it picks).  ``symmetric``: the residual's (default the base's);
    ``joint``: the errors of base and residual codes rounded together (:func:`joint_rounding`)."""
    k, n = weight.shape
    symmetric = base.symmetric if symmetric is None else symmetric
    errors, plain = np.empty((1 + len(bits), n)), np.empty(n)
    rows = None if row_weight is None else np.asarray(row_weight, np.float32)
    signal = sq_norm = 0.0
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        part = slice(start, min(start + step, n))
        w = weight[:, part]
        residual = w - decoded_columns(base, part)
        signal += float(column_errors(w, 0.0, rows).sum())
        sq_norm += float(column_errors(w, 0.0).sum())
        plain[part] = column_errors(residual, 0.0)
        errors[0, part] = column_errors(residual, 0.0, rows)
        for rung, b in enumerate(bits, start=1):
            quantized = quantize_blocks(residual, b, block_size, symmetric=symmetric, row_weight=row_weight, **search)
            if joint:
                errors[rung, part] = joint_column_errors(w, BaseColumns.of(base, part), quantized, rows)
            else:
                errors[rung, part] = column_errors(residual, quantized.dequantized(), rows)
    costs = tuple(column_bytes(k, b, block_size, symmetric) for b in bits)
    return ColumnTable(errors, plain, signal, sq_norm, tuple(bits), costs, block_size=block_size, symmetric=symmetric)


#: A rung removing less than this share of its layer's weighted signal gains nothing (float
#: rounding: a weight exactly on its 4-bit grid still shows errors of about 1e-16).
NEGLIGIBLE_REDUCTION = 1e-12


def candidate_reductions(table: ColumnTable) -> tuple[np.ndarray, np.ndarray]:
    """(reduction [rungs, N], marginal bytes [rungs]) of one table: rung r removes
    e_{r−1} − e_r (times the readers) of the layer's weighted signal for cost_r − cost_{r−1}
    bytes; a reduction below NEGLIGIBLE_REDUCTION counts as none."""
    costs = np.diff(np.asarray((0, *table.costs), np.float64))
    reduction = np.maximum(table.errors[:-1] - table.errors[1:], 0.0) * table.readers / max(table.signal, 1e-30)
    reduction[reduction < NEGLIGIBLE_REDUCTION] = 0.0  # rounding of a weight already on its grid, not an error a residual removes
    return reduction, costs


def greedy_rungs(tables: list[ColumnTable], budget: float) -> list[np.ndarray]:
    """The greedy knapsack over all (layer, column, rung) (the shared
    :func:`..common.knapsack.greedy_nested_rungs`): best gain per byte first (ties: lower
    rung, then lower layer, then lower column: deterministic), a prefix of the ranking while
    its bytes fit ``budget`` (+ 1e-9), candidates without gain left out.  Per table, the rungs
    taken per column ([N] ints, 0 = none; nested: rung r is taken only with 1..r−1)."""
    parts = [candidate_reductions(table) for table in tables]
    return greedy_nested_rungs([r for r, _ in parts], [c for _, c in parts], budget, absolute_slack=1e-9)


def one_rung(table: ColumnTable, spent: float) -> tuple[int, np.ndarray, float] | None:
    """The layer's single residual for ``spent`` bytes: per rung, its top ⌊spent / cost⌋
    columns by that rung's error reduction; the rung removing the most wins (ties: the
    narrower).  (bits, columns, relative error removed) or None when no column fits."""
    best = None
    for rung, (bits, cost) in enumerate(zip(table.bits, table.costs), start=1):
        count = int(min(table.errors.shape[1], np.floor(spent / cost + 1e-9)))
        if count == 0:
            continue
        reduction = table.errors[0] - table.errors[rung]
        columns = largest_columns(reduction, count)
        gain = float(reduction[columns].sum()) * table.readers / max(table.signal, 1e-30)
        if best is None or gain > best[2]:
            best = (bits, columns, gain)
    return best


def allocate_network(tables: list[ColumnTable], budget: float) -> Allocation:
    """Spend ``budget`` bytes of residual over all ``tables`` (see the module docstring):
    the greedy over (layer, column, rung), then one residual (one rung) per layer."""
    taken = greedy_rungs(tables, budget)
    choices: list[tuple[int, np.ndarray] | None] = []
    spent, greedy_gain, kept_gain, mixed = 0, 0.0, 0.0, 0
    for table, rungs in zip(tables, taken):
        if not rungs.any():
            choices.append(None)
            continue
        n = rungs.size
        marginal = np.diff(np.asarray((0, *table.costs)))
        layer_bytes = float(sum(marginal[r] * np.count_nonzero(rungs > r) for r in range(len(table.costs))))
        greedy_gain += float((table.errors[0] - table.errors[rungs, np.arange(n)]).sum()) * table.readers / max(table.signal, 1e-30)
        mixed += int(np.unique(rungs[rungs > 0]).size > 1)
        single = one_rung(table, layer_bytes)
        if single is None:
            choices.append(None)
            continue
        bits, columns, gain = single
        choices.append((bits, columns))
        kept_gain += gain
        spent += int(columns.size * table.costs[table.bits.index(bits)])
    added_gain, added_bytes = refill(tables, choices, budget - spent)
    return Allocation(choices, spent + added_bytes, float(budget), greedy_gain, kept_gain + added_gain, mixed)


def refill(tables: list[ColumnTable], choices: list[tuple[int, np.ndarray] | None], leftover: float) -> tuple[float, int]:
    """Spend the bytes the one-rung choice left (``leftover``) on more columns at each
    layer's rung (the first rung where a layer has none), best gain per byte first, a prefix
    of the ranking; ``choices`` is updated in place.  (gain added, bytes added)."""
    gains, costs, layer_of, column_of, rung_of = [], [], [], [], []
    for index, (table, choice) in enumerate(zip(tables, choices)):
        rung = 1 if choice is None else table.bits.index(choice[0]) + 1
        free = np.ones(table.errors.shape[1], bool)
        if choice is not None:
            free[choice[1]] = False
        columns = np.flatnonzero(free)
        cost = float(table.costs[rung - 1])
        reduction = (table.errors[0, columns] - table.errors[rung, columns]) * table.readers / max(table.signal, 1e-30)
        gains.append(np.where(reduction < NEGLIGIBLE_REDUCTION, 0.0, reduction) / cost)
        costs.append(np.full(columns.size, cost))
        layer_of.append(np.full(columns.size, index))
        column_of.append(columns)
        rung_of.append(rung)
    if not gains or leftover <= 0:
        return 0.0, 0
    gain, cost, layer, column = (np.concatenate(a) for a in (gains, costs, layer_of, column_of))
    taken = greedy_prefix(gain, cost, leftover, (layer, column), absolute_slack=1e-9)  # ties: lower layer, then lower column
    for index in np.unique(layer[taken]):
        mine = column[taken[layer[taken] == index]]
        bits = tables[index].bits[rung_of[index] - 1]
        old = choices[index][1] if choices[index] is not None else np.zeros(0, np.int64)
        choices[index] = (bits, np.sort(np.concatenate([old, mine])).astype(np.int64))
    return float((gain[taken] * cost[taken]).sum()), int(cost[taken].sum())


def packed_base_columns(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, columns: np.ndarray, *, bits: int, block_size: int) -> BaseColumns:
    """The base of ``columns`` from its MatMulNBits inputs (the second pass of the network
    allocation: the codes are not kept).  Zero points are packed uint8 codes, float32 values
    (``zero_points="float"``, laid out like the scales) or absent (symmetric: the middle code)."""
    n, n_blocks = b.shape[0], b.shape[1]
    codes = unpack_codes(b[columns], bits)
    if zero_points is None:
        zeros = np.full((columns.size, n_blocks), 2 ** (bits - 1), dtype=np.uint8)
    elif np.issubdtype(zero_points.dtype, np.floating):
        zeros = zero_points.reshape(n, n_blocks)[columns]
    else:
        zeros = unpack_zero_points(zero_points, bits, n, n_blocks)[columns]
    return BaseColumns(codes, scales.reshape(n, n_blocks)[columns], zeros, bits, block_size)


def decoded_packed_columns(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, columns: np.ndarray, *, k: int, bits: int, block_size: int) -> np.ndarray:
    """Ŵ[:, columns] (float32 [K, |columns|]) from the MatMulNBits inputs of a base."""
    return packed_base_columns(b, scales, zero_points, columns, bits=bits, block_size=block_size).decoded(k)


def residual_of_columns(weight: np.ndarray, base: BaseColumns, columns: np.ndarray, bits: int, block_size: int, plain: np.ndarray,
                        symmetric: bool, row_weight: np.ndarray | None = None, joint: bool = False, **search) -> Residual:
    """The residual order of the chosen ``columns`` given their base ``base`` and the table's
    unweighted base errors ``plain``; ``joint``: base and residual codes rounded together
    (:func:`joint_rounding`; the new base codes are in ``base_codes``)."""
    k = weight.shape[0]
    w = weight[:, columns]
    quantized = quantize_blocks(w - base.decoded(k), bits, block_size, symmetric=symmetric, row_weight=row_weight, **search)
    base_codes = None
    if joint:
        base_codes, quantized = joint_rounding_chunked(w, base, quantized, row_weight)
    sq_error = float(plain.sum() - plain[columns].sum()) + quantized.sq_error
    return Residual(columns, quantized, max(sq_error, 0.0), columns.size == weight.shape[1], base_codes)


__all__ = [
    "MIN_OPSET",
    "Allocation",
    "BaseColumns",
    "ColumnTable",
    "Residual",
    "allocate_network",
    "base_errors",
    "budget_columns",
    "candidate_reductions",
    "column_bytes",
    "column_errors",
    "decoded_columns",
    "decoded_packed_columns",
    "error_table",
    "greedy_rungs",
    "joint_column_errors",
    "joint_rounding",
    "packed_base_columns",
    "largest_columns",
    "one_rung",
    "refill",
    "residual_of_columns",
    "residual_order",
    "rung_bits",
]
