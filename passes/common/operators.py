"""Weight quantization operators: the interface through which a quantizer plugs into REx.

A :class:`WeightOperator` maps a float weight to stored codes (``quantize``), back to the
float weight the layer computes with (``dequantize``: ``Q⁻¹(Q(W))``) and emits the ONNX
nodes that produce that float weight from the stored codes (``emit``).  REx (passes/rex/)
only talks to this interface: each expansion order is ``R^k = Q⁻¹(Q(W − Σ_{j<k} R^j))``
with the chosen operator, so a new quantizer (PowerQuant, passes/power_quant.py) plugs in by
registering its operator with :func:`register_operator`.

``UniformWeightOperator`` is the symmetric per-channel (or per-tensor) operator of the
quantize pass (docs/quantization.md; :mod:`.numerics`), emitted as ``DequantizeLinear(int8 codes,
scales, axis)`` exactly like :mod:`.emit` so ORT fuses it into QLinearConv/QGemm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PipelineError
from onnxopt.graph import NameFactory

from .emit import dequantized_constant
from .numerics import dequantize_weight, quantize_weight


@dataclass
class QuantizedWeight:
    """Stored form of a quantized weight: integer codes, their scales, the scale axis (None:
    per tensor), the bit-width and operator-specific parameters (e.g. a power exponent)."""

    codes: np.ndarray
    scales: np.ndarray
    axis: int | None
    bits: int
    params: dict = field(default_factory=dict)


class WeightOperator(Protocol):
    name: str

    def quantize(self, weight: np.ndarray, bits: int, axis: int | None) -> QuantizedWeight: ...

    def dequantize(self, q: QuantizedWeight) -> np.ndarray: ...

    def emit(self, graph: gs.Graph, q: QuantizedWeight, names: NameFactory, base: str = "weight") -> gs.Variable: ...


class UniformWeightOperator:
    """Symmetric uniform quantization, ``q = round(W/s)``, ``s = max|W|/(2^{b−1}−1)``."""

    name = "uniform"

    def quantize(self, weight: np.ndarray, bits: int, axis: int | None) -> QuantizedWeight:
        codes, scales = quantize_weight(np.asarray(weight, np.float32), bits, axis)
        return QuantizedWeight(codes, scales, axis, bits, {})

    def dequantize(self, q: QuantizedWeight) -> np.ndarray:
        return dequantize_weight(q.codes, q.scales, q.axis)

    def emit(self, graph: gs.Graph, q: QuantizedWeight, names: NameFactory, base: str = "weight") -> gs.Variable:
        """``DequantizeLinear(int8 codes, scales, zero point 0, axis)`` (appended to graph)."""
        zeros = np.zeros(np.shape(q.scales), np.int8)
        return dequantized_constant(graph, base, np.ascontiguousarray(q.codes), q.scales, zeros, q.axis, names)


#: Operator name -> factory; "power" is registered by passes/power_quant/ when it is imported
#: (``onnxopt.passes`` imports it, so it is there before any pass runs).
_OPERATORS: dict[str, Callable[[], WeightOperator]] = {"uniform": UniformWeightOperator}


def register_operator(name: str, factory: Callable[[], WeightOperator]) -> None:
    """Make ``factory()`` available as ``weight_operator=name`` (e.g. in rex)."""
    _OPERATORS[name] = factory


def weight_operator(name: str) -> WeightOperator:
    """The registered operator called ``name`` (clear error otherwise)."""
    if name not in _OPERATORS:
        raise PipelineError(f"unknown weight operator {name!r}; available: {', '.join(sorted(_OPERATORS))}")
    return _OPERATORS[name]()


__all__ = ["QuantizedWeight", "UniformWeightOperator", "WeightOperator", "register_operator", "weight_operator"]
