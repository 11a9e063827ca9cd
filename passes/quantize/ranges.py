"""Activation ranges per channel: data-free from BN statistics, or from calibration data.

Data-free (METHODS.md §3.1.1): the output of a BN is N(β_c, γ_c²) per channel, so its range
is ``[β − λ|γ|, β + λ|γ|]`` (λ = 9 at 8 bits, 4 at ≤ 6 bits by default).  The statistics
come from the BNs still in the graph and from the ``onnxopt.bn_statistics`` metadata that
fold-batchnorm keeps for the BNs it removed; a LayerNormalization over the last axis with
constant γ, β gives the same per-feature statistics (mean β, std |γ|) on its output.  They are propagated **[derived]** to the
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
* anything else, and graph inputs: unknown (the reading layer stays float unless
  calibration data or an input range is given).

Calibration: the tensors are computed by ONNX Runtime on the user's samples; per channel
(axis 1) either min/max or the 0.01 / 99.99 percentiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from scipy.stats import norm

from onnxopt.graph import constant_values, is_default_domain, producer

from ..bn_fold import statistics_from_metadata

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

    @property
    def channels(self) -> int:
        return len(self.lo)


def default_lambda(act_bits: int) -> float:
    """λ of METHODS.md §3: 9 at 8-bit activations, 4 at ≤ 6 bits (linear in between)."""
    if act_bits >= 8:
        return 9.0
    if act_bits <= 6:
        return 4.0
    return 6.5


def bn_statistics(graph: gs.Graph, metadata: Mapping[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tensor name → (mean, std) per channel (axis 1) from kept metadata and remaining BNs."""
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, entry in statistics_from_metadata(metadata).items():
        if entry.get("axis", 1) == 1:
            stats[name] = (np.asarray(entry["mean"], np.float64), np.asarray(entry["std"], np.float64))
    for node in graph.nodes:
        if node.op == "BatchNormalization" and is_default_domain(node):
            gamma, beta = constant_values(node, 1), constant_values(node, 2)
            if gamma is not None and beta is not None:
                stats[node.outputs[0].name] = (beta.astype(np.float64), np.abs(gamma.astype(np.float64)))
    stats.update(layernorm_statistics(graph))
    return stats


def layernorm_statistics(graph: gs.Graph) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tensor name → (β, |γ|) per feature (last axis) of every LayerNormalization that
    normalizes the last axis only, with constant 1-D scale γ (and bias β, else 0): its output
    has mean β_c and standard deviation |γ_c| per feature, like a BN output (METHODS.md §3)."""
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in graph.nodes:
        if node.op != "LayerNormalization" or not is_default_domain(node) or len(node.outputs) > 1 and not node.outputs[1].is_empty():
            continue
        gamma = constant_values(node, 1)
        beta = constant_values(node, 2) if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        axis = int(node.attrs.get("axis", -1))
        if gamma is None or gamma.ndim != 1 or rank is None or axis % rank != rank - 1:
            continue
        beta = np.zeros(len(gamma)) if beta is None else beta
        if beta.shape != gamma.shape:
            continue
        stats[node.outputs[0].name] = (beta.astype(np.float64), np.abs(gamma.astype(np.float64)))
    return stats


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
            return ChannelRange(mean - self.lam * std, mean + self.lam * std, mean.copy(), (mean, std), mean**2 + std**2)
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
        return ChannelRange(clip(r.lo, bound), clip(r.hi, bound), clip(r.mean, bound), second_moment=moment)

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
        cdf, pdf = norm.cdf(mu / safe), norm.pdf(mu / safe)
        mean = mu * cdf + sigma * pdf
        moment = (mu**2 + sigma**2) * cdf + mu * sigma * pdf  # E[ReLU(Y)²], Y ~ N(μ, σ²)
    else:
        mean = np.maximum(r.mean, 0.0)
    return ChannelRange(np.maximum(r.lo, 0.0), np.maximum(r.hi, 0.0), mean, second_moment=moment)


def channel_bound(node: gs.Node) -> tuple[int, np.ndarray] | None:
    """(index of the constant operand, its values as a vector of 1 or C) of a two-input Min/Max
    whose constant broadcasts along axis 1 of the other operand only; None otherwise."""
    if node.op not in ("Min", "Max") or len(node.inputs) != 2 or not is_default_domain(node):
        return None
    index = next((i for i in (1, 0) if constant_values(node, i) is not None), None)
    if index is None or constant_values(node, 1 - index) is not None:
        return None
    bound = constant_values(node, index).astype(np.float64)
    if bound.size == 1:
        return index, bound.reshape(1)
    shape = node.inputs[1 - index].shape
    if shape is None or bound.ndim > len(shape) or len(shape) < 2:
        return None
    padded = (1,) * (len(shape) - bound.ndim) + bound.shape
    if any(d != 1 for i, d in enumerate(padded) if i != 1):
        return None
    return index, bound.reshape(-1)


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
    return ChannelRange(np.clip(base.lo, low, high), np.clip(base.hi, low, high), np.clip(base.mean, low, high), second_moment=moment)


# --------------------------------------------------------------------------- calibration
def calibrated_ranges(
    model: onnx.ModelProto, tensors: list[str], samples: Mapping[str, np.ndarray], method: str
) -> dict[str, ChannelRange]:
    """Per-channel ranges (axis 1) of ``tensors`` over the calibration ``samples``."""
    from onnxopt.verify import session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = session(probe)
    names = list(dict.fromkeys(tensors))
    count = len(next(iter(samples.values())))
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for index in range(count):
        feeds = {key: value[index : index + 1] for key, value in samples.items()}
        for name, value in zip(names, sess.run(names, feeds)):
            collected[name].append(_channels_last(np.asarray(value, np.float64)))
    ranges = {}
    for name, chunks in collected.items():
        values = np.concatenate(chunks, axis=0)
        if method == "percentile":
            lo, hi = np.percentile(values, 0.01, axis=0), np.percentile(values, 99.99, axis=0)
        else:
            lo, hi = values.min(axis=0), values.max(axis=0)
        ranges[name] = ChannelRange(lo, hi, values.mean(axis=0))
    return ranges


def _channels_last(value: np.ndarray) -> np.ndarray:
    """Rows of samples × channels (channel = axis 1)."""
    if value.ndim < 2:
        return value.reshape(-1, 1)
    return np.moveaxis(value, 1, -1).reshape(-1, value.shape[1])
