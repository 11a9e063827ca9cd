"""Activation ranges per channel: data-free from BN statistics, or from calibration data.

Data-free (docs/quantization.md): the output of a BN is N(β_c, γ_c²) per channel, so its range
is ``[β − λ|γ|, β + λ|γ|]`` (λ = 9 at 8 bits, 4 at ≤ 6 bits by default).  The statistics
come from the BNs still in the graph and from the ``onnxopt.bn_statistics`` metadata that
fold-batchnorm keeps for the BNs it removed; a LayerNormalization over the last axis with
constant γ, β gives the same per-feature statistics (mean β, std |γ|) on its output
(:mod:`.statistics`).  They are propagated **[derived]** to the
tensors the quantized layers actually read:

* Relu: range clipped at 0; mean of the rectified Gaussian
  ``E[ReLU(Y)] = β·Φ(β/σ) + σ·φ(β/σ)`` when the input is a BN output, else max(mean, 0);
* Clip(a, b) (ReLU6): range clipped to [a, b]; Min/Max with a constant bound that is a
  scalar or one value per channel (the per-channel ReLU6 bounds the equalize pass writes):
  range clipped per channel;
* Max/Average/GlobalAverage pooling, ReduceMean over spatial axes (PyTorch's
  ``x.mean((2, 3))``), Identity, Dropout, Flatten of a pooled tensor: the per-channel range
  is kept (a conservative bound for averages);
* Concat on the channel axis: the per-channel vectors are concatenated; a Slice of other
  axes keeps them; zero Pad adds [0, 0] channels and widens every range to include 0;
* Add: means add; the range is either the sum of the ranges (``add_range="sum"``, a sure
  bound) or, for two Gaussian branches assumed independent, ``μ ± λ·√(σ_a² + σ_b²)``
  (``add_range="independent"``);
* Add/Sub/Mul/Div with a constant that is a scalar or one value per channel: the range,
  mean and statistics shifted or scaled (bounds swapped for a negative factor);
* hard-swish, ``x · clip(αx + β, 0, 1)`` up to a constant factor, in the forms exporters
  write: the HardSwish op, ``Mul(x, HardSigmoid(x))`` and ``Mul(x, Clip(Add(x, s), 0, u))``
  (Paddle2ONNX / PyTorch at opset < 14, usually followed by ``Div(·, u)``): the exact image of
  the input range per channel (the minimum −β²/4α where the range reaches it); for a BN
  output the mean and E[y²] by Gauss–Hermite quadrature of N(β_c, γ_c²);
* a gate: ``Mul(x, g)`` with g the output of Sigmoid or HardSigmoid of another tensor
  (squeeze-excite), values in [0, 1]: the range of x widened to include 0 (a sure bound),
  the mean halved (E[g] is not known without data);
* anything else, and graph inputs: unknown (the reading layer stays float unless
  calibration data or an input range is given).

Calibration and measured moments: :mod:`.measured_ranges`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs
from scipy.special import ndtr

from onnxopt.graph import constant_values, is_default_domain, producer


#: Share of the values of a BN output assumed to follow the heavy (Student t(3)) tail in the
#: clipping estimate of the SPIQ decision (the rest is taken as Gaussian).  Chosen on
#: bench/results/spiq_decision.md.
HEAVY_TAIL_SHARE = 0.1

#: (μ, σ, cap, share) per channel: see ChannelRange.tail
Tail = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

PASS_THROUGH_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "Dropout", "Flatten"})


@dataclass
class ChannelRange:
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray
    #: (μ, σ) when the values are a BN output N(μ, σ²), used for the exact ReLU mean.
    gaussian: tuple[np.ndarray, np.ndarray] | None = None
    #: E[x²] per channel when known (BN output, or a rectified BN output), for error estimates
    second_moment: np.ndarray | None = None
    #: (μ, σ, cap, share) of the BN output these values come from through Relu/Clip/Min and
    #: pass-through ops (cap: the smallest upper clip on the way, inf when none; share: the
    #: heavy-tail share of each channel, HEAVY_TAIL_SHARE), for the clipping-error
    #: estimate of the SPIQ decision
    tail: Tail | None = None
    #: measured with the If conditions forced: no calibration sample takes the branch computing it
    forced_branch: bool = False

    @property
    def channels(self) -> int:
        return len(self.lo)


def default_lambda(act_bits: int) -> float:
    """λ of docs/quantization.md: 9 at 8-bit activations, 4 at ≤ 6 bits (linear in between)."""
    if act_bits >= 8:
        return 9.0
    if act_bits <= 6:
        return 4.0
    return 6.5



class RangeEstimator:
    """Per-channel ranges of tensors, from BN statistics propagated through the graph."""

    def __init__(
        self,
        stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
        lam: float,
        add_range: str = "sum",
        known: Mapping[str, ChannelRange] | None = None,
    ) -> None:
        self.stats = stats
        #: ranges given outright (e.g. the graph input's from the user), propagated like the rest
        self.known = dict(known or {})
        self.lam = lam
        #: "sum": the range of a + b is the sum of the ranges (a sure bound); "independent":
        #: Gaussian branches assumed independent, σ = √(σ_a² + σ_b²), range μ ± λσ.
        self.add_range = add_range
        self._memo: dict[str, ChannelRange | None] = {}

    def range(self, tensor: gs.Tensor) -> ChannelRange | None:
        if tensor.name not in self._memo:
            self._memo[tensor.name] = None  # cycles are impossible in a DAG; this guards re-entry
            self._memo[tensor.name] = self._compute(tensor)
        return self._memo[tensor.name]

    def _compute(self, tensor: gs.Tensor) -> ChannelRange | None:
        if tensor.name in self.known:
            return self.known[tensor.name]
        if tensor.name in self.stats:
            mean, std = self.stats[tensor.name]
            tail = (mean, std, np.full(mean.shape, np.inf), np.full(mean.shape, HEAVY_TAIL_SHARE))
            return ChannelRange(mean - self.lam * std, mean + self.lam * std, mean.copy(), (mean, std), mean**2 + std**2, tail)
        node = producer(tensor)
        if node is None or not is_default_domain(node):
            return None
        if node.op == "Relu":
            return _relu(self.range(node.inputs[0]))
        if node.op == "Clip":
            return _clip(self.range(node.inputs[0]), *_clip_bounds(node))
        if node.op in PASS_THROUGH_OPS:
            return self.range(node.inputs[0])
        if node.op in ("Min", "Max"):
            return self._bound(node)
        if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (1, -3) and tensor.shape is not None and len(tensor.shape) == 4:
            parts = [self.range(t) for t in node.inputs]
            if any(p is None for p in parts):
                return None
            return ChannelRange(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("lo", "hi", "mean")))
        if node.op == "Slice":
            return self._slice(node)
        if node.op == "ReduceMean":
            return self._reduce_mean(node)
        if node.op == "Pad":
            return self._pad(node)
        if node.op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2 and _constant_operand(node) is not None:
            return self._affine(node)
        if node.op == "HardSwish":
            return _hard_swish(self.range(node.inputs[0]), 1 / 6, 0.5, 1.0)
        if node.op == "Mul" and len(node.inputs) == 2:
            return self._product(node)
        if node.op == "Add" and len(node.inputs) == 2:
            a, b = self.range(node.inputs[0]), self.range(node.inputs[1])
            if a is None or b is None or a.channels != b.channels:
                return None
            if self.add_range == "independent" and a.gaussian is not None and b.gaussian is not None:
                mean, std = a.gaussian[0] + b.gaussian[0], np.hypot(a.gaussian[1], b.gaussian[1])
                return ChannelRange(mean - self.lam * std, mean + self.lam * std, mean, (mean, std))
            return ChannelRange(a.lo + b.lo, a.hi + b.hi, a.mean + b.mean)
        return None


    def _bound(self, node: gs.Node) -> ChannelRange | None:
        """Min/Max of a tensor and a per-channel (or scalar) constant: the range clipped per channel."""
        found = channel_bound(node)
        if found is None:
            return None
        index, bound = found
        r = self.range(node.inputs[1 - index])
        if r is None or bound.size not in (1, r.channels):
            return None
        clip = np.minimum if node.op == "Min" else np.maximum
        moment = None
        if node.op == "Min" and r.second_moment is not None and np.all(r.lo >= 0) and np.all(bound >= 0):
            moment = np.minimum(r.second_moment, bound**2)
        tail = _capped(r.tail, bound) if node.op == "Min" else None
        return ChannelRange(clip(r.lo, bound), clip(r.hi, bound), clip(r.mean, bound), second_moment=moment, tail=tail)

    def _affine(self, node: gs.Node) -> ChannelRange | None:
        """x + c, x − c, c − x, x · c, x / c for a constant c (a scalar or one value per channel)."""
        index, value = _constant_operand(node)  # type: ignore[misc]
        r = self.range(node.inputs[1 - index])
        if r is None or value.size not in (1, r.channels):
            return None
        if node.op in ("Mul", "Div"):
            if node.op == "Div" and (index == 0 or np.any(value == 0)):
                return None
            return _scaled(r, value if node.op == "Mul" else 1.0 / value)
        if node.op == "Sub" and index == 0:
            r = _scaled(r, np.array([-1.0]))
        return _shifted(r, -value if node.op == "Sub" and index == 1 else value)

    def _product(self, node: gs.Node) -> ChannelRange | None:
        """Mul of two tensors: hard-swish (x times a hard gate of x) or a [0, 1] gate of another tensor."""
        for index in (0, 1):
            x, gate = node.inputs[index], node.inputs[1 - index]
            form = _hard_gate_of(gate, x)
            if form is not None:
                return _hard_swish(self.range(x), *form)
        for index in (0, 1):
            x, gate = node.inputs[index], node.inputs[1 - index]
            source = producer(gate)
            if source is not None and source.op in ("Sigmoid", "HardSigmoid") and is_default_domain(source):
                r = self.range(x)
                if r is None:
                    return None
                return ChannelRange(np.minimum(r.lo, 0.0), np.maximum(r.hi, 0.0), 0.5 * r.mean)
        return None

    def _slice(self, node: gs.Node) -> ChannelRange | None:
        """A Slice that leaves the channel axis alone keeps the per-channel range."""
        axes = constant_values(node, 3) if len(node.inputs) > 3 else None
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        if axes is None or rank is None or 1 in [int(a) % rank for a in axes]:
            return None
        return self.range(node.inputs[0])

    def _reduce_mean(self, node: gs.Node) -> ChannelRange | None:
        """A mean over spatial axes of an N×C×H×W (or N×C×D×H×W) tensor keeps the per-channel
        range; not rank 3, where the per-feature ranges of [B, T, K] tensors live on the last axis."""
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            axes = constant_values(node, 1)  # opset ≥ 18: an input
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        if axes is None or rank not in (4, 5) or {0, 1} & {int(a) % rank for a in np.ravel(axes)}:
            return None
        return self.range(node.inputs[0])

    def _pad(self, node: gs.Node) -> ChannelRange | None:
        """Zero padding: new channels span [0, 0]; padded positions add 0 to every range."""
        r = self.range(node.inputs[0])
        pads = constant_values(node, 1)
        value = constant_values(node, 2) if len(node.inputs) > 2 else None
        mode = node.attrs.get("mode", "constant")
        if r is None or pads is None or (value is not None and np.any(value)) or mode not in ("constant", b"constant"):
            return None
        rank = len(pads) // 2
        before, after = int(pads[1]), int(pads[1 + rank])
        zeros = np.zeros
        lo = np.concatenate([zeros(before), np.minimum(r.lo, 0.0), zeros(after)])
        hi = np.concatenate([zeros(before), np.maximum(r.hi, 0.0), zeros(after)])
        return ChannelRange(lo, hi, np.concatenate([zeros(before), r.mean, zeros(after)]))


def _relu(r: ChannelRange | None) -> ChannelRange | None:
    if r is None:
        return None
    moment = None
    if r.gaussian is not None:
        mu, sigma = r.gaussian
        safe = np.maximum(sigma, 1e-12)
        z = mu / safe
        cdf, pdf = ndtr(z), np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # Φ, φ of N(0, 1)
        mean = mu * cdf + sigma * pdf
        moment = (mu**2 + sigma**2) * cdf + mu * sigma * pdf  # E[ReLU(Y)²], Y ~ N(μ, σ²)
    else:
        mean = np.maximum(r.mean, 0.0)
    return ChannelRange(np.maximum(r.lo, 0.0), np.maximum(r.hi, 0.0), mean, second_moment=moment, tail=r.tail)


def _constant_operand(node: gs.Node) -> tuple[int, np.ndarray] | None:
    """(index, values as a vector of 1 or C) of the constant operand of a binary elementwise op
    whose constant broadcasts along axis 1 of the other operand only; None otherwise."""
    index = next((i for i in (1, 0) if constant_values(node, i) is not None), None)
    if index is None or constant_values(node, 1 - index) is not None:
        return None
    value = constant_values(node, index).astype(np.float64)
    if value.size == 1:
        return index, value.reshape(1)
    shape = node.inputs[1 - index].shape
    if shape is None or value.ndim > len(shape) or len(shape) < 2:
        return None
    padded = (1,) * (len(shape) - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(padded) if i != 1):
        return None
    return index, value.reshape(-1)


def _shifted(r: ChannelRange, shift: np.ndarray) -> ChannelRange:
    """The range of x + shift (shift: one value or one per channel)."""
    gaussian = None if r.gaussian is None else (r.gaussian[0] + shift, r.gaussian[1])
    tail = None if r.tail is None else (r.tail[0] + shift, r.tail[1], r.tail[2] + shift, r.tail[3])
    return ChannelRange(r.lo + shift, r.hi + shift, r.mean + shift, gaussian, None, tail)


def _scaled(r: ChannelRange, factor: np.ndarray) -> ChannelRange:
    """The range of x · factor (one value or one per channel); bounds swap where it is negative."""
    a, b = r.lo * factor, r.hi * factor
    gaussian = None if r.gaussian is None else (r.gaussian[0] * factor, r.gaussian[1] * np.abs(factor))
    moment = None if r.second_moment is None else r.second_moment * factor**2
    tail = None
    if r.tail is not None and np.all(factor > 0):
        tail = (r.tail[0] * factor, r.tail[1] * factor, r.tail[2] * factor, r.tail[3])
    return ChannelRange(np.minimum(a, b), np.maximum(a, b), r.mean * factor, gaussian, moment, tail)


def _hard_gate_of(gate: gs.Tensor, x: gs.Tensor) -> tuple[float, float, float] | None:
    """(α, β, k) when ``gate`` = k · clip(αx + β, 0, 1) of ``x`` (HardSigmoid(x), or
    Clip(x + s, 0, u) = u · clip(x/u + s/u, 0, 1)); None otherwise."""
    node = producer(gate)
    if node is None or not is_default_domain(node) or not node.inputs:
        return None
    if node.op == "HardSigmoid" and node.inputs[0] is x:
        alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
        return (alpha, beta, 1.0) if alpha > 0 else None
    if node.op != "Clip":
        return None
    low, high = _clip_bounds(node)
    add = producer(node.inputs[0])
    if low != 0.0 or not 0 < high < np.inf or add is None or add.op != "Add" or not is_default_domain(add):
        return None
    found = _constant_operand(add)
    if found is None or found[1].size != 1 or add.inputs[1 - found[0]] is not x:
        return None
    return 1.0 / high, float(found[1][0]) / high, high


_HERMITE = np.polynomial.hermite_e.hermegauss(64)


def _hard_swish(r: ChannelRange | None, alpha: float, beta: float, k: float) -> ChannelRange | None:
    """The range of k · x · clip(αx + β, 0, 1) (α > 0) per channel, exact on [lo, hi]."""
    if r is None:
        return None

    def f(x: np.ndarray) -> np.ndarray:
        return k * x * np.clip(alpha * x + beta, 0.0, 1.0)

    bottom = np.clip(-beta / (2 * alpha), r.lo, r.hi)  # the vertex of the quadratic part
    lo, hi = np.minimum(f(bottom), np.minimum(f(r.lo), f(r.hi))), np.maximum(f(r.lo), f(r.hi))
    if r.gaussian is None:
        return ChannelRange(lo, hi, np.clip(f(r.mean), lo, hi))
    mu, sigma = r.gaussian
    nodes, weights = _HERMITE
    values = f(mu[:, None] + sigma[:, None] * nodes[None, :])
    weights = weights / weights.sum()
    tail = None if r.tail is None or k <= 0 else (k * r.tail[0], k * r.tail[1], k * r.tail[2], r.tail[3])  # f(x) = k·x above (1 − β)/α
    return ChannelRange(lo, hi, values @ weights, second_moment=values**2 @ weights, tail=tail)


def channel_bound(node: gs.Node) -> tuple[int, np.ndarray] | None:
    """(index of the constant operand, its values as a vector of 1 or C) of a two-input Min/Max
    whose constant broadcasts along axis 1 of the other operand only; None otherwise."""
    if node.op not in ("Min", "Max") or len(node.inputs) != 2 or not is_default_domain(node):
        return None
    return _constant_operand(node)


def _clip_bounds(node: gs.Node) -> tuple[float, float]:
    low = constant_values(node, 1)
    high = constant_values(node, 2)
    low_value = float(low) if low is not None else float(node.attrs.get("min", -np.inf))
    high_value = float(high) if high is not None else float(node.attrs.get("max", np.inf))
    return low_value, high_value


def _clip(r: ChannelRange | None, low: float, high: float) -> ChannelRange | None:
    if r is None:
        return None
    base = _relu(r) if low == 0.0 else r
    moment = None if base.second_moment is None else np.minimum(base.second_moment, max(low**2, high**2))
    tail = _capped(base.tail, high) if low in (0.0, -np.inf) else None  # a lower clip below 0 is not modelled
    return ChannelRange(np.clip(base.lo, low, high), np.clip(base.hi, low, high), np.clip(base.mean, low, high), second_moment=moment, tail=tail)


def _capped(tail: Tail | None, high: float | np.ndarray) -> Tail | None:
    """``tail`` with its upper clip lowered to ``high`` (a scalar or one value per channel)."""
    if tail is None:
        return None
    mean, std, cap, share = tail
    return mean, std, np.minimum(cap, np.broadcast_to(high, cap.shape)), share


# --------------------------------------------------------------------------- calibration
