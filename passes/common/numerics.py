"""Quantization arithmetic (numpy reference of what the emitted QDQ nodes compute).

Weights, symmetric (docs/quantization.md): ``q = round(W/s)``, ``s = max|W| / (2^{b−1} − 1)`` per
output channel (or per tensor), ``q`` clipped to ``±(2^{b−1} − 1)`` and stored as int8 for
every b ≤ 8 (the "restricted range": a 4-bit weight uses 15 of int8's levels).

Activations, per tensor, stored as uint8 (ORT 1.32's CPU fusion into QLinearConv needs
uint8 activations: with int8 ones 16 of MobileNetV2's 52 Convs stayed float): after a ReLU
zero point 0 and ``S = hi / (2^b − 1)``; elsewhere symmetric, zero point 2^{b−1} and
``S = max(|lo|, |hi|) / (2^{b−1} − 1)``.  ONNX QuantizeLinear rounds half to even, like
``np.round``.

Bias (ONNX QDQ convention ORT fuses): int32 with scale ``S_x · s_w`` per output channel.

Every scale written into a model passes :func:`checked_scales` (finite and > 0, else
ValidationError): NaN/inf weights or ranges stop the pass instead of reaching the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxopt.errors import ValidationError

#: Smallest scale used, so an all-zero channel still gets a valid (positive) scale.
TINY = np.float32(1e-12)


def checked_scales(scales: np.ndarray | float, what: str) -> np.ndarray:
    """``scales`` as float32 when every one is finite and > 0 (also after the float32
    cast); else ValidationError naming ``what``.  Every emission of a quantization scale
    (quantize, power-quant, rex, modular-accumulator) goes through this guard, so a NaN/inf
    from non-finite weights, ranges or calibration values is never written silently."""
    values = np.asarray(scales, np.float32)
    bad = ~(np.isfinite(values) & (values > 0))
    if np.any(bad):
        first = values[bad].ravel()[0]
        raise ValidationError(
            f"{what}: {int(bad.sum())} of {values.size} quantization scale(s) not finite and positive (e.g. {first}); "
            "the weights, activation ranges or calibration data behind it hold NaN/inf or overflow float32"
        )
    return values


def weight_scales(weight: np.ndarray, bits: int, axis: int | None) -> np.ndarray:
    """Symmetric scales: one per slice along ``axis`` (per-channel), or a scalar (axis None)."""
    levels = 2 ** (bits - 1) - 1
    if axis is None:
        return np.maximum(np.abs(weight).max() / levels, TINY).astype(np.float32)
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    return np.maximum(np.abs(weight).max(axis=reduce) / levels, TINY).astype(np.float32)


def quantize_weight(weight: np.ndarray, bits: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, float32 scales) of a symmetric b-bit quantization of ``weight``."""
    scales = weight_scales(weight, bits, axis)
    levels = 2 ** (bits - 1) - 1
    broadcast = scales if axis is None else _along(scales, axis, weight.ndim)
    codes = np.clip(np.round(weight / broadcast), -levels, levels).astype(np.int8)
    return codes, scales


def dequantize_weight(codes: np.ndarray, scales: np.ndarray, axis: int | None) -> np.ndarray:
    broadcast = scales if axis is None else _along(scales, axis, codes.ndim)
    return codes.astype(np.float32) * broadcast


def _along(vector: np.ndarray, axis: int, rank: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = -1
    return vector.reshape(shape)


@dataclass(frozen=True)
class ActivationQuant:
    """Per-tensor activation quantizer: scale, zero point 0, signedness, bit-width."""

    scale: np.float32
    signed: bool
    bits: int

    @property
    def dtype(self) -> type:
        return np.uint8

    @property
    def zero_point(self) -> int:
        return 2 ** (self.bits - 1) if self.signed else 0

    @property
    def max_code(self) -> int:
        """Largest code above the zero point."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def restricted(self) -> bool:
        """True when b < 8: the 8-bit storage holds more levels than b bits, so the graph
        needs an explicit Clip to emulate the b-bit range."""
        return self.bits < 8


def activation_quant(lo: float, hi: float, bits: int) -> ActivationQuant:
    """Per-tensor quantizer for values in [lo, hi] (unsigned when lo ≥ 0)."""
    if lo >= 0:
        return ActivationQuant(np.float32(max(hi, TINY) / (2**bits - 1)), False, bits)
    bound = max(abs(lo), abs(hi), float(TINY))
    return ActivationQuant(np.float32(bound / (2 ** (bits - 1) - 1)), True, bits)


def fake_quantize(x: np.ndarray, quant: ActivationQuant) -> np.ndarray:
    """Reference of Q then DQ (with the b-bit clip) on float values."""
    # below the zero point: b < 8 bits are clipped symmetric by the emitted Clip; 8 bits
    # saturate at code 0, i.e. −zero_point (−128) like ONNX QuantizeLinear on uint8
    low = -(quant.max_code if quant.restricted else quant.zero_point) if quant.signed else 0
    return np.clip(np.round(x / quant.scale), low, quant.max_code) * quant.scale  # zero point cancels


def bias_codes(bias: np.ndarray, input_scale: np.float32, weight_scales_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 codes, float32 scales) of a bias in the QDQ convention: scale = S_x · s_w."""
    scales = (np.float32(input_scale) * weight_scales_.astype(np.float32)).astype(np.float32)
    scales = np.broadcast_to(scales, bias.shape).astype(np.float32)
    limit = np.iinfo(np.int32).max
    codes = np.clip(np.round(bias.astype(np.float64) / scales), -limit, limit).astype(np.int32)
    return codes, scales
