"""REx numerics (Algorithm 2 with sparse orders, eq. 3.22): a weight expanded into orders.

:func:`expand_weight` quantizes the weight (order 1), then the remaining error of the
selected output units order by order; :class:`Expansion` holds the orders, the residual
errors after each and the per-unit error table the network allocation ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..common.operators import QuantizedWeight, WeightOperator
from .allocation import uniform_keep
from .fold import base_step_quantize
from .outliers import outlier_mask, residue_codes


@dataclass
class Order:
    """One expansion term: its order, the kept output channels (sorted) and the quantized
    sub-weight (the weight restricted to those channels, in the layer's layout)."""

    order: int
    channels: np.ndarray
    q: QuantizedWeight
    dequantized: np.ndarray


@dataclass
class Expansion:
    orders: list[Order]
    errors: list[float] = field(default_factory=list)  #: relative Frobenius error after each order
    max_errors: list[float] = field(default_factory=list)  #: max |W − Σ R| after each order
    #: outlier residue (rex_outliers): flat indices into the weight, int8 codes and their scale
    outliers: tuple[np.ndarray, np.ndarray, np.float32] | None = None
    #: squared residual norm of every unit (channel, or group) after each order (rows: orders)
    unit_errors: list[np.ndarray] = field(default_factory=list)


def channel_units(out_channels: int, groups: int) -> np.ndarray:
    """The selection unit of each output channel: itself (groups = 1) or its group."""
    return np.arange(out_channels) if groups == 1 else np.arange(out_channels) // (out_channels // groups)


def expand_weight(
    weight: np.ndarray, bits: int, axis: int | None, out_axis: int, operator: WeightOperator, order: int, budget: float, groups: int = 1,
    outliers: int = 0, window: bool = False, selections: list[np.ndarray] | None = None,
    error_weights: np.ndarray | None = None, step_divisor: int | np.ndarray | None = None, first_order: Order | None = None,
) -> Expansion:
    """Algorithm 2 with sparse orders (eq. 3.22): order 1 dense, orders 2..K each keep the
    ``round(budget/(K−1))`` share of output units (channels, or groups) with the largest
    residual norm, or the units ``selections[k − 2]`` when given (a network-wide allocation).
    ``axis`` is the scale axis (None: per tensor), ``out_axis`` the output channel axis of
    ``weight``; ``error_weights`` (broadcast to the weight, e.g. E[x_i²] of the input each
    weight multiplies) weights the squared residuals of :attr:`Expansion.unit_errors`.
    ``step_divisor`` m (one, or one per output channel): order k uses the step
    ``s1/m^{k−1}`` of the base scale instead of the residual's own ``max|r|/(2^{b−1}−1)``
    (the fold's operator, :mod:`.fold`).  ``first_order``: the order 1 of an earlier call on
    the same weight, bits, axis, operator and outliers, reused instead of quantizing the base
    again (the fold ladder's error table: one base, one expansion per rung)."""
    weight = np.asarray(weight, np.float64)
    out_channels = weight.shape[out_axis]
    units = channel_units(out_channels, groups)
    n_units = int(units.max()) + 1
    keep = uniform_keep(n_units, order, budget)
    norm = float(np.linalg.norm(weight)) or 1.0
    mask = outlier_mask(weight) if outliers else np.zeros(weight.shape, bool)
    base = weight
    if mask.any():  # order 1 on the weights clipped to the inliers' range: the outliers no longer stretch the scale
        spread = np.abs(weight - weight.mean())[~mask].max(initial=0.0)
        base = np.clip(weight, weight.mean() - spread, weight.mean() + spread)
    if first_order is None:
        q1 = operator.quantize(base.astype(np.float32), bits, axis)
        r1 = operator.dequantize(q1).astype(np.float64)
    else:
        q1, r1 = first_order.q, first_order.dequantized
    residual = weight - r1
    result = Expansion([Order(1, np.arange(out_channels), q1, r1)])
    if mask.any():  # sparse residue: codes of W − R¹ at the outliers, one scale
        flat = np.flatnonzero(mask)
        values = residual.reshape(-1)[flat]
        codes, scale = residue_codes(values, int(outliers))
        residual.reshape(-1)[flat] -= codes.astype(np.float64) * scale
        result.outliers = (flat, codes, scale)
    def record() -> None:
        result.errors.append(float(np.linalg.norm(residual)) / norm)
        result.max_errors.append(float(np.abs(residual).max(initial=0.0)))
        energy = np.square(residual) if error_weights is None else np.square(residual) * error_weights
        moved = np.moveaxis(energy, out_axis, 0).reshape(out_channels, -1)
        result.unit_errors.append(np.bincount(units, weights=moved.sum(axis=1), minlength=n_units))

    record()
    for k in range(2, order + 1):
        if selections is not None:
            keep = len(selections[k - 2]) if k - 2 < len(selections) else 0
        if keep == 0:
            break
        importance = result.unit_errors[-1]
        if selections is not None:
            chosen = np.sort(np.asarray(selections[k - 2], np.int64))
        elif window:  # the contiguous run of ``keep`` units with the largest importance (combine="pad")
            sums = np.convolve(importance, np.ones(keep), mode="valid")
            start = int(np.argmax(sums))
            chosen = np.arange(start, start + keep)
        else:
            chosen = np.sort(np.argsort(-importance, kind="stable")[:keep])
        channels = np.flatnonzero(np.isin(units, chosen))
        sub = np.take(residual, channels, axis=out_axis).astype(np.float32)
        if step_divisor is not None:
            divisor = step_divisor if np.ndim(step_divisor) == 0 else np.asarray(step_divisor)[channels]
            qk = base_step_quantize(sub, q1, channels, divisor ** (k - 1), out_axis)
        else:
            qk = operator.quantize(sub, bits, axis)
        rk = operator.dequantize(qk).astype(np.float64)
        index = [slice(None)] * residual.ndim
        index[out_axis] = channels
        residual[tuple(index)] -= rk
        result.orders.append(Order(k, channels, qk, rk))
        record()
    return result
